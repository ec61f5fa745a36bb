"""Tiny ONNX models made in code, for the tests and the demo; nothing is downloaded.

``python tests/modelgen.py OUT_DIR [--seed N]`` writes ``model.onnx``, ``smoke-in.npy`` and
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


def iris_model(seed: int = 0, input_name: str = "x") -> bytes:
    """x[N,4] float -> probs[N,3] = softmax(x @ W + b)."""
    w, b = iris_weights(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [input_name, "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "iris",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


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
