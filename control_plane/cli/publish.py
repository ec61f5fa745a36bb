"""Publisher tools: ``keys generate``, ``bundle build``, ``bundle verify``."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from control_plane.catalog.build import (
    BundleSpec,
    ModelSource,
    build_bundle_file,
    directory_sources,
    runtime_of,
)
from control_plane.catalog.sign import add_signature
from control_plane.cli.common import (
    CliError,
    add_client_options,
    api_call,
    client_settings,
    read_file,
)
from control_plane.errors import BuildError, Invalid
from control_plane.fleet.config import check_schema
from control_plane.security.files import write_private
from protocol.bundle import BundleReader, check_file, write_bundle
from protocol.digest import sha256_digest
from protocol.dsse import (
    MANIFEST_PAYLOAD_TYPE,
    generate_private_key,
    key_id,
    keyring,
    load_private_key,
    load_public_key,
    parse_envelope,
    private_key_to_pem,
    public_key_to_pem,
    verify,
)
from protocol.exceptions import InvalidMessage, ProtocolError
from protocol.execution import parse_execution
from protocol.manifest import (
    check_name,
    check_version,
    parse_manifest,
)

VARIANT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VARIANT_KEYS = {"accelerator", "arch", "os", "minMemoryBytes"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the keys and bundle commands."""
    keys = sub.add_parser("keys", help="key pairs and the fleet's signed key set")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    gen = ksub.add_parser("generate", help="make an Ed25519 key pair: OUT.key (0600) + OUT.pub")
    gen.add_argument("--out", required=True, help="path prefix of the two files")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.set_defaults(func=cmd_keys_generate)
    from control_plane.cli import keyset

    keyset.register(ksub)

    bundle = sub.add_parser("bundle", help="build and verify .mfb bundles")
    bsub = bundle.add_subparsers(dest="bundle_command", required=True)
    b = bsub.add_parser("build", help="sign a model into a bundle")
    b.add_argument(
        "model",
        type=Path,
        help="the model file (.onnx or .tflite), or a directory holding one model file at its "
        "top and the files that go with it (its external data, labels, a tokenizer...)",
    )
    b.add_argument(
        "--file",
        type=Path,
        action="append",
        default=[],
        metavar="PATH",
        help="a file beside a model file: its external data, or an auxiliary file served with "
        "it; placed at its path relative to the model's directory, or under its own name "
        "(repeatable)",
    )
    b.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FILE_OR_DIR[:KEY=VALUE,...]",
        help="a hardware variant preferred where it fits, e.g. "
        "cuda-fp16=model-fp16.onnx:accelerator=cuda; a directory holds the variant's model and "
        "its own external data (repeatable, most preferred first)",
    )
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True)
    b.add_argument(
        "--key",
        required=True,
        type=Path,
        action="append",
        help="publisher private key (repeatable: one signature each)",
    )
    b.add_argument("--out", type=Path, help="default: NAME-VERSION.mfb")
    b.add_argument("--smoke-input", type=Path, help=".npy fed to the first input")
    b.add_argument("--smoke-output", type=Path, help=".npy expected from the first output")
    b.add_argument("--tolerance", type=float, default=1e-4, help="absolute tolerance (atol)")
    b.add_argument(
        "--config-schema",
        type=Path,
        help="JSON Schema of the version's configuration (with defaults), signed in the manifest",
    )
    b.add_argument(
        "--execution",
        type=Path,
        help="JSON: how the version asks to be run (batching, instances, threads, providers, "
        "warmupRequests), signed in the manifest",
    )
    b.set_defaults(func=cmd_bundle_build)
    v = bsub.add_parser("verify", help="check a bundle's signature and every digest")
    v.add_argument("bundle", type=Path)
    v.add_argument("--trust", type=Path, action="append", required=True, metavar="PUBKEY")
    v.add_argument(
        "--threshold", type=int, default=1, help="distinct trusted signatures needed (1)"
    )
    v.set_defaults(func=cmd_bundle_verify)
    sg = bsub.add_parser(
        "sign",
        help="add a publisher's signature to a bundle (k-of-n: each "
        "publisher signs with their own key)",
    )
    sg.add_argument("bundle", type=Path)
    sg.add_argument("--key", required=True, type=Path, help="publisher private key")
    sg.add_argument("--out", type=Path, help="default: overwrite the bundle")
    sg.set_defaults(func=cmd_bundle_sign)
    x = bsub.add_parser(
        "export",
        help="rebuild a published version's .mfb from the control plane "
        "(for sites with no route to it)",
    )
    x.add_argument("--model", required=True)
    x.add_argument("--version", required=True)
    x.add_argument("--out", type=Path, help="default: MODEL-VERSION.mfb")
    add_client_options(x)
    x.set_defaults(func=cmd_bundle_export)


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


def cmd_bundle_build(args: argparse.Namespace) -> int:
    """Build and sign a bundle."""
    try:
        name, version = check_name(args.name, "--name"), check_version(args.version, "--version")
        keys = [load_private_key(read_file(k, "--key")) for k in args.key]
    except ProtocolError as exc:
        raise CliError(f"--key: {exc}") from None
    if bool(args.smoke_input) != bool(args.smoke_output):
        raise CliError("--smoke-input and --smoke-output go together")
    smoke = None
    if args.smoke_input:
        arrays = []
        for flag, path in (
            ("--smoke-input", args.smoke_input),
            ("--smoke-output", args.smoke_output),
        ):
            data = read_file(path, flag)
            try:
                np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as exc:
                raise CliError(f"{flag} {path} is not a .npy array: {exc}") from None
            arrays.append(data)
        smoke = (arrays[0], arrays[1])
    source = _model_source(args.model, args.file)
    try:
        runtime = runtime_of(source.path)
    except BuildError as exc:
        raise CliError(str(exc)) from None
    variants = tuple(_parse_variant(v, runtime) for v in args.variant)
    schema = None
    if args.config_schema is not None:
        try:
            schema = check_schema(json.loads(read_file(args.config_schema, "config schema")))
        except (ValueError, Invalid) as exc:
            raise CliError(f"--config-schema: {exc}") from None
    execution = None
    if args.execution is not None:
        try:
            execution = parse_execution(json.loads(read_file(args.execution, "execution")))
        except (ValueError, InvalidMessage) as exc:
            raise CliError(f"--execution: {exc}") from None
    out = args.out or Path(f"{name}-{version}.mfb")
    smoke_paths = None
    if smoke is not None:
        smoke_paths = (args.smoke_input, args.smoke_output)
    spec = BundleSpec(
        name=name,
        version=version,
        runtime=runtime,
        model=source,
        variants=variants,
        smoke=smoke_paths,
        atol=args.tolerance,
        config_schema=schema,
        execution=execution,
    )
    try:
        manifest = build_bundle_file(out, spec, keys)
    except BuildError as exc:
        raise CliError(str(exc)) from None
    extra = len(manifest.files) - len(manifest.model_files())
    print(
        f"wrote {out}: {name} {version}, {len(manifest.files)} files "
        f"({len(manifest.model_files())} model, {extra} other), "
        f"manifest {sha256_digest(manifest.to_bytes())}"
    )
    return 0


def _model_source(path: Path, files: list[Path]) -> ModelSource:
    """A model file with ``--file``s beside it, or a directory; raises CliError."""
    try:
        if path.is_dir():
            if files:
                raise CliError("--file goes with a model file; a directory brings its own files")
            model, beside = directory_sources(path)
            return ModelSource(path=model, beside=beside)
    except BuildError as exc:
        raise CliError(str(exc)) from None
    if not path.is_file():
        raise CliError(f"{path}: no such file or directory")
    base = path.resolve().parent
    beside: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise CliError(f"--file {f}: no such file")
        resolved = f.resolve()
        rel = resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else f.name
        if rel in beside:
            raise CliError(f"--file {f}: a second file at {rel!r}")
        beside[rel] = f
    return ModelSource(path=path, beside=beside)


def _parse_variant(text: str, runtime: str) -> ModelSource:
    """``NAME=FILE[:KEY=VALUE,...]``; raises CliError naming what is wrong."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise CliError(f"--variant {text!r}: expected NAME=FILE[:KEY=VALUE,...]")
    file_part, _, req_part = rest.partition(":")
    if not VARIANT_RE.fullmatch(name):
        raise CliError(f"--variant {name!r}: a name is 1-64 of a-z, 0-9, '.', '_', '-'")
    path = Path(file_part)
    beside: dict[str, Path] = {}
    try:
        if path.is_dir():
            path, beside = directory_sources(path)
        variant_runtime = runtime_of(path)
    except BuildError as exc:
        raise CliError(f"--variant {name}: {exc}") from None
    if variant_runtime != runtime:
        raise CliError(f"--variant {name}: {path} is not a {runtime} model like the default")
    requires: dict[str, Any] = {}
    for pair in filter(None, req_part.split(",")):
        key, eq, value = pair.partition("=")
        if not eq or key not in VARIANT_KEYS:
            raise CliError(
                f"--variant {name}: {pair!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(sorted(VARIANT_KEYS))}"
            )
        if key == "minMemoryBytes":
            if not value.isdigit():
                raise CliError(f"--variant {name}: minMemoryBytes must be a whole number")
            requires[key] = int(value)
        else:
            requires[key] = value
    if not path.is_file():
        raise CliError(f"--variant {name}: {path}: no such file")
    return ModelSource(path=path, beside=beside, variant=name, requires=requires)


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    """Verify a bundle against trusted keys; exit 1 when it does not verify."""
    try:
        trusted = keyring(load_public_key(read_file(p, "--trust")) for p in args.trust)
    except ProtocolError as exc:
        raise CliError(f"--trust: {exc}") from None
    if args.threshold < 1:
        raise CliError("--threshold must be >= 1")
    try:
        # Streamed: the signature first, then each file's digest as it passes.
        with args.bundle.open("rb") as f, BundleReader(f) as reader:
            bundle = reader.head
            _, keyids = verify(bundle.envelope, trusted, MANIFEST_PAYLOAD_TYPE, args.threshold)
            for _, chunks in reader.files():
                for _ in chunks:
                    pass
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


def cmd_bundle_sign(args: argparse.Namespace) -> int:
    """Add a signature over the same manifest; every file's digest is checked on the way."""
    try:
        key = load_private_key(read_file(args.key, "--key"))
    except ProtocolError as exc:
        raise CliError(f"--key: {exc}") from None
    try:
        done = add_signature(args.bundle, key, args.out or args.bundle)
    except OSError as exc:
        raise CliError(f"{exc.filename or args.bundle}: {exc.strerror}") from None
    except ProtocolError as exc:
        raise CliError(f"{args.bundle}: {exc}", 1) from None
    print(f"wrote {done.out}: {done.signatures} signature(s), added key id {done.key_id}")
    return 0


MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


async def _read_capped(resp: Any, cap: int, what: str) -> bytes:
    """The body, refused (CliError) as soon as it passes ``cap`` bytes: a server that sends
    more than the manifest says is not read into memory."""
    chunks, total = [], 0
    async for chunk in resp.content.iter_chunked(1 << 20):
        total += len(chunk)
        if total > cap:
            raise CliError(f"{what}: the control plane sent more than {cap} bytes", 1)
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch_bundle(args: argparse.Namespace) -> tuple[bytes, str]:
    import aiohttp

    _, body = await api_call(args, "GET", f"/models/{args.model}/versions")
    match = [v for v in body["versions"] if v["version"] == args.version]
    if not match:
        raise CliError(f"{args.model} has no version {args.version}", 1)
    digest = match[0]["manifestDigest"]
    server, token = client_settings(args)
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(f"{server}/api/v1/manifests/{digest}") as r:
            if r.status != 200:
                raise CliError(f"manifest {digest}: HTTP {r.status}", 1)
            envelope = parse_envelope(await _read_capped(r, MAX_ENVELOPE_BYTES, "manifest"))
        manifest = parse_manifest(envelope.payload)
        files = {}
        for f in manifest.files:
            async with s.get(f"{server}/api/v1/blobs/{f.digest}") as r:
                if r.status != 200:
                    raise CliError(f"blob {f.digest}: HTTP {r.status}", 1)
                data = await _read_capped(r, f.size, f"file {f.path!r}")
            check_file(data, f.digest, f.size, f"file {f.path!r}")
            files[f.path] = data
    buf = io.BytesIO()
    write_bundle(buf, envelope, files)
    return buf.getvalue(), digest


def cmd_bundle_export(args: argparse.Namespace) -> int:
    """Write a published version as a .mfb, every digest checked on the way."""
    try:
        data, digest = asyncio.run(_fetch_bundle(args))
    except ProtocolError as exc:
        raise CliError(f"the control plane served a bad bundle: {exc}", 1) from None
    out = args.out or Path(f"{args.model}-{args.version}.mfb")
    write_private(out, data, 0o644)
    print(f"wrote {out}: {args.model} {args.version}, manifest {digest}")
    return 0
