"""Building a bundle on the publisher's side: read each model's inputs and outputs with its
runtime, describe every file in a manifest, sign it, and write the bundle.

Library code: ``modelfleet bundle build`` parses its arguments and calls ``build_bundle``; the
benches and tests build their bundles with it too. A model the runtime cannot load, or a
variant whose signature differs from the model's, raises ``BuildError`` saying which.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane.errors import BuildError
from protocol.bundle import write_bundle
from protocol.digest import sha256_digest
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, sign
from protocol.manifest import (
    MODEL_MEDIA_TYPES,
    NPY_MEDIA_TYPE,
    NUMPY_DATATYPES,
    ONNX_TYPES,
    FileEntry,
    Manifest,
    SmokeTest,
    TensorSpec,
)
from protocol.timeutil import format_time


def onnx_signature(model: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Read inputs and outputs with ONNX Runtime; raises BuildError when it cannot load them."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises untyped errors for any malformed model
        raise BuildError(f"not a model ONNX Runtime can load: {exc}") from None

    def spec(a: object) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (a.shape or []))  # type: ignore[attr-defined]
        return TensorSpec(a.name, ONNX_TYPES.get(a.type, "BYTES"), shape)  # type: ignore[attr-defined]

    return tuple(spec(a) for a in sess.get_inputs()), tuple(spec(a) for a in sess.get_outputs())


def tflite_signature(model: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Read inputs and outputs with LiteRT; raises BuildError when it cannot load them."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise BuildError("building a TFLite bundle needs ai-edge-litert installed") from None
    try:
        it = Interpreter(model_content=model)
    except (ValueError, RuntimeError) as exc:
        raise BuildError(f"not a model LiteRT can load: {exc}") from None

    def spec(d: dict) -> TensorSpec:
        sig = d.get("shape_signature")
        shape = sig if sig is not None and len(sig) else d["shape"]
        datatype = NUMPY_DATATYPES.get(np.dtype(d["dtype"]).name, "BYTES")
        return TensorSpec(d["name"], datatype, tuple(int(x) if x >= 0 else -1 for x in shape))

    return (
        tuple(spec(d) for d in it.get_input_details()),
        tuple(spec(d) for d in it.get_output_details()),
    )


SIGNATURE_READERS = {"onnx": onnx_signature, "tflite": tflite_signature}


def runtime_of(path: Path) -> str:
    """The runtime a model file is for, by its extension; raises BuildError for another."""
    runtime = {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix.lower())
    if runtime is None:
        raise BuildError(f"{path}: a model file must end in .onnx or .tflite")
    return runtime


@dataclass(frozen=True)
class Variant:
    """An extra hardware variant of the model: preferred over the default when it fits."""

    name: str
    model: bytes
    requires: dict[str, Any]


def build_bundle(
    model: bytes,
    name: str,
    version: str,
    keys: list[Ed25519PrivateKey],
    smoke: tuple[bytes, bytes] | None = None,
    atol: float = 1e-4,
    created: datetime | None = None,
    runtime: str = "onnx",
    variants: tuple[Variant, ...] = (),
    config_schema: dict[str, Any] | None = None,
) -> tuple[bytes, Manifest]:
    """Sign ``model`` (and its variants) into bundle bytes.

    ``config_schema`` is the JSON Schema of the version's configuration (``configSchema`` in
    the manifest: operators' configuration layers are validated against it, and its
    ``default``s are the configuration without layers).

    ``smoke`` is (input .npy bytes, expected output .npy bytes). Raises BuildError for a model
    the runtime cannot load, or a variant whose inputs and outputs differ from the model's.
    """
    read_signature = SIGNATURE_READERS[runtime]
    inputs, outputs = read_signature(model)
    ext = "onnx" if runtime == "onnx" else "tflite"
    media = MODEL_MEDIA_TYPES[runtime]
    files = {f"model.{ext}": model}
    entries = []
    for v in variants:
        if read_signature(v.model) != (inputs, outputs):
            raise BuildError(f"variant {v.name!r} has other inputs or outputs than the model")
        path = f"variants/{v.name}.{ext}"
        files[path] = v.model
        entries.append(
            FileEntry(
                path,
                sha256_digest(v.model),
                len(v.model),
                media,
                "model",
                variant=v.name,
                requires=v.requires,
            )
        )
    entries.append(
        FileEntry(
            f"model.{ext}",
            sha256_digest(model),
            len(model),
            media,
            "model",
            variant="default" if variants else None,
        )
    )
    smoke_test = None
    if smoke is not None:
        for member, data in zip(("smoke/input.npy", "smoke/output.npy"), smoke, strict=True):
            files[member] = data
            entries.append(
                FileEntry(member, sha256_digest(data), len(data), NPY_MEDIA_TYPE, "smoke")
            )
        smoke_test = SmokeTest("smoke/input.npy", "smoke/output.npy", atol=atol)
    manifest = Manifest(
        name=name,
        version=version,
        runtime=runtime,
        created=format_time(created or datetime.now(UTC)),
        files=tuple(entries),
        inputs=inputs,
        outputs=outputs,
        smoke_test=smoke_test,
        extra={"configSchema": config_schema} if config_schema is not None else {},
    )
    envelope = sign(MANIFEST_PAYLOAD_TYPE, manifest.to_bytes(), keys)
    buf = io.BytesIO()
    write_bundle(buf, envelope, files)
    return buf.getvalue(), manifest
