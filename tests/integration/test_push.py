"""Pushing blob by blob: only what the control plane lacks travels, a push cut halfway resumes,
and a blob or manifest that lies is refused with nothing stored."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bench.devkit.models import write_external_iris
from bench.devkit.proxies import UploadCuttingProxy
from control_plane.catalog.build import (
    BundleSpec,
    ModelSource,
    build_bundle_file,
    directory_sources,
)
from control_plane.catalog.push import PushError, index_bundle, push_bundle
from tests.support.bundles import Publisher
from tests.support.control_plane import ControlPlane, assert_error


def build(publisher: Publisher, root: Path, version: str, seed: int, pad: int) -> Path:
    """An external-data bundle of three weight files (about ``pad`` bytes) and labels."""
    src = root / f"src-{version}"
    write_external_iris(src, seed=seed, pad_bytes=pad, shards=2)
    (src / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    model, beside = directory_sources(src)
    out = root / f"iris-{version}.mfb"
    spec = BundleSpec(
        name="iris",
        version=version,
        runtime="onnx",
        model=ModelSource(path=model, beside=beside),
    )
    build_bundle_file(out, spec, [publisher.key])
    return out


def stored_files(cp: ControlPlane) -> list[Path]:
    return [p for p in (cp.config.data_dir / "blobs").rglob("*") if p.is_file()]


async def test_push_sends_only_what_is_missing(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    v1 = build(publisher, tmp_path, "1.0.0", seed=1, pad=200_000)
    first = await push_bundle(cp.url, cp.token, v1)
    assert first.status == 201 and first.body["version"] == "1.0.0"
    assert (first.sent_files, first.held_files) == (5, 0)
    again = await push_bundle(cp.url, cp.token, v1)
    assert (again.status, again.sent_files, again.sent_bytes) == (200, 0, 0)
    # 2.0.0 has other weights but the same graph (model.onnx) and labels: those two stay.
    v2 = build(publisher, tmp_path, "2.0.0", seed=2, pad=200_000)
    second = await push_bundle(cp.url, cp.token, v2)
    assert second.status == 201 and (second.sent_files, second.held_files) == (3, 2)
    r = await cp.call("GET", "/models/iris/versions")
    assert [v["version"] for v in (await r.json())["versions"]] == ["1.0.0", "2.0.0"]


async def test_push_cut_halfway_resumes_with_what_is_missing(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    bundle = build(publisher, tmp_path, "1.0.0", seed=3, pad=600_000)
    index = index_bundle(bundle)
    total = sum(f.size for f in index.manifest.files)
    async with UploadCuttingProxy(cp.url, cut_after=total // 2) as proxy:
        with pytest.raises(PushError):
            await push_bundle(proxy.url, cp.token, bundle)
    assert proxy.cut and 0 < proxy.uploads < len(index.manifest.files)
    r = await cp.call("GET", "/models/iris/versions")
    assert r.status == 404  # no version without all its blobs
    held = len(stored_files(cp))
    assert held == proxy.uploads  # the blob cut midway left nothing behind
    out = await push_bundle(cp.url, cp.token, bundle)
    assert out.status == 201
    assert out.held_files == held and out.sent_files == len(index.manifest.files) - held
    stored = {"sha256:" + p.name for p in stored_files(cp)}
    assert stored == {f.digest for f in index.manifest.files}


async def test_a_blob_that_lies_is_refused_and_not_stored(cp_sqlite: ControlPlane) -> None:
    cp = cp_sqlite
    data = b"the real bytes"
    lie = "sha256:" + hashlib.sha256(b"other bytes").hexdigest()
    r = await cp.call("PUT", f"/blobs/{lie}", data=data)
    await assert_error(r, 422, "digest_mismatch", "digest")
    assert stored_files(cp) == []
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    r = await cp.call("PUT", f"/blobs/{good}", data=data)
    assert r.status == 201 and (await r.json())["created"] is True
    r = await cp.call("POST", "/blobs/missing", json={"digests": [good, lie, good]})
    assert (await r.json()) == {"missing": [lie]}
    r = await cp.call("POST", "/blobs/missing", json={"digests": ["sha256:nothex"]})
    await assert_error(r, 400, "invalid_request", "digests[0]")


async def test_a_manifest_whose_blobs_are_missing_is_refused(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    index = index_bundle(build(publisher, tmp_path, "1.0.0", seed=4, pad=10_000))
    r = await cp.call("POST", "/manifests", data=index.envelope)
    await assert_error(r, 422, "blob_missing", "files[0].digest")
    r = await cp.call("GET", "/models/iris/versions")
    assert r.status == 404
