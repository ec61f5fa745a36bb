"""Model runtimes behind one interface: ONNX Runtime and TFLite (LiteRT).

Loading and inference block: the daemon calls them from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.exceptions import InferenceInputError, UpdateError
from agent.serving.batching import BatchPolicy
from protocol.manifest import NUMPY_DATATYPES, ONNX_TYPES, TensorSpec

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
    """A model in an ONNX Runtime session."""

    def __init__(self, path: Path, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One request per worker thread: keep each session's own pools small.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped errors for any bad model file
            raise UpdateError(f"ONNX Runtime could not load the model: {exc}") from exc
        self.inputs = tuple(_ort_spec(a) for a in self.session.get_inputs())
        self.outputs = tuple(_ort_spec(a) for a in self.session.get_outputs())
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference."""
        results = self.session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, results, strict=True))


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


class TFLiteModel:
    """A model in a LiteRT interpreter.

    An interpreter is not thread-safe: calls are serialised by a lock, and inputs whose shape
    differs from the last call resize the interpreter first.
    """

    def __init__(self, path: Path) -> None:
        interpreter_class = _tflite_interpreter_class()
        if interpreter_class is None:
            raise UpdateError("no TFLite runtime: install ai-edge-litert (or tflite-runtime)")
        try:
            self.interpreter = interpreter_class(model_path=str(path), num_threads=1)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise UpdateError(f"TFLite could not load the model: {exc}") from exc
        self._in = self.interpreter.get_input_details()
        self._out = self.interpreter.get_output_details()
        self.inputs = tuple(_tflite_spec(d) for d in self._in)
        self.outputs = tuple(_tflite_spec(d) for d in self._out)
        self._shapes = {d["name"]: tuple(d["shape"]) for d in self._in}
        self._lock = threading.Lock()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference."""
        with self._lock:
            resized = False
            for d in self._in:
                arr = feeds[d["name"]]
                if tuple(arr.shape) != self._shapes[d["name"]]:
                    self.interpreter.resize_tensor_input(d["index"], list(arr.shape))
                    self._shapes[d["name"]] = tuple(arr.shape)
                    resized = True
            if resized:
                self.interpreter.allocate_tensors()
            for d in self._in:
                self.interpreter.set_tensor(d["index"], feeds[d["name"]])
            self.interpreter.invoke()
            return {d["name"]: self.interpreter.get_tensor(d["index"]) for d in self._out}


def load_model(runtime: str, model_path: Path, providers: list[str] | None = None) -> Runtime:
    """Load a model file for ``runtime``; raises UpdateError."""
    if runtime == "onnx":
        return OnnxRuntimeModel(model_path, providers)
    if runtime == "tflite":
        return TFLiteModel(model_path)
    raise UpdateError(f"runtime {runtime!r} is not supported by this agent")


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
    # Dynamic batching (None: each request runs alone) and how many batches may run at once
    # (the model's sessions): the manifest's execution settings under the agent's overrides.
    batching: BatchPolicy | None = None
    instances: int = 1
    # The digest of the configuration it serves under (agent/update/config.py); None: none.
    config_digest: str | None = None
