"""The S3 blob store against a local S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.catalog.blobstore import (
    BlobNotFound,
    DirectoryBlobStore,
    S3BlobStore,
    check_blob_store_url,
    open_blob_store,
)
from tests.support.bundles import Publisher, bundle_members, iris_bundle
from tests.support.control_plane import cp_config, start_control_plane
from tests.support.fleet import free_port

boto3 = pytest.importorskip("boto3", reason="boto3 (modelfleet[s3]) is not installed")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "modelfleet-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "modelfleet-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    boto3.client("s3").create_bucket(Bucket="fleet")
    try:
        yield endpoint
    finally:
        server.stop()


def test_s3_store_put_size_range_and_missing(s3_endpoint: str) -> None:
    store = open_blob_store("s3://fleet/blobs/", Path("/nonexistent"))
    assert isinstance(store, S3BlobStore) and store.describe() == "s3://fleet/blobs"
    data = bytes(range(256)) * 4096  # 1 MiB: several chunks
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert not store.has(digest)
    with pytest.raises(BlobNotFound):
        store.size(digest)
    with pytest.raises(BlobNotFound):
        store.open_range(digest, 0, 10)
    store.put(digest, data)
    store.put(digest, data)  # already there: nothing happens
    assert store.has(digest) and store.size(digest) == len(data)
    assert b"".join(store.open_range(digest, 0, len(data))) == data
    assert b"".join(store.open_range(digest, 1000, 300_000)) == data[1000:301_000]
    assert b"".join(store.open_range(digest, 5, 0)) == b""
    key = f"blobs/sha256/{digest[7:9]}/{digest[7:]}"
    assert boto3.client("s3").head_object(Bucket="fleet", Key=key)["ContentLength"] == len(data)


def test_blob_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_blob_store(None, tmp_path / "a"), DirectoryBlobStore)
    assert isinstance(open_blob_store(str(tmp_path / "b"), tmp_path / "a"), DirectoryBlobStore)
    assert (tmp_path / "b" / "sha256").is_dir()
    for bad in ("s3://", "http://x/y", "gs://bucket"):
        with pytest.raises(ValueError, match=r"bucket|directory"):
            check_blob_store_url(bad)


async def test_control_plane_serves_bundles_from_s3(
    s3_endpoint: str, tmp_path: Path, publisher: Publisher
) -> None:
    """Push, list, download with Range: every blob goes to and comes from the bucket."""
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        blob_store_url="s3://fleet/prod",
    )
    cp = await start_control_plane(config)
    try:
        bundle = iris_bundle(publisher.key)
        r = await cp.push(bundle)
        assert r.status == 201, await r.text()
        assert not any(p.is_file() for p in config.blob_dir.rglob("*"))  # nothing on disk
        served = 0
        for name, data in bundle_members(bundle).items():
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            r = await cp.call("GET", f"/blobs/{digest}")
            if name.startswith("manifest"):
                assert r.status == 404  # the manifest is served by /manifests, not as a blob
                continue
            assert r.status == 200 and await r.read() == data, name
            r = await cp.call("GET", f"/blobs/{digest}", headers={"Range": "bytes=3-9"})
            assert r.status == 206 and await r.read() == data[3:10]
            assert r.headers["Content-Range"] == f"bytes 3-9/{len(data)}"
            served += 1
        objects = boto3.client("s3").list_objects_v2(Bucket="fleet", Prefix="prod/sha256/")
        assert served >= 2 and objects["KeyCount"] == served
        r = await cp.call("GET", "/blobs/sha256:" + "0" * 64)
        assert r.status == 404
    finally:
        await cp.client.close()


def _chunks(data: bytes, n: int = 1024 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


@pytest.mark.parametrize("where", ["s3", "dir"])
def test_streamed_put_multipart_and_a_lie_keeps_nothing(
    s3_endpoint: str, tmp_path: Path, where: str
) -> None:
    from protocol.exceptions import DigestMismatch

    store = open_blob_store(
        "s3://fleet/streamed" if where == "s3" else str(tmp_path / "b"), tmp_path
    )
    data = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32 + 5)  # ~20 MiB: 3 parts
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.put_stream(digest, len(data), _chunks(data)) is True
    assert store.put_stream(digest, len(data), _chunks(data)) is False  # held: checked only
    assert store.size(digest) == len(data)
    assert hashlib.sha256(b"".join(store.open_range(digest, 0, len(data)))).digest() == (
        hashlib.sha256(data).digest()
    )
    flipped = bytearray(data)
    flipped[-1] ^= 1
    lie = "sha256:" + hashlib.sha256(b"other").hexdigest()
    for body, size in ((bytes(flipped), len(data)), (data, len(data) - 1), (data[:100], 100)):
        with pytest.raises(DigestMismatch):
            store.put_stream(lie, size, _chunks(body))
        assert not store.has(lie)
    if where == "s3":
        assert isinstance(store, S3BlobStore)
        uploads = store.client.list_multipart_uploads(Bucket="fleet").get("Uploads", [])
        assert uploads == []  # every aborted upload is gone
    else:
        assert [p.name for p in (tmp_path / "b" / "sha256").rglob(".upload-*")] == []
