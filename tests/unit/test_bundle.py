"""Reading, writing and verifying .mfb bundles, including hostile ones."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from protocol.bundle import BundleLimits, read_bundle, verify_bundle, write_bundle
from protocol.dsse import MANIFEST_PAYLOAD_TYPE, generate_private_key, keyring, sign
from protocol.exceptions import BundleError, DigestMismatch, InvalidMessage, SignatureError
from protocol.manifest import parse_manifest
from tests.support.bundles import bundle_members as members
from tests.support.bundles import iris_bundle
from tests.support.bundles import tar_of as retar


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return generate_private_key()


@pytest.fixture(scope="module")
def good(key) -> bytes:  # type: ignore[no-untyped-def]
    return iris_bundle(key)


def test_good_bundle_verifies(key, good: bytes) -> None:  # type: ignore[no-untyped-def]
    b = read_bundle(io.BytesIO(good))
    assert verify_bundle(b, keyring([key.public_key()]))
    assert b.manifest.name == "iris" and b.manifest.version == "1.0.0"
    assert b.manifest.inputs[0].name == "x" and b.manifest.inputs[0].shape == (-1, 4)
    assert b.manifest.inputs[0].datatype == "FP32"
    assert b.manifest.smoke_test is not None
    assert b.manifest_digest.startswith("sha256:")


def test_bundles_are_reproducible(key) -> None:  # type: ignore[no-untyped-def]
    env = sign(MANIFEST_PAYLOAD_TYPE, b"{}", [key])
    a, b = io.BytesIO(), io.BytesIO()
    write_bundle(a, env, {"m": b"1"})
    write_bundle(b, env, {"m": b"1"})
    assert a.getvalue() == b.getvalue()


def test_untrusted_signer(good: bytes) -> None:
    b = read_bundle(io.BytesIO(good))
    with pytest.raises(SignatureError):
        verify_bundle(b, keyring([generate_private_key().public_key()]))


def test_flipped_byte_in_model(key, good: bytes) -> None:  # type: ignore[no-untyped-def]
    files = members(good)
    model = bytearray(files["model.onnx"])
    model[len(model) // 2] ^= 0x01
    files["model.onnx"] = bytes(model)
    b = read_bundle(io.BytesIO(retar(files)))
    with pytest.raises(DigestMismatch, match=r"model\.onnx"):
        verify_bundle(b, keyring([key.public_key()]))


def test_manifest_names_a_missing_file(good: bytes) -> None:
    files = members(good)
    del files["smoke/output.npy"]
    with pytest.raises(BundleError, match="lacks"):
        read_bundle(io.BytesIO(retar(files)))


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "./model.onnx"])
def test_path_traversal_members(good: bytes, name: str) -> None:
    files = members(good)
    files[name] = b"evil"
    with pytest.raises(BundleError, match="unsafe path"):
        read_bundle(io.BytesIO(retar(files)))


def test_symlink_member(good: bytes) -> None:
    link = tarfile.TarInfo("link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    with pytest.raises(BundleError, match="link"):
        read_bundle(io.BytesIO(retar(members(good), [link])))


def test_extra_member_not_in_manifest(good: bytes) -> None:
    files = members(good)
    files["surprise.bin"] = b"x"
    with pytest.raises(BundleError, match="not named"):
        read_bundle(io.BytesIO(retar(files)))


def test_duplicate_member(good: bytes) -> None:
    files = list(members(good).items())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, d in [*files, files[-1]]:
            info = tarfile.TarInfo(name)
            info.size = len(d)
            t.addfile(info, io.BytesIO(d))
    with pytest.raises(BundleError, match="twice"):
        read_bundle(io.BytesIO(buf.getvalue()))


def test_member_over_size_limit_is_refused_before_reading(good: bytes) -> None:
    with pytest.raises(BundleError, match="limit"):
        read_bundle(io.BytesIO(good), BundleLimits(max_member_bytes=100))


def test_total_size_limit(good: bytes) -> None:
    with pytest.raises(BundleError, match="larger than"):
        read_bundle(io.BytesIO(good), BundleLimits(max_total_bytes=1000))


def test_huge_declared_size_header() -> None:
    # A header that claims 1 TiB with no data behind it: refused on the header alone.
    info = tarfile.TarInfo("model.onnx")
    info.size = 1 << 40
    buf = io.BytesIO()
    buf.write(info.tobuf(format=tarfile.PAX_FORMAT))
    buf.write(b"\0" * 1024)
    with pytest.raises(BundleError):
        read_bundle(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize("junk", [b"", b"not a tar at all" * 100, b"\0" * 512])
def test_garbage(junk: bytes) -> None:
    with pytest.raises(BundleError):
        read_bundle(io.BytesIO(junk))


def test_manifest_json_must_equal_signed_payload(good: bytes) -> None:
    files = members(good)
    doc = json.loads(files["manifest.json"])
    doc["version"] = "9.9.9"
    files["manifest.json"] = json.dumps(doc).encode()
    with pytest.raises(BundleError, match="differs"):
        read_bundle(io.BytesIO(retar(files)))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("name"), "name"),
        (lambda d: d.update(name="Bad Name"), "name"),
        (lambda d: d.update(runtime="pytorch"), "runtime"),
        (lambda d: d["files"][0].update(digest="md5:abc"), "files[0].digest"),
        (lambda d: d["files"][0].update(path="../../x"), "files[0].path"),
        (lambda d: d["files"][0].update(size=-1), "files[0].size"),
        (lambda d: d["signature"]["inputs"][0].update(datatype="FLOAT"), "signature.inputs[0]."),
        (lambda d: d.update(schemaVersion=99), "schemaVersion"),
        (lambda d: d["smokeTest"].update(input="nope.npy"), "smokeTest.input"),
    ],
)
def test_manifest_field_errors_name_the_field(good: bytes, mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(members(good)["manifest.json"])
    mutate(doc)
    with pytest.raises(InvalidMessage) as info:
        parse_manifest(json.dumps(doc).encode())
    assert info.value.field == field


def test_manifest_keeps_unknown_fields(good: bytes) -> None:
    doc = json.loads(members(good)["manifest.json"])
    doc["futureField"] = {"x": 1}
    m = parse_manifest(json.dumps(doc).encode())
    assert m.to_json()["futureField"] == {"x": 1}
