"""Publisher keys and bundles made in code (signed, or hostile tars)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.devkit.models import SMOKE_INPUT, iris_model, iris_reference
from control_plane.catalog.build import build_bundle
from protocol.dsse import generate_private_key, private_key_to_pem, public_key_to_pem


@dataclass
class Publisher:
    """A publisher key pair on disk."""

    key: Ed25519PrivateKey
    key_path: Path
    pub_path: Path


def make_publisher(directory: Path, name: str = "publisher") -> Publisher:
    """A fresh key pair written as NAME.key / NAME.pub."""
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    kp, pp = directory / f"{name}.key", directory / f"{name}.pub"
    kp.write_bytes(private_key_to_pem(key))
    pp.write_bytes(public_key_to_pem(key.public_key()))
    return Publisher(key, kp, pp)


def npy(arr: np.ndarray) -> bytes:
    """An array as .npy bytes."""
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def iris_bundle(
    key: Ed25519PrivateKey,
    version: str = "1.0.0",
    seed: int = 0,
    smoke: bool = True,
    name: str = "iris",
    model: bytes | None = None,
    runtime: str = "onnx",
    smoke_rows: int = 2,
    **kw: Any,
) -> bytes:
    """A signed bundle of the tiny iris model, with a smoke test computed by numpy."""
    x = SMOKE_INPUT[:smoke_rows]
    s = (npy(x), npy(iris_reference(x, seed))) if smoke else None
    data, _ = build_bundle(
        model or iris_model(seed), name, version, [key], s, runtime=runtime, **kw
    )
    return data


def bundle_members(data: bytes) -> dict[str, bytes]:
    """The members of a bundle tar, by name."""
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}  # type: ignore[union-attr]


def tar_of(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    """A tar of these members (plus header-only ones), to build hostile bundles."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra or []:
            t.addfile(info)
    return buf.getvalue()
