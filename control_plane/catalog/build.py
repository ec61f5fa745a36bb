"""Building a bundle on the publisher's side: describe every file in a manifest, sign it, and
write the bundle, in memory bounded whatever the model's size.

A variant is a model file and the files it needs: for ONNX, the external data files its
tensors name by path relative to the model's directory, discovered from the model's protobuf
without loading its weights (control_plane/catalog/onnxfile.py). Files beside the default model
that it does not reference are auxiliary files (labels, a tokenizer, settings), served with it.
Every file is hashed in chunks, then copied into the tar in chunks and hashed again, so a file
that changes meanwhile fails the build instead of shipping a lie.

Library code: ``modelfleet bundle build`` parses its arguments and calls ``build_bundle_file``;
the benches and tests build small bundles in memory with ``build_bundle``. Anything wrong with
the inputs raises ``BuildError`` saying which file and why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane.catalog.onnxfile import OnnxFacts, OnnxFormatError, read_onnx
from control_plane.errors import BuildError
from control_plane.security.files import atomic_writer
from protocol.bundle import write_bundle
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, sign
from protocol.exceptions import ProtocolError
from protocol.execution import Execution
from protocol.manifest import (
    EXTERNAL_DATA,
    MODEL_MEDIA_TYPES,
    NPY_MEDIA_TYPE,
    NUMPY_DATATYPES,
    FileEntry,
    Manifest,
    SmokeTest,
    TensorSpec,
    check_path,
    manifest_from_json,
)
from protocol.timeutil import format_time

HASH_CHUNK = 1024 * 1024
# Below this size (model and its data) ONNX Runtime also loads the model at build time, so a
# model it cannot run is refused here rather than by every agent; a bigger one is not loaded
# (the build stays small in memory), and the agents' load and smoke test are the check.
ORT_CHECK_BYTES = 64 * 1024 * 1024
AUX_MEDIA_TYPE = "application/octet-stream"
EXTERNAL_MEDIA_TYPE = "application/vnd.onnx.external-data"

Signature = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 digest, size) of a file, read in chunks; raises BuildError when unreadable."""
    h = hashlib.sha256()
    n = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
                n += len(chunk)
    except OSError as exc:
        raise BuildError(f"{path}: {exc.strerror}") from None
    return "sha256:" + h.hexdigest(), n


def onnx_signature(model: Path) -> Signature:
    """Inputs and outputs of an ONNX model, read from its protobuf; raises BuildError."""
    facts = _onnx_facts(model)
    return facts.inputs, facts.outputs


def _onnx_facts(model: Path) -> OnnxFacts:
    try:
        with model.open("rb") as f:
            return read_onnx(f)
    except OnnxFormatError as exc:
        raise BuildError(f"{model}: not an ONNX model ({exc})") from None
    except OSError as exc:
        raise BuildError(f"{model}: {exc.strerror}") from None


def _ort_check(model: Path) -> None:
    """Load a small model with ONNX Runtime; raises BuildError when it cannot."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises untyped errors for any malformed model
        raise BuildError(f"{model}: not a model ONNX Runtime can load: {exc}") from None


def tflite_signature(model: Path) -> Signature:
    """Read inputs and outputs with LiteRT (which maps the file); raises BuildError."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise BuildError("building a TFLite bundle needs ai-edge-litert installed") from None
    try:
        it = Interpreter(model_path=str(model))
    except (ValueError, RuntimeError) as exc:
        raise BuildError(f"{model}: not a model LiteRT can load: {exc}") from None

    def spec(d: dict) -> TensorSpec:
        sig = d.get("shape_signature")
        shape = sig if sig is not None and len(sig) else d["shape"]
        datatype = NUMPY_DATATYPES.get(np.dtype(d["dtype"]).name, "BYTES")
        return TensorSpec(d["name"], datatype, tuple(int(x) if x >= 0 else -1 for x in shape))

    return (
        tuple(spec(d) for d in it.get_input_details()),
        tuple(spec(d) for d in it.get_output_details()),
    )


def runtime_of(path: Path) -> str:
    """The runtime a model file is for, by its extension; raises BuildError for another."""
    runtime = {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix.lower())
    if runtime is None:
        raise BuildError(f"{path}: a model file must end in .onnx or .tflite")
    return runtime


@dataclass(frozen=True, kw_only=True)
class ModelSource:
    """A model file and the files offered beside it.

    ``beside`` maps a path relative to the model's directory (as the model's external data
    references name it) to the file on disk. For the default model, those it does not reference
    become auxiliary files at that path; a variant's must all be its external data.
    """

    path: Path
    beside: Mapping[str, Path] = field(default_factory=dict)
    variant: str | None = None
    requires: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class BundleSpec:
    """Everything a bundle is built from."""

    name: str
    version: str
    runtime: str
    model: ModelSource
    variants: tuple[ModelSource, ...] = ()  # most preferred first
    smoke: tuple[Path, Path] | None = None  # (input .npy, expected output .npy)
    atol: float = 1e-4
    created: datetime | None = None
    # The JSON Schema of the version's configuration (``configSchema`` in the manifest:
    # operators' configuration layers are validated against it, its defaults are the
    # configuration without layers).
    config_schema: dict[str, Any] | None = None
    # How the version asks to be run: batching, sessions, threads (protocol/execution.py).
    execution: Execution | None = None


def directory_sources(directory: Path) -> tuple[Path, dict[str, Path]]:
    """The model file at the top of ``directory`` and every other file below it, by relative
    path (names starting with '.' are skipped); raises BuildError unless exactly one model."""
    if not directory.is_dir():
        raise BuildError(f"{directory} is not a directory")
    models = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix in (".onnx", ".tflite")
    )
    if len(models) != 1:
        found = ", ".join(p.name for p in models) or "none"
        raise BuildError(
            f"{directory} must hold exactly one .onnx or .tflite file at its top (found {found})"
        )
    beside: dict[str, Path] = {}
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            p = Path(root) / n
            if n.startswith(".") or p == models[0]:
                continue
            if p.is_symlink() or not p.is_file():
                raise BuildError(f"{p}: only regular files go into a bundle")
            beside[p.relative_to(directory).as_posix()] = p
    return models[0], beside


def resolve_location(location: str, model_dir: str, model: str) -> str:
    """The bundle path of an external data reference, relative to the model's directory in
    the bundle (``model_dir``, '' at the top); raises BuildError for one that points outside
    the bundle or is not a plain relative path."""
    if (
        not location
        or location.startswith(("/", "\\"))
        or "\\" in location
        or ":" in location
        or ".." in location.split("/")
    ):
        raise BuildError(
            f"{model}: external data location {location!r} points outside the bundle "
            "(only plain relative paths below the model's directory are allowed)"
        )
    path = posixpath.normpath(posixpath.join(model_dir, location))
    try:
        return check_path(path, "external data")
    except ProtocolError as exc:
        raise BuildError(f"{model}: {exc}") from None


@dataclass(frozen=True)
class _Planned:
    entry: FileEntry
    source: Path


class _Plan:
    """The bundle's files by bundle path: never two at one path."""

    def __init__(self) -> None:
        self.files: dict[str, _Planned] = {}

    def add(self, bundle_path: str, source: Path, media_type: str, role: str, **kw: Any) -> None:
        try:
            check_path(bundle_path, "file")
        except ProtocolError as exc:
            raise BuildError(f"{source}: {exc}") from None
        if bundle_path in self.files:
            raise BuildError(
                f"two files at bundle path {bundle_path!r}: {self.files[bundle_path].source} "
                f"and {source}"
            )
        digest, size = hash_file(source)
        self.files[bundle_path] = _Planned(
            FileEntry(bundle_path, digest, size, media_type, role, **kw), source
        )


def _add_model(
    plan: _Plan, m: ModelSource, runtime: str, prefix: str, is_default: bool, variant: str | None
) -> tuple[Signature, bool]:
    """Plan a model, its external data and (default model only) its auxiliary files; return its
    signature and whether it has external data."""
    ext = "onnx" if runtime == "onnx" else "tflite"
    model_path = f"{prefix}model.{ext}"
    model_dir = posixpath.dirname(model_path)
    requires = dict(m.requires)
    plan.add(
        model_path, m.path, MODEL_MEDIA_TYPES[runtime], "model", variant=variant, requires=requires
    )
    locations: tuple[str, ...] = ()
    if runtime == "onnx":
        facts = _onnx_facts(m.path)
        signature = (facts.inputs, facts.outputs)
        locations = facts.external
    else:
        signature = tflite_signature(m.path)
    referenced: set[str] = set()
    for loc in locations:
        bundle_path = resolve_location(loc, model_dir, str(m.path))
        rel = posixpath.normpath(loc)
        if rel in referenced:  # several tensors in one file ("w.bin", "./w.bin")
            continue
        source = m.beside.get(rel)
        if source is None:
            raise BuildError(
                f"{m.path}: external data {loc!r} is missing (not beside the model in its "
                "directory, nor given with --file)"
            )
        referenced.add(rel)
        plan.add(bundle_path, source, EXTERNAL_MEDIA_TYPE, "external-data", variant=variant)
    if runtime == "onnx" and not locations:
        size = m.path.stat().st_size
        if size <= ORT_CHECK_BYTES:
            _ort_check(m.path)
    for rel, source in sorted(m.beside.items()):
        if rel in referenced:
            continue
        if not is_default:
            raise BuildError(
                f"variant {variant!r}: {source} is not external data of its model "
                "(auxiliary files go with the default model)"
            )
        plan.add(posixpath.join(model_dir, rel), source, _aux_media_type(rel), "aux")
    return signature, bool(locations)


def _aux_media_type(path: str) -> str:
    return {
        ".json": "application/json",
        ".txt": "text/plain",
        ".npy": NPY_MEDIA_TYPE,
    }.get(posixpath.splitext(path)[1].lower(), AUX_MEDIA_TYPE)


def plan_bundle(spec: BundleSpec) -> tuple[Manifest, dict[str, Path]]:
    """The manifest of a bundle and the file behind each of its paths; raises BuildError."""
    plan = _Plan()
    external = False
    signature = None
    for v in spec.variants:
        if v.variant is None:
            raise BuildError("every variant needs a name")
        single = not v.beside and not (spec.runtime == "onnx" and _onnx_facts(v.path).external)
        ext = "onnx" if spec.runtime == "onnx" else "tflite"
        if single:
            # One file: where variants have always been, so the same inputs give the same bundle.
            path = f"variants/{v.variant}.{ext}"
            plan.add(
                path,
                v.path,
                MODEL_MEDIA_TYPES[spec.runtime],
                "model",
                variant=v.variant,
                requires=dict(v.requires),
            )
            sig = _signature_of(v.path, spec.runtime)
        else:
            sig, has_ext = _add_model(
                plan, v, spec.runtime, f"variants/{v.variant}/", False, v.variant
            )
            external |= has_ext
        if signature is not None and sig != signature:
            raise BuildError(f"variant {v.variant!r} has other inputs or outputs than the model")
        signature = sig
    default_name = "default" if spec.variants else None
    sig, has_ext = _add_model(plan, spec.model, spec.runtime, "", True, default_name)
    external |= has_ext
    if signature is not None and sig != signature:
        bad = spec.variants[0].variant
        raise BuildError(f"variant {bad!r} has other inputs or outputs than the model")
    smoke_test = None
    if spec.smoke is not None:
        for member, source in zip(("smoke/input.npy", "smoke/output.npy"), spec.smoke, strict=True):
            plan.add(member, source, NPY_MEDIA_TYPE, "smoke")
        smoke_test = SmokeTest("smoke/input.npy", "smoke/output.npy", atol=spec.atol)
    # Variants first, in order of preference, the default model last (as always); then the
    # default model's files and the smoke test in the order planned.
    entries = [p.entry for p in plan.files.values()]
    order = [e for e in entries if e.role == "model" and e.variant not in (None, "default")]
    order += [e for e in entries if e.role == "model" and e.variant in (None, "default")]
    order += [e for e in entries if e.role != "model"]
    manifest = Manifest(
        name=spec.name,
        version=spec.version,
        runtime=spec.runtime,
        created=format_time(spec.created or datetime.now(UTC)),
        files=tuple(order),
        inputs=sig[0],
        outputs=sig[1],
        smoke_test=smoke_test,
        required_features=(EXTERNAL_DATA,) if external else (),
        extra={"configSchema": spec.config_schema} if spec.config_schema is not None else {},
        execution=spec.execution,
    )
    try:  # the agent's own checks, here first: safe paths, no path twice, variants named...
        manifest_from_json(manifest.to_json())
    except ProtocolError as exc:
        raise BuildError(f"the bundle would be refused: {exc}") from None
    return manifest, {path: p.source for path, p in plan.files.items()}


def _signature_of(model: Path, runtime: str) -> Signature:
    if runtime == "onnx":
        facts = _onnx_facts(model)
        if model.stat().st_size <= ORT_CHECK_BYTES:
            _ort_check(model)
        return facts.inputs, facts.outputs
    return tflite_signature(model)


def build_bundle_file(out: Path, spec: BundleSpec, keys: list[Ed25519PrivateKey]) -> Manifest:
    """Sign ``spec`` into a bundle at ``out`` (written to a temp file, then renamed); raises
    BuildError."""
    manifest, sources = plan_bundle(spec)
    envelope = sign(MANIFEST_PAYLOAD_TYPE, manifest.to_bytes(), keys)
    with atomic_writer(out, 0o644) as f, contextlib.ExitStack() as stack:
        files: dict[str, bytes | BinaryIO] = {}
        for path, source in sources.items():
            try:
                files[path] = stack.enter_context(source.open("rb"))
            except OSError as exc:
                raise BuildError(f"{source}: {exc.strerror}") from None
        try:
            write_bundle(f, envelope, files)
        except ProtocolError as exc:
            raise BuildError(f"{exc} (was it written to while the bundle was built?)") from None
    return manifest


@dataclass(frozen=True)
class Variant:
    """An extra hardware variant of the model given as bytes (tests, benches)."""

    name: str
    model: bytes
    requires: dict[str, Any]
    files: Mapping[str, bytes] = field(default_factory=dict)  # its external data, by location


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
    files: Mapping[str, bytes] | None = None,
    config_schema: dict[str, Any] | None = None,
    execution: Execution | None = None,
) -> tuple[bytes, Manifest]:
    """Sign a model given as bytes (and its variants) into bundle bytes: small models only.

    ``files`` are the files beside the model by relative path: its external data and auxiliary
    files. ``smoke`` is (input .npy bytes, expected output .npy bytes). ``execution``: how the
    version asks to be run. Raises BuildError.
    """
    ext = "onnx" if runtime == "onnx" else "tflite"
    with tempfile.TemporaryDirectory(prefix="modelfleet-build-") as tmp:
        root = Path(tmp)

        def lay_out(
            directory: Path, model_bytes: bytes, beside: Mapping[str, bytes]
        ) -> ModelSource:
            paths = {}
            for rel, data in beside.items():
                if ".." in rel.split("/") or rel.startswith("/"):
                    raise BuildError(f"file {rel!r} points outside the bundle")
                p = directory / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                paths[rel] = p
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"model.{ext}").write_bytes(model_bytes)
            return ModelSource(path=directory / f"model.{ext}", beside=paths)

        default = lay_out(root / "model", model, files or {})
        sources = []
        for v in variants:
            s = lay_out(root / "variants" / v.name, v.model, v.files)
            sources.append(
                ModelSource(path=s.path, beside=s.beside, variant=v.name, requires=v.requires)
            )
        smoke_paths = None
        if smoke is not None:
            (root / "smoke-in.npy").write_bytes(smoke[0])
            (root / "smoke-out.npy").write_bytes(smoke[1])
            smoke_paths = (root / "smoke-in.npy", root / "smoke-out.npy")
        spec = BundleSpec(
            name=name,
            version=version,
            runtime=runtime,
            model=default,
            variants=tuple(sources),
            smoke=smoke_paths,
            atol=atol,
            created=created,
            config_schema=config_schema,
            execution=execution,
        )
        out = root / "bundle.mfb"
        manifest = build_bundle_file(out, spec, keys)
        return out.read_bytes(), manifest
