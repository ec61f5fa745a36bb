"""Tiny ONNX models made in code, for the tests, the benches and the demo; nothing is downloaded.

``python -m bench.devkit.models OUT_DIR [--seed N]`` writes ``model.onnx``, ``smoke-in.npy`` and
``smoke-out.npy`` (the expected output, computed with numpy, not with the runtime).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def iris_weights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic weights of a 4 -> 3 linear classifier."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)


# Matrix products of the slow iris model: 96 take about 3 ms a row here; 16 (0.4 ms) were lost
# in the scheduling noise of a loaded machine, and a latency gate let the slow version through.
SLOW_PRODUCTS = 96


def iris_model(
    seed: int = 0,
    input_name: str = "x",
    fail_on_batches: bool = False,
    pad_bytes: int = 0,
    slow: bool = False,
) -> bytes:
    """x[N,4] float -> probs[N,3] = softmax(x @ W + b).

    ``fail_on_batches``: the model reshapes its input to [1, 4] first, so it answers single
    rows (and passes a one-row smoke test) but fails at run time on any batch of two or more.
    ``pad_bytes``: an unused initializer of that size, to make a large model file.
    ``slow``: the same answers after SLOW_PRODUCTS 1024x1024 matrix products whose result is
    multiplied by zero, so the model is slower (about 3 ms a row on two cores, well above a
    loaded machine's scheduling noise) and no more wrong.
    """
    w, b = iris_weights(seed)
    nodes = []
    first = input_name
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if fail_on_batches:
        inits.append(numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "one_row"))
        nodes.append(helper.make_node("Reshape", [input_name, "one_row"], ["x1"]))
        first = "x1"
    if pad_bytes:
        pad = np.random.default_rng(seed).integers(0, 255, pad_bytes, dtype=np.uint8)
        inits.append(numpy_helper.from_array(pad, "padding"))
    nodes += [
        helper.make_node("MatMul", [first, "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits0" if slow else "logits"]),
    ]
    if slow:
        rng = np.random.default_rng(seed + 100)
        inits += [
            numpy_helper.from_array(rng.normal(size=(4, 1024)).astype(np.float32), "Wa"),
            # Scaled by 1/sqrt(1024): the products keep their size, never reaching inf (inf * 0
            # would be NaN in the answer).
            numpy_helper.from_array((rng.normal(size=(1024, 1024)) / 32).astype(np.float32), "Wb"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(np.zeros((1, 1), dtype=np.float32), "zero"),
        ]
        nodes += [
            helper.make_node("MatMul", [first, "Wa"], ["ha"]),
            *[
                helper.make_node("MatMul", [f"ha{'' if i == 0 else i}", "Wb"], [f"ha{i + 1}"])
                for i in range(SLOW_PRODUCTS)
            ],
            helper.make_node("ReduceSum", [f"ha{SLOW_PRODUCTS}", "axis1"], ["r"], keepdims=1),
            helper.make_node("Mul", ["r", "zero"], ["z"]),
            helper.make_node("Add", ["logits0", "z"], ["logits"]),
        ]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "iris",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def iris_tflite(seed: int = 0) -> bytes:
    """The same classifier as a .tflite flatbuffer, built without TensorFlow.

    FULLY_CONNECTED (weights stored [out, in]) then SOFTMAX; buffer 0 is the empty placeholder
    of tensors without constant data; the batch dimension is free in the shape signature.
    """
    import importlib

    import flatbuffers

    s = importlib.import_module("ai_edge_litert.schema_py_generated")
    w, b = iris_weights(seed)

    def tensor(name: str, shape: list[int], buffer: int, free_batch: bool = False) -> object:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), shape, s.TensorType.FLOAT32, buffer
        if free_batch:
            t.shapeSignature = [-1, *shape[1:]]
        return t

    def buffer(data: bytes = b"") -> object:
        buf = s.BufferT()
        if data:
            buf.data = data
        return buf

    def opcode(code: int) -> object:
        oc = s.OperatorCodeT()
        oc.builtinCode = oc.deprecatedBuiltinCode = code
        oc.version = 1
        return oc

    def operator(
        index: int, inputs: list[int], outputs: list[int], kind: int, opts: object
    ) -> object:
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = index, inputs, outputs
        op.builtinOptionsType, op.builtinOptions = kind, opts
        return op

    softmax = s.SoftmaxOptionsT()
    softmax.beta = 1.0
    graph = s.SubGraphT()
    graph.name = b"main"
    graph.tensors = [
        tensor("x", [1, 4], 0, True),
        tensor("W", [3, 4], 1),
        tensor("B", [3], 2),
        tensor("logits", [1, 3], 0, True),
        tensor("probs", [1, 3], 0, True),
    ]
    graph.inputs, graph.outputs = [0], [4]
    graph.operators = [
        operator(
            0, [0, 1, 2], [3], s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()
        ),
        operator(1, [3], [4], s.BuiltinOptions.SoftmaxOptions, softmax),
    ]
    model = s.ModelT()
    model.version = 3
    model.description = b"iris"
    model.buffers = [buffer(), buffer(np.ascontiguousarray(w.T).tobytes()), buffer(b.tobytes())]
    model.operatorCodes = [
        opcode(s.BuiltinOperator.FULLY_CONNECTED),
        opcode(s.BuiltinOperator.SOFTMAX),
    ]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _external_tensor(
    name: str, dims: list[int], dtype: int, location: str, offset: int, length: int
) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.dims.extend(dims)
    t.data_type = dtype
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


def write_external_iris(
    out_dir: Path,
    seed: int = 0,
    pad_bytes: int = 0,
    shards: int = 1,
    weights_dir: str = "weights",
    chunk: int = 16 * 1024 * 1024,
) -> Path:
    """The iris classifier with every weight as ONNX external data; return the model's path.

    ``W`` and ``B`` go to ``WEIGHTS_DIR/core.bin``; ``pad_bytes`` more, split over ``shards``
    files ``WEIGHTS_DIR/shard-K.bin``, are float32 tables [rows, 3] whose row 0 is zero, each
    added to the logits through a Gather at an index computed from the input (always 0), so
    the runtime must load every byte and the answers stay ``iris_reference``'s. The files are
    written in ``chunk``-byte pieces: a model of any size is made in bounded memory.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / weights_dir).mkdir(parents=True, exist_ok=True)
    w, b = iris_weights(seed)
    core = f"{weights_dir}/core.bin"
    (out_dir / core).write_bytes(w.tobytes() + b.tobytes())
    f32 = TensorProto.FLOAT
    inits = [
        _external_tensor("W", [4, 3], f32, core, 0, w.nbytes),
        _external_tensor("B", [3], f32, core, w.nbytes, b.nbytes),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits0"]),
        # An index the runtime cannot fold away: 0, computed from the input.
        helper.make_node("Mul", ["x", "zero"], ["x0"]),
        helper.make_node("ReduceSum", ["x0"], ["s0"], keepdims=0),
        helper.make_node("Cast", ["s0"], ["idx"], to=TensorProto.INT64),
    ]
    last = "logits0"
    rng = np.random.default_rng(seed + 7)
    n_shards = shards if pad_bytes else 0
    for k in range(n_shards):
        rows = max(1, -(-pad_bytes // n_shards) // 12)
        location = f"{weights_dir}/shard-{k}.bin"
        with (out_dir / location).open("wb") as f:
            left = rows * 12
            f.write(bytes(12))  # row 0: zeros, so the answers do not change
            left -= 12
            while left > 0:
                n = min(chunk, left)
                f.write(rng.bytes(n))
                left -= n
        inits.append(_external_tensor(f"pad{k}", [rows, 3], f32, location, 0, rows * 12))
        nodes += [
            helper.make_node("Gather", [f"pad{k}", "idx"], [f"row{k}"], axis=0),
            helper.make_node("Add", [last, f"row{k}"], [f"logits{k + 1}"]),
        ]
        last = f"logits{k + 1}"
    nodes.append(helper.make_node("Softmax", [last], ["probs"], axis=1))
    graph = helper.make_graph(
        nodes,
        "iris-external",
        [helper.make_tensor_value_info("x", f32, ["N", 4])],
        [helper.make_tensor_value_info("probs", f32, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = out_dir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def iris_reference(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """What the model computes, in numpy."""
    w, b = iris_weights(seed)
    logits = x.astype(np.float32) @ w + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


SMOKE_INPUT = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def write_iris(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the model and its smoke-test arrays; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": out_dir / "model.onnx",
        "smoke_in": out_dir / "smoke-in.npy",
        "smoke_out": out_dir / "smoke-out.npy",
    }
    paths["model"].write_bytes(iris_model(seed))
    np.save(paths["smoke_in"], SMOKE_INPUT)
    np.save(paths["smoke_out"], iris_reference(SMOKE_INPUT, seed))
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for p in write_iris(a.out_dir, a.seed).values():
        print(p)


def mlp_weights(seed: int = 0) -> list[np.ndarray]:
    """W1 [16,32], b1 [32], W2 [32,4], b2 [4] of a 16 -> 32 -> 4 ReLU MLP."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((16, 32), (32,), (32, 4), (4,))]


def mlp_onnx(seed: int = 0) -> bytes:
    """The 16 -> 32 -> 4 MLP the benchmarks time: x[N,16] -> y[N,4]."""
    w1, b1, w2, b2 = mlp_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h0"]),
            helper.make_node("Add", ["h0", "B1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["y0"]),
            helper.make_node("Add", ["y0", "B2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[
            numpy_helper.from_array(a, n)
            for a, n in zip((w1, b1, w2, b2), ("W1", "B1", "W2", "B2"), strict=True)
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def mlp_tflite(seed: int = 0) -> bytes:
    """The same MLP as .tflite: FULLY_CONNECTED (fused ReLU) then FULLY_CONNECTED."""
    import importlib

    import flatbuffers

    s = importlib.import_module("ai_edge_litert.schema_py_generated")
    w1, b1, w2, b2 = mlp_weights(seed)

    def tensor(name: str, shape: list[int], buffer: int) -> object:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), shape, s.TensorType.FLOAT32, buffer
        return t

    def buffer(data: bytes = b"") -> object:
        buf = s.BufferT()
        if data:
            buf.data = data
        return buf

    def fc(inputs: list[int], output: int, relu: bool) -> object:
        opts = s.FullyConnectedOptionsT()
        if relu:
            opts.fusedActivationFunction = s.ActivationFunctionType.RELU
        op = s.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, inputs, [output]
        op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, opts
        return op

    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 1
    graph = s.SubGraphT()
    graph.name = b"main"
    graph.tensors = [
        tensor("x", [1, 16], 0),
        tensor("W1", [32, 16], 1),
        tensor("B1", [32], 2),
        tensor("h", [1, 32], 0),
        tensor("W2", [4, 32], 3),
        tensor("B2", [4], 4),
        tensor("y", [1, 4], 0),
    ]
    graph.inputs, graph.outputs = [0], [6]
    graph.operators = [fc([0, 1, 2], 3, True), fc([3, 4, 5], 6, False)]
    model = s.ModelT()
    model.version = 3
    model.buffers = [
        buffer(),
        buffer(np.ascontiguousarray(w1.T).tobytes()),
        buffer(b1.tobytes()),
        buffer(np.ascontiguousarray(w2.T).tobytes()),
        buffer(b2.tobytes()),
    ]
    model.operatorCodes = [code]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tile_onnx(channels: int = 3, size: int = 224, repeat: int = 1) -> bytes:
    """An image-sized model: x[N, C, S, S] float -> y[N, C * repeat, S, S], x tiled along C.

    Its answer is ``repeat`` times larger than its request (as large with 1): the inference
    limits' tests and bench/inference_limits.py send it big bodies and get big answers.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels * repeat, size, size])
    repeats = numpy_helper.from_array(np.array([1, repeat, 1, 1], dtype=np.int64), "repeats")
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "repeats"], ["y"])], "tile", [x], [y], [repeats]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def lookup_onnx(rows: int = 10, width: int = 3, seed: int = 0) -> bytes:
    """idx[N] int64 -> y[N, width] = T[idx], a constant table of ``rows`` rows.

    An index out of range fails the whole runtime call, whatever the other rows hold: the
    batching tests join a bad request with good ones and each must keep its own answer.
    """
    table = np.random.default_rng(seed).normal(size=(rows, width)).astype(np.float32)
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["T", "idx"], ["y"], axis=0)],
        "lookup",
        [idx],
        [y],
        [numpy_helper.from_array(table, "T")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def classifier_onnx(channels: int = 3, classes: int = 1000, seed: int = 0) -> bytes:
    """An image classifier's shape: x[N, C, H, W] float -> probs[N, classes].

    A global average pool, a dense layer and a softmax: an image-sized request with a
    classifier-sized answer, as bench/serving.py times (the request path, not the model).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(channels, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, "H", "W"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def strings_onnx() -> bytes:
    """s[N] string -> t[N] string, the same strings (Identity): BYTES tensors end to end."""
    s = helper.make_tensor_value_info("s", TensorProto.STRING, ["N"])
    t = helper.make_tensor_value_info("t", TensorProto.STRING, ["N"])
    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "strings", [s], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
