"""Publisher tools: ``keys generate``, ``bundle build``, ``bundle verify``."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control_plane.cli.common import CliError
from control_plane.files import write_private
from protocol.bundle import read_bundle, verify_bundle, write_bundle
from protocol.digest import sha256_digest
from protocol.dsse import (
    MANIFEST_PAYLOAD_TYPE,
    generate_private_key,
    key_id,
    keyring,
    load_private_key,
    load_public_key,
    private_key_to_pem,
    public_key_to_pem,
    sign,
)
from protocol.exceptions import ProtocolError
from protocol.manifest import (
    NPY_MEDIA_TYPE,
    ONNX_MEDIA_TYPE,
    ONNX_TYPES,
    FileEntry,
    Manifest,
    SmokeTest,
    TensorSpec,
    check_name,
    check_version,
)
from protocol.timeutil import format_time


def register(sub: argparse._SubParsersAction) -> None:
    """Add the keys and bundle commands."""
    keys = sub.add_parser("keys", help="publisher keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    gen = ksub.add_parser("generate", help="make an Ed25519 key pair: OUT.key (0600) + OUT.pub")
    gen.add_argument("--out", required=True, help="path prefix of the two files")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.set_defaults(func=cmd_keys_generate)

    bundle = sub.add_parser("bundle", help="build and verify .mfb bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    b = bsub.add_parser("build", help="sign a model into a bundle")
    b.add_argument("model", type=Path, help="the model file (.onnx)")
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--key", required=True, type=Path, help="publisher private key")
    b.add_argument("--out", type=Path, help="default: NAME-VERSION.mfb")
    b.add_argument("--smoke-input", type=Path, help=".npy fed to the first input")
    b.add_argument("--smoke-output", type=Path, help=".npy expected from the first output")
    b.add_argument("--tolerance", type=float, default=1e-4, help="absolute tolerance (atol)")
    b.set_defaults(func=cmd_bundle_build)
    v = bsub.add_parser("verify", help="check a bundle's signature and every digest")
    v.add_argument("bundle", type=Path)
    v.add_argument("--trust", type=Path, action="append", required=True, metavar="PUBKEY")
    v.set_defaults(func=cmd_bundle_verify)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"{what} {path}: {exc.strerror}") from None


def cmd_keys_generate(args: argparse.Namespace) -> int:
    """Write a new key pair."""
    priv, pub = Path(f"{args.out}.key"), Path(f"{args.out}.pub")
    for p in (priv, pub):
        if p.exists() and not args.force:
            raise CliError(f"{p} exists; pass --force to overwrite")
    key = generate_private_key()
    write_private(priv, private_key_to_pem(key), 0o600)
    write_private(pub, public_key_to_pem(key.public_key()), 0o644)
    print(f"wrote {priv} and {pub} (key id {key_id(key.public_key())})")
    return 0


def onnx_signature(model: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Read inputs and outputs with ONNX Runtime; raises CliError when it cannot load them."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises untyped errors for any malformed model
        raise CliError(f"not a model ONNX Runtime can load: {exc}") from None

    def spec(a: object) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (a.shape or []))  # type: ignore[attr-defined]
        return TensorSpec(a.name, ONNX_TYPES.get(a.type, "BYTES"), shape)  # type: ignore[attr-defined]

    return tuple(spec(a) for a in sess.get_inputs()), tuple(spec(a) for a in sess.get_outputs())


def build_bundle(
    model: bytes,
    name: str,
    version: str,
    keys: list[Ed25519PrivateKey],
    smoke: tuple[bytes, bytes] | None = None,
    atol: float = 1e-4,
    created: datetime | None = None,
) -> tuple[bytes, Manifest]:
    """Sign ``model`` into bundle bytes; raises CliError for a model ORT cannot load.

    ``smoke`` is (input .npy bytes, expected output .npy bytes).
    """
    inputs, outputs = onnx_signature(model)
    files = {"model.onnx": model}
    entries = [FileEntry("model.onnx", sha256_digest(model), len(model), ONNX_MEDIA_TYPE, "model")]
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
        runtime="onnx",
        created=format_time(created or datetime.now(UTC)),
        files=tuple(entries),
        inputs=inputs,
        outputs=outputs,
        smoke_test=smoke_test,
    )
    envelope = sign(MANIFEST_PAYLOAD_TYPE, manifest.to_bytes(), keys)
    buf = io.BytesIO()
    write_bundle(buf, envelope, files)
    return buf.getvalue(), manifest


def cmd_bundle_build(args: argparse.Namespace) -> int:
    """Build and sign a bundle."""
    try:
        name, version = check_name(args.name, "--name"), check_version(args.version, "--version")
        key = load_private_key(_read(args.key, "--key"))
    except ProtocolError as exc:
        raise CliError(str(exc)) from None
    if bool(args.smoke_input) != bool(args.smoke_output):
        raise CliError("--smoke-input and --smoke-output go together")
    smoke = None
    if args.smoke_input:
        arrays = []
        for flag, path in (
            ("--smoke-input", args.smoke_input),
            ("--smoke-output", args.smoke_output),
        ):
            data = _read(path, flag)
            try:
                np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as exc:
                raise CliError(f"{flag} {path} is not a .npy array: {exc}") from None
            arrays.append(data)
        smoke = (arrays[0], arrays[1])
    data, manifest = build_bundle(
        _read(args.model, "model"), name, version, [key], smoke, args.tolerance
    )
    out = args.out or Path(f"{name}-{version}.mfb")
    write_private(out, data, 0o644)
    print(f"wrote {out}: {name} {version}, manifest {sha256_digest(manifest.to_bytes())}")
    return 0


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    """Verify a bundle against trusted keys; exit 1 when it does not verify."""
    try:
        trusted = keyring(load_public_key(_read(p, "--trust")) for p in args.trust)
    except ProtocolError as exc:
        raise CliError(f"--trust: {exc}") from None
    try:
        with args.bundle.open("rb") as f:
            bundle = read_bundle(f)
        keyids = verify_bundle(bundle, trusted)
    except OSError as exc:
        raise CliError(f"{args.bundle}: {exc.strerror}") from None
    except ProtocolError as exc:
        raise CliError(f"{args.bundle} does not verify: {exc}", 1) from None
    m = bundle.manifest
    print(
        json.dumps(
            {
                "name": m.name,
                "version": m.version,
                "runtime": m.runtime,
                "manifestDigest": bundle.manifest_digest,
                "signedBy": keyids,
                "files": [f.to_json() for f in m.files],
            },
            indent=2,
        )
    )
    return 0
