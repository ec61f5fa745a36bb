"""Pushing bundles to a real control plane on SQLite and PostgreSQL."""

from __future__ import annotations

from protocol.dsse import generate_private_key
from tests.support.bundles import Publisher, bundle_members, iris_bundle, tar_of
from tests.support.control_plane import ControlPlane, assert_error


async def versions(cp: ControlPlane) -> list[dict]:
    r = await cp.call("GET", "/models/iris/versions")
    return (await r.json())["versions"] if r.status == 200 else []


async def blob_count(cp: ControlPlane) -> int:
    return sum(1 for p in (cp.config.blob_dir / "sha256").rglob("*") if p.is_file())


async def test_push_list_and_idempotent_repush(cp: ControlPlane, publisher: Publisher) -> None:
    bundle = iris_bundle(publisher.key)
    r = await cp.push(bundle)
    assert r.status == 201, await r.text()
    first = await r.json()
    assert first["created"] is True
    r = await cp.push(bundle)
    assert r.status == 200 and (await r.json())["created"] is False
    vs = await versions(cp)
    assert [v["version"] for v in vs] == ["1.0.0"]
    assert vs[0]["manifestDigest"] == first["manifestDigest"]
    assert vs[0]["inputs"][0]["name"] == "x"
    r = await cp.call("GET", "/models")
    assert (await r.json())["models"] == [{"name": "iris", "versions": 1, "latest": "1.0.0"}]


async def test_same_version_different_content_is_409(
    cp: ControlPlane, publisher: Publisher
) -> None:
    assert (await cp.push(iris_bundle(publisher.key))).status == 201
    before = await blob_count(cp)
    r = await cp.push(iris_bundle(publisher.key, seed=1))
    await assert_error(r, 409, "version_exists", "version")
    assert await blob_count(cp) == before
    assert len(await versions(cp)) == 1


async def test_untrusted_signature_refused(cp: ControlPlane) -> None:
    r = await cp.push(iris_bundle(generate_private_key()))
    await assert_error(r, 422, "untrusted_signature")
    assert await versions(cp) == [] and await blob_count(cp) == 0


async def test_flipped_byte_refused(cp: ControlPlane, publisher: Publisher) -> None:
    files = bundle_members(iris_bundle(publisher.key))
    model = bytearray(files["model.onnx"])
    model[40] ^= 0xFF
    files["model.onnx"] = bytes(model)
    r = await cp.push(tar_of(files))
    await assert_error(r, 422, "digest_mismatch")
    assert await versions(cp) == [] and await blob_count(cp) == 0


async def test_malformed_bundles(cp: ControlPlane, publisher: Publisher) -> None:
    await assert_error(await cp.push(b""), 400, "invalid_bundle")
    await assert_error(await cp.push(b"garbage" * 200), 400, "invalid_bundle")
    files = bundle_members(iris_bundle(publisher.key))
    files["../escape"] = b"x"
    body = await assert_error(await cp.push(tar_of(files)), 400, "invalid_bundle")
    assert "../escape" in body["error"]["message"]
    assert await versions(cp) == [] and await blob_count(cp) == 0


async def test_bundle_over_size_limit(cp: ControlPlane, publisher: Publisher) -> None:
    object.__setattr__(cp.config, "max_bundle_bytes", 2048)
    await assert_error(await cp.push(iris_bundle(publisher.key)), 413, "bundle_too_large")
    assert await versions(cp) == []

    # Chunked upload without Content-Length is cut off the same way.
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"\0" * 1024

    r = await cp.call("POST", "/bundles", data=chunks())
    await assert_error(r, 413, "bundle_too_large")
    assert not list((cp.config.data_dir / "tmp").iterdir())


async def test_push_needs_an_operator_token(cp: ControlPlane, publisher: Publisher) -> None:
    await assert_error(await cp.push(iris_bundle(publisher.key), token=""), 401)
    await assert_error(await cp.push(iris_bundle(publisher.key), token="mfa_wrong"), 401)
    agent = await cp.enroll()
    await assert_error(await cp.push(iris_bundle(publisher.key), token=agent["credential"]), 403)
    assert await versions(cp) == []
