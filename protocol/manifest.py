"""Bundle manifests: what a model version is made of, named by digest."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from protocol.digest import check_digest
from protocol.exceptions import InvalidMessage
from protocol.execution import Execution, parse_execution
from protocol.fields import (
    extra_fields,
    get_int,
    get_list,
    get_number,
    get_str,
    load_json_object,
    req_str,
    require_object,
)

# A manifest that needs nothing an older agent lacks stays at version 1, byte for byte as
# before; one that does says so in ``requiredFeatures`` at version 2, which agents before
# version 2 refuse outright instead of misreading (docs/adr/0016-manifest-required-features.md).
SCHEMA_VERSION = 1
FEATURES_SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (SCHEMA_VERSION, FEATURES_SCHEMA_VERSION)
# Features this agent and control plane understand; a manifest requiring another is refused.
EXTERNAL_DATA = "external-data"
KNOWN_FEATURES = (EXTERNAL_DATA,)
# File roles: the model (one per variant), a model's external data (weights the model file
# names by relative path), auxiliary files served beside the model (labels, tokenizer,
# settings), the smoke test's arrays. "data" is what an entry without a role has always meant;
# a role this version does not know is laid out like "data" (a feature that changes how a file
# is used comes with a requiredFeatures name).
ROLES = ("model", "external-data", "aux", "smoke", "data")
RUNTIMES = ("onnx", "tflite")
# Open Inference Protocol (KServe v2) tensor datatypes.
DATATYPES = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)
RESERVED_PATHS = ("manifest.json", "manifest.dsse.json")
# ONNX Runtime's type strings for the same datatypes, read from a model's inputs and outputs.
ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
# numpy dtype names for the same datatypes (LiteRT reports numpy types).
NUMPY_DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
ONNX_MEDIA_TYPE = "application/vnd.onnx.model+protobuf"
TFLITE_MEDIA_TYPE = "application/vnd.tflite.model"
MODEL_MEDIA_TYPES = {"onnx": ONNX_MEDIA_TYPE, "tflite": TFLITE_MEDIA_TYPE}
NPY_MEDIA_TYPE = "application/vnd.numpy.npy"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
MAX_FILES = 64


def check_name(value: str, field_name: str = "name") -> str:
    """Return a valid model name; raises InvalidMessage otherwise."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise InvalidMessage(
            f"{field_name} must be 1-128 of a-z, 0-9, '.', '_', '-' and start alphanumeric",
            field_name,
        )
    return value


def check_version(value: str, field_name: str = "version") -> str:
    """Return a valid version string; raises InvalidMessage otherwise."""
    if not isinstance(value, str) or not VERSION_RE.fullmatch(value):
        raise InvalidMessage(
            f"{field_name} must be 1-64 of A-Z, a-z, 0-9, '.', '_', '+', '-'", field_name
        )
    return value


def check_path(value: str, field_name: str) -> str:
    """Return a safe relative member path; raises InvalidMessage for traversal and the like."""
    if len(value) > 255 or not _PATH_RE.fullmatch(value) or ".." in value.split("/"):
        raise InvalidMessage(f"{field_name} {value!r} is not a safe relative path", field_name)
    if value in RESERVED_PATHS:
        raise InvalidMessage(f"{field_name} {value!r} is a reserved name", field_name)
    return value


@dataclass(frozen=True)
class FileEntry:
    """One file of a bundle, laid out at ``path`` in the version's directory on the agent.

    A model file may be one of several hardware ``variant``s, each with ``requires``
    constraints (``accelerator``, ``arch``, ``os``, ``minMemoryBytes``); the manifest lists
    them in order of preference. An ``external-data`` file belongs to the model file whose
    ``variant`` it names (None: the only model), which refers to it by its path relative to
    the model's own directory.
    """

    path: str
    digest: str
    size: int
    media_type: str
    role: str = "model"
    variant: str | None = None
    requires: dict[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        doc: dict[str, Any] = {
            "path": self.path,
            "digest": self.digest,
            "size": self.size,
            "mediaType": self.media_type,
            "role": self.role,
        }
        if self.variant is not None:
            doc["variant"] = self.variant
        if self.requires:
            doc["requires"] = self.requires
        return doc


@dataclass(frozen=True)
class TensorSpec:
    """Name, datatype and shape of a model input or output; -1 marks a free dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class SmokeTest:
    """An input and its expected output, compared with a tolerance before activation."""

    input_path: str
    output_path: str
    atol: float = 1e-4
    rtol: float = 1e-3

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "input": self.input_path,
            "output": self.output_path,
            "atol": self.atol,
            "rtol": self.rtol,
        }


@dataclass(frozen=True)
class Manifest:
    """A model version's manifest."""

    name: str
    version: str
    runtime: str
    created: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    smoke_test: SmokeTest | None = None
    # How the version asks to be run (batching, sessions, threads): protocol/execution.py.
    execution: Execution | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    required_features: tuple[str, ...] = ()

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; raises KeyError when absent."""
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def model_files(self) -> tuple[FileEntry, ...]:
        """The model's variants in order of preference (one when there are no variants)."""
        return tuple(f for f in self.files if f.role == "model")

    def model_file(self) -> FileEntry:
        """The first (preferred) model file."""
        return self.model_files()[0]  # parse_manifest guarantees at least one

    def files_for(self, model: FileEntry) -> tuple[FileEntry, ...]:
        """What a machine running ``model`` needs: that model file, its external data, and
        every file that belongs to no variant (auxiliary files, the smoke test)."""
        return tuple(
            f
            for f in self.files
            if f is model
            or (f.role == "external-data" and f.variant == model.variant)
            or f.role not in ("model", "external-data")
        )

    def to_json(self) -> dict[str, Any]:
        """JSON form, unknown fields kept."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "schemaVersion": (
                    FEATURES_SCHEMA_VERSION if self.required_features else SCHEMA_VERSION
                ),
                "name": self.name,
                "version": self.version,
                "runtime": self.runtime,
                "created": self.created,
                "files": [f.to_json() for f in self.files],
                "signature": {
                    "inputs": [t.to_json() for t in self.inputs],
                    "outputs": [t.to_json() for t in self.outputs],
                },
            }
        )
        if self.smoke_test is not None:
            doc["smokeTest"] = self.smoke_test.to_json()
        if self.required_features:
            doc["requiredFeatures"] = sorted(self.required_features)
        if self.execution is not None:
            doc["execution"] = self.execution.to_json()
        return doc

    def to_bytes(self) -> bytes:
        """Canonical bytes: sorted keys, no spaces. These bytes are what gets signed."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _tensor(doc: object, prefix: str) -> TensorSpec:
    d = require_object(doc, prefix.rstrip("."))
    name = req_str(d, "name", prefix, max_len=256)
    datatype = req_str(d, "datatype", prefix)
    if datatype not in DATATYPES:
        raise InvalidMessage(f"{prefix}datatype must be one of {', '.join(DATATYPES)}", prefix)
    shape = get_list(d, "shape", prefix)
    if len(shape) > 16 or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in shape
    ):
        raise InvalidMessage(f"{prefix}shape must be up to 16 integers >= -1", f"{prefix}shape")
    return TensorSpec(name, datatype, tuple(shape))


def _check_dirs(paths: list[str]) -> None:
    """No path is also a directory of another (``a`` and ``a/b``): they cannot both be laid out."""
    dirs = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    clash = sorted(dirs.intersection(paths))
    if clash:
        raise InvalidMessage(f"files names {clash[0]!r} as a file and a directory", "files")


def _file(doc: object, prefix: str) -> FileEntry:
    d = require_object(doc, prefix.rstrip("."))
    role = get_str(d, "role", prefix, optional=True) or "data"
    requires = d.get("requires") or {}
    if not isinstance(requires, dict):
        raise InvalidMessage(f"{prefix}requires must be an object", f"{prefix}requires")
    return FileEntry(
        path=check_path(req_str(d, "path", prefix), f"{prefix}path"),
        digest=check_digest(d.get("digest"), f"{prefix}digest"),
        size=get_int(d, "size", prefix),
        media_type=req_str(d, "mediaType", prefix),
        role=role,
        variant=get_str(d, "variant", prefix, optional=True, max_len=64),
        requires=requires,
    )


def _features(d: dict[str, Any], schema: int) -> tuple[str, ...]:
    if schema == SCHEMA_VERSION:
        if "requiredFeatures" in d:
            raise InvalidMessage(
                f"requiredFeatures needs schemaVersion {FEATURES_SCHEMA_VERSION}",
                "requiredFeatures",
            )
        return ()
    raw = get_list(d, "requiredFeatures")
    if not raw or len(raw) > 32 or not all(isinstance(x, str) and len(x) <= 64 for x in raw):
        raise InvalidMessage("requiredFeatures must list 1 to 32 names", "requiredFeatures")
    for name in raw:
        if name not in KNOWN_FEATURES:
            raise InvalidMessage(
                f"requiredFeatures names {name!r}, which this version does not support",
                "requiredFeatures",
            )
    return tuple(sorted(set(raw)))


def _check_external_data(files: tuple[FileEntry, ...], features: tuple[str, ...]) -> None:
    """Every external-data file belongs to a model file, and says so in requiredFeatures."""
    variants = {f.variant for f in files if f.role == "model"}
    for i, f in enumerate(files):
        if f.role != "external-data":
            continue
        if EXTERNAL_DATA not in features:
            raise InvalidMessage(
                f"files[{i}] is external data but requiredFeatures lacks {EXTERNAL_DATA!r}",
                "requiredFeatures",
            )
        if f.variant not in variants:
            raise InvalidMessage(
                f"files[{i}] is external data of variant {f.variant!r}, which no model file is",
                f"files[{i}].variant",
            )


def manifest_from_json(doc: object) -> Manifest:
    """Validate decoded JSON into a Manifest; raises InvalidMessage naming the bad field."""
    d = require_object(doc, "manifest")
    schema = get_int(d, "schemaVersion", default=SCHEMA_VERSION)
    if schema not in SCHEMA_VERSIONS:
        raise InvalidMessage(f"schemaVersion {schema} is not supported", "schemaVersion")
    features = _features(d, schema)
    runtime = req_str(d, "runtime")
    if runtime not in RUNTIMES:
        raise InvalidMessage(f"runtime must be one of {', '.join(RUNTIMES)}", "runtime")
    raw_files = get_list(d, "files")
    if not raw_files or len(raw_files) > MAX_FILES:
        raise InvalidMessage(f"files must list 1 to {MAX_FILES} files", "files")
    files = tuple(_file(f, f"files[{i}].") for i, f in enumerate(raw_files))
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        twice = sorted({p for p in paths if paths.count(p) > 1})
        raise InvalidMessage(f"files names a path twice: {', '.join(twice)}", "files")
    _check_dirs(paths)
    _check_external_data(files, features)
    models = [f for f in files if f.role == "model"]
    if not models:
        raise InvalidMessage("files must hold at least one entry with role 'model'", "files")
    if len(models) > 1:
        names = [f.variant for f in models]
        if None in names or len(set(names)) != len(names):
            raise InvalidMessage("several model files need distinct 'variant' names", "files")
    sig = require_object(d.get("signature"), "signature")
    inputs = tuple(
        _tensor(t, f"signature.inputs[{i}].") for i, t in enumerate(get_list(sig, "inputs"))
    )
    outputs = tuple(
        _tensor(t, f"signature.outputs[{i}].") for i, t in enumerate(get_list(sig, "outputs"))
    )
    if not inputs or not outputs:
        raise InvalidMessage("signature needs at least one input and one output", "signature")
    smoke = None
    if d.get("smokeTest") is not None:
        s = require_object(d["smokeTest"], "smokeTest")
        smoke = SmokeTest(
            input_path=req_str(s, "input", "smokeTest."),
            output_path=req_str(s, "output", "smokeTest."),
            atol=get_number(s, "atol", "smokeTest.", default=1e-4),
            rtol=get_number(s, "rtol", "smokeTest.", default=1e-3),
        )
        for p, f in ((smoke.input_path, "input"), (smoke.output_path, "output")):
            if p not in paths:
                raise InvalidMessage(f"smokeTest.{f} names {p!r}, not in files", f"smokeTest.{f}")
    return Manifest(
        name=check_name(req_str(d, "name")),
        version=check_version(req_str(d, "version")),
        runtime=runtime,
        created=req_str(d, "created"),
        files=files,
        inputs=inputs,
        outputs=outputs,
        smoke_test=smoke,
        required_features=features,
        execution=parse_execution(d["execution"]) if d.get("execution") is not None else None,
        extra=extra_fields(
            d,
            (
                "schemaVersion",
                "name",
                "version",
                "runtime",
                "created",
                "files",
                "signature",
                "smokeTest",
                "requiredFeatures",
                "execution",
            ),
        ),
    )


def parse_manifest(data: bytes) -> Manifest:
    """Parse manifest bytes; raises InvalidMessage naming the bad field."""
    return manifest_from_json(load_json_object(data, "manifest", max_bytes=1024 * 1024))
