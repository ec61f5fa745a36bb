"""Model runtimes behind one interface: ONNX Runtime and TFLite (LiteRT).

Loading and inference block: the daemon calls them from worker threads.
"""

from __future__ import annotations

import itertools
import queue
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.exceptions import InferenceInputError, UpdateError
from agent.serving.batching import BatchPolicy
from agent.serving.execution import ExecutionPlan
from protocol.manifest import NUMPY_DATATYPES, ONNX_TYPES, FileEntry, TensorSpec

# Open Inference Protocol datatypes to numpy.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    # BYTES: an object array of bytes (str from a runtime is accepted on the way out).
    "BYTES": np.dtype(object),
}
DATATYPE_OF = {v: k for k, v in DTYPES.items()}


class Runtime(Protocol):
    """A loaded model."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference."""
        ...


def _ort_spec(arg: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, ONNX_TYPES.get(arg.type, "BYTES"), shape)


class OnnxRuntimeModel:
    """A model in ``plan.instances`` ONNX Runtime sessions, taken in turn by requests."""

    def __init__(self, path: Path, plan: ExecutionPlan | None = None) -> None:
        import onnxruntime as ort

        plan = plan or ExecutionPlan()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = plan.intra_op_threads
        opts.inter_op_num_threads = plan.inter_op_threads
        try:
            self.sessions = [
                ort.InferenceSession(str(path), sess_options=opts, providers=list(plan.providers))
                for _ in range(plan.instances)
            ]
        except Exception as exc:  # ORT raises its own untyped errors for any bad model file
            raise UpdateError(f"ONNX Runtime could not load the model: {exc}") from exc
        self.session = self.sessions[0]
        # What each session really got (a provider that fails to start is dropped by ORT).
        self.providers = tuple(self.session.get_providers())
        self._turn = itertools.cycle(self.sessions)  # next() is atomic under the GIL
        self.inputs = tuple(_ort_spec(a) for a in self.session.get_inputs())
        self.outputs = tuple(_ort_spec(a) for a in self.session.get_outputs())
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; raises InferenceInputError for BYTES that are not UTF-8."""
        given = {n: _as_text(n, a) if a.dtype.kind == "O" else a for n, a in feeds.items()}
        results = next(self._turn).run(self._output_names, given)
        return dict(zip(self._output_names, results, strict=True))


def available_providers() -> tuple[str, ...]:
    """The execution providers the installed ONNX Runtime build has."""
    import onnxruntime as ort

    return tuple(ort.get_available_providers())


def _as_text(name: str, arr: np.ndarray) -> np.ndarray:
    """A BYTES input as ONNX Runtime's strings (text: it would store b'..' reprs of bytes)."""
    out = np.empty(arr.shape, dtype=object)
    flat, dst = arr.reshape(-1), out.reshape(-1)
    try:
        for i, v in enumerate(flat):
            dst[i] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    except UnicodeDecodeError:
        raise InferenceInputError(
            f"input {name!r}: element {i} is not UTF-8, and ONNX Runtime strings are text"
        ) from None
    return out


def _tflite_interpreter_class() -> Any:
    """LiteRT's interpreter, or tflite-runtime's (which needs numpy < 2); None when neither."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter
    except ImportError:
        return None


def _tflite_spec(d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    shape = sig if sig is not None and len(sig) else d["shape"]
    return TensorSpec(
        d["name"],
        NUMPY_DATATYPES.get(np.dtype(d["dtype"]).name, "BYTES"),
        tuple(int(x) if x >= 0 else -1 for x in shape),
    )


class _Interpreter:
    """One LiteRT interpreter and the input shapes it is allocated for."""

    def __init__(self, interpreter: Any) -> None:
        self.interpreter = interpreter
        self.shapes = {d["name"]: tuple(d["shape"]) for d in interpreter.get_input_details()}


class TFLiteModel:
    """A model in ``plan.instances`` LiteRT interpreters.

    An interpreter is not thread-safe: each request takes a free one (waiting when all are
    busy), and inputs whose shape differs from its last call resize it first.
    """

    def __init__(self, path: Path, plan: ExecutionPlan | None = None) -> None:
        plan = plan or ExecutionPlan()
        interpreter_class = _tflite_interpreter_class()
        if interpreter_class is None:
            raise UpdateError("no TFLite runtime: install ai-edge-litert (or tflite-runtime)")
        self._free: queue.SimpleQueue[_Interpreter] = queue.SimpleQueue()
        try:
            for _ in range(plan.instances):
                it = interpreter_class(model_path=str(path), num_threads=plan.litert_threads)
                it.allocate_tensors()
                self._free.put(_Interpreter(it))
        except (ValueError, RuntimeError) as exc:
            raise UpdateError(f"TFLite could not load the model: {exc}") from exc
        self.interpreter = it
        self.providers = ()
        self._in = it.get_input_details()
        self._out = it.get_output_details()
        self.inputs = tuple(_tflite_spec(d) for d in self._in)
        self.outputs = tuple(_tflite_spec(d) for d in self._out)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference."""
        held = self._free.get()
        try:
            it = held.interpreter
            resized = False
            for d in self._in:
                arr = feeds[d["name"]]
                if tuple(arr.shape) != held.shapes[d["name"]]:
                    it.resize_tensor_input(d["index"], list(arr.shape))
                    held.shapes[d["name"]] = tuple(arr.shape)
                    resized = True
            if resized:
                it.allocate_tensors()
            for d in self._in:
                it.set_tensor(d["index"], feeds[d["name"]])
            it.invoke()
            return {d["name"]: it.get_tensor(d["index"]) for d in self._out}
        finally:
            self._free.put(held)


def load_model(runtime: str, model_path: Path, plan: ExecutionPlan | None = None) -> Runtime:
    """Load a model file for ``runtime`` as ``plan`` says, warm-up requests run; raises
    UpdateError."""
    plan = plan or ExecutionPlan()
    model: Runtime
    if runtime == "onnx":
        model = OnnxRuntimeModel(model_path, plan)
    elif runtime == "tflite":
        model = TFLiteModel(model_path, plan)
    else:
        raise UpdateError(f"runtime {runtime!r} is not supported by this agent")
    warm_up(model, plan.warmup_requests * plan.instances)
    return model


def warm_up(model: Runtime, requests: int) -> None:
    """Run ``requests`` inferences on zeros of the signature's shapes (free dimensions 1),
    so the first real requests do not pay for lazy allocation; raises UpdateError."""
    if not requests:
        return
    feeds = {
        t.name: np.zeros(
            tuple(1 if d == -1 else d for d in t.shape),
            dtype=DTYPES.get(t.datatype, np.dtype(np.float32)),
        )
        for t in model.inputs
    }
    for t in model.inputs:
        if t.datatype == "BYTES":
            feeds[t.name] = np.full(feeds[t.name].shape, b"", dtype=object)
    try:
        for _ in range(requests):
            model.run(feeds)
    except Exception as exc:  # the runtime's own error types; any of them fails the load
        raise UpdateError(f"warm-up request failed: {exc}") from exc


def _shape_fits(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    return len(shape) == len(spec) and all(
        s == -1 or s == d for d, s in zip(shape, spec, strict=True)
    )


def check_feeds(model: Runtime, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise InferenceInputError naming the first input that does not fit the model."""
    expected = {t.name: t for t in model.inputs}
    for name in feeds:
        if name not in expected:
            raise InferenceInputError(
                f"unknown input {name!r}; the model takes {', '.join(sorted(expected))}"
            )
    for spec in model.inputs:
        arr = feeds.get(spec.name)
        if arr is None:
            raise InferenceInputError(f"input {spec.name!r} is missing")
        dt = DATATYPE_OF.get(arr.dtype)
        if dt != spec.datatype:
            raise InferenceInputError(
                f"input {spec.name!r} has datatype {dt}, the model expects {spec.datatype}"
            )
        if not _shape_fits(arr.shape, spec.shape):
            want = ["?" if d == -1 else d for d in spec.shape]
            raise InferenceInputError(
                f"input {spec.name!r} has shape {list(arr.shape)}, the model expects {want}"
            )


def run_smoke_test(
    model: Runtime, input_bytes: bytes, output_bytes: bytes, atol: float, rtol: float
) -> None:
    """Feed the smoke input to the first input and compare the first output; raises UpdateError."""
    import io

    try:
        x = np.load(io.BytesIO(input_bytes), allow_pickle=False)
        want = np.load(io.BytesIO(output_bytes), allow_pickle=False)
    except ValueError as exc:
        raise UpdateError(f"smoke test files are not .npy arrays: {exc}") from None
    feeds = {model.inputs[0].name: x}
    try:
        check_feeds(model, feeds)
    except InferenceInputError as exc:
        raise UpdateError(f"smoke test input does not fit the model: {exc}") from None
    try:
        got = model.run(feeds)[model.outputs[0].name]
    except Exception as exc:  # the runtime's own error types; any of them fails the test
        raise UpdateError(f"smoke test inference failed: {exc}") from exc
    if got.shape != want.shape or not np.allclose(got, want, atol=atol, rtol=rtol):
        diff = (
            float(np.max(np.abs(got.astype(np.float64) - want)))
            if got.shape == want.shape
            else None
        )
        raise UpdateError(
            f"smoke test output differs from the expected one (shape {list(got.shape)} vs "
            f"{list(want.shape)}, max abs diff {diff}, atol {atol}, rtol {rtol})"
        )


@dataclass(frozen=True)
class LoadedModel:
    """A runtime serving one version of one model."""

    name: str
    version: str
    manifest_digest: str
    runtime: Runtime
    variant: str = "default"
    runtime_name: str = "onnx"
    # The manifest's execution settings under the agent's overrides (agent/serving/execution.py).
    plan: ExecutionPlan = field(default_factory=ExecutionPlan)
    # The digest of the configuration it serves under (agent/update/config.py); None: none.
    config_digest: str | None = None
    # The auxiliary files served with it (labels, tokenizer...), laid out in ``directory``.
    aux_files: tuple[FileEntry, ...] = ()
    directory: Path | None = None

    @property
    def batching(self) -> BatchPolicy | None:
        """Dynamic batching (None: each request runs alone)."""
        return self.plan.batching

    @property
    def instances(self) -> int:
        """Sessions of the model: how many of its batches may run at once."""
        return self.plan.instances
