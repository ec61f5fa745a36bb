"""Multi-file bundles: the manifest's files and required features, the ONNX reader, the
builder's checks on external data, and the streaming reader and writer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.devkit.models import (
    iris_model,
    mlp_onnx,
    tile_onnx,
    write_external_iris,
)
from control_plane.catalog.build import (
    BundleSpec,
    ModelSource,
    build_bundle,
    build_bundle_file,
    directory_sources,
    plan_bundle,
)
from control_plane.catalog.onnxfile import OnnxFormatError, read_onnx
from control_plane.catalog.sign import add_signature
from control_plane.errors import BuildError
from protocol.bundle import BundleReader, read_bundle, verify_bundle
from protocol.dsse import generate_private_key, keyring
from protocol.exceptions import BundleError, DigestMismatch, InvalidMessage
from protocol.manifest import parse_manifest
from tests.support.bundles import bundle_members, iris_bundle, tar_of


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


def spec(model: ModelSource, **kw: object) -> BundleSpec:
    return BundleSpec(name="iris", version="1.0.0", runtime="onnx", model=model, **kw)  # type: ignore[arg-type]


def external_dir(root: Path, **kw: object) -> Path:
    write_external_iris(root, pad_bytes=4096, shards=2, **kw)  # type: ignore[arg-type]
    (root / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    return root


# ------------------------------------------------------------------------- the ONNX reader


@pytest.mark.parametrize("model", [iris_model(), mlp_onnx(), tile_onnx(), iris_model(slow=True)])
def test_onnx_reader_agrees_with_onnx_runtime(model: bytes) -> None:
    facts = read_onnx(io.BytesIO(model))
    sess = ort.InferenceSession(model)
    for ours, theirs in ((facts.inputs, sess.get_inputs()), (facts.outputs, sess.get_outputs())):
        assert [t.name for t in ours] == [a.name for a in theirs]
        assert [t.shape for t in ours] == [
            tuple(d if isinstance(d, int) else -1 for d in a.shape) for a in theirs
        ]
    assert facts.external == ()


def test_onnx_reader_finds_external_data(tmp_path: Path) -> None:
    path = write_external_iris(tmp_path, pad_bytes=1000, shards=3)
    facts = read_onnx(path.open("rb"))
    assert facts.external == (
        "weights/core.bin",
        "weights/shard-0.bin",
        "weights/shard-1.bin",
        "weights/shard-2.bin",
    )


@pytest.mark.parametrize("junk", [b"", b"not a model", bytes(range(256)) * 4, b"\x3a\xff\xff"])
def test_onnx_reader_refuses_junk(junk: bytes) -> None:
    with pytest.raises(OnnxFormatError):
        read_onnx(io.BytesIO(junk))


# --------------------------------------------------------------------------- the builder


def test_directory_bundle_has_model_external_data_and_aux_files(
    tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    out = tmp_path / "b.mfb"
    m = build_bundle_file(out, spec(ModelSource(path=model, beside=beside)), [key])
    roles = {f.path: f.role for f in m.files}
    assert roles == {
        "model.onnx": "model",
        "weights/core.bin": "external-data",
        "weights/shard-0.bin": "external-data",
        "weights/shard-1.bin": "external-data",
        "labels.txt": "aux",
    }
    assert m.required_features == ("external-data",)
    assert m.to_json()["schemaVersion"] == 2
    with out.open("rb") as f:
        assert verify_bundle(read_bundle(f), keyring([key.public_key()]))


def test_a_single_file_bundle_stays_schema_1_byte_for_byte(key: Ed25519PrivateKey) -> None:
    data = iris_bundle(key)
    doc = json.loads(bundle_members(data)["manifest.json"])
    assert doc["schemaVersion"] == 1 and "requiredFeatures" not in doc
    assert {f["role"] for f in doc["files"]} == {"model", "smoke"}


def test_external_data_missing_is_refused(tmp_path: Path) -> None:
    d = external_dir(tmp_path / "m")
    (d / "weights" / "shard-1.bin").unlink()
    model, beside = directory_sources(d)
    with pytest.raises(BuildError, match=r"external data 'weights/shard-1.bin' is missing"):
        plan_bundle(spec(ModelSource(path=model, beside=beside)))


def test_external_data_renamed_is_refused(tmp_path: Path) -> None:
    d = external_dir(tmp_path / "m")
    (d / "weights" / "core.bin").rename(d / "weights" / "core-renamed.bin")
    model, beside = directory_sources(d)
    with pytest.raises(BuildError, match=r"'weights/core.bin' is missing"):
        plan_bundle(spec(ModelSource(path=model, beside=beside)))


@pytest.mark.parametrize("outside", ["../secret.bin", "/etc/passwd", "a/../../x.bin"])
def test_external_data_pointing_outside_is_refused(tmp_path: Path, outside: str) -> None:
    d = tmp_path / "m"
    write_external_iris(d, weights_dir="w")
    import onnx

    proto = onnx.ModelProto.FromString((d / "model.onnx").read_bytes())
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = outside
    (d / "model.onnx").write_bytes(proto.SerializeToString())
    model, beside = directory_sources(d)
    with pytest.raises(BuildError, match="points outside the bundle"):
        plan_bundle(spec(ModelSource(path=model, beside=beside)))


def test_two_variants_sharing_a_path_are_refused(tmp_path: Path) -> None:
    d = external_dir(tmp_path / "m")
    # An auxiliary file of the default model where variant "gpu" puts its external data.
    (d / "variants" / "gpu" / "weights").mkdir(parents=True)
    (d / "variants" / "gpu" / "weights" / "core.bin").write_bytes(b"x")
    model, beside = directory_sources(d)
    write_external_iris(tmp_path / "v")
    vmodel, vbeside = directory_sources(tmp_path / "v")
    s = spec(
        ModelSource(path=model, beside=beside),
        variants=(ModelSource(path=vmodel, beside=vbeside, variant="gpu"),),
    )
    with pytest.raises(
        BuildError, match=r"two files at bundle path 'variants/gpu/weights/core.bin'"
    ):
        plan_bundle(s)


def test_manifest_with_two_files_at_one_path_is_refused(key: Ed25519PrivateKey) -> None:
    doc = json.loads(bundle_members(iris_bundle(key))["manifest.json"])
    doc["files"].append(dict(doc["files"][0], role="aux"))
    with pytest.raises(InvalidMessage, match=r"names a path twice: model\.onnx"):
        parse_manifest(json.dumps(doc).encode())


def test_variant_with_its_own_external_data(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    write_external_iris(tmp_path / "v", seed=0, pad_bytes=100, shards=1, weights_dir="fp16")
    vmodel, vbeside = directory_sources(tmp_path / "v")
    m, _ = plan_bundle(
        spec(
            ModelSource(path=model, beside=beside),
            variants=(
                ModelSource(
                    path=vmodel, beside=vbeside, variant="gpu", requires={"accelerator": "cuda"}
                ),
            ),
        )
    )
    gpu = m.model_files()[0]
    assert gpu.path == "variants/gpu/model.onnx" and gpu.variant == "gpu"
    assert [f.path for f in m.files_for(gpu) if f.role == "external-data"] == [
        "variants/gpu/fp16/core.bin",
        "variants/gpu/fp16/shard-0.bin",
    ]
    default = m.model_files()[1]
    needs = {f.path for f in m.files_for(default)}
    assert "labels.txt" in needs and not any(p.startswith("variants/") for p in needs)


def test_manifest_feature_checks(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    m, _ = plan_bundle(spec(ModelSource(path=model, beside=beside)))
    doc = m.to_json()
    parse_manifest(json.dumps(doc).encode())
    unknown = dict(doc, requiredFeatures=["external-data", "quantum-weights"])
    with pytest.raises(InvalidMessage, match="'quantum-weights', which this version does not"):
        parse_manifest(json.dumps(unknown).encode())
    # External data in a manifest that does not require the feature: an older agent would
    # misread it, so it is refused everywhere.
    v1 = {k: v for k, v in doc.items() if k != "requiredFeatures"} | {"schemaVersion": 1}
    with pytest.raises(InvalidMessage, match="requiredFeatures lacks 'external-data'"):
        parse_manifest(json.dumps(v1).encode())
    orphan = json.loads(json.dumps(doc))
    orphan["files"][1]["variant"] = "gpu"
    with pytest.raises(InvalidMessage, match="variant 'gpu', which no model file is"):
        parse_manifest(json.dumps(orphan).encode())
    clash = json.loads(json.dumps(doc))
    clash["files"].append(dict(clash["files"][-1], path="labels.txt/x"))
    with pytest.raises(InvalidMessage, match="as a file and a directory"):
        parse_manifest(json.dumps(clash).encode())


def test_bytes_api_builds_external_data(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    d = external_dir(tmp_path / "m")
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    model = files.pop("model.onnx")
    data, m = build_bundle(model, "iris", "1.0.0", [key], files=files)
    b = read_bundle(io.BytesIO(data))
    assert {p: b.files[p] for p in files} == files
    assert {f.path: f.role for f in m.files}["labels.txt"] == "aux"


# ------------------------------------------------------------------ streaming read and write


def test_streaming_reader_checks_every_file(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    out = tmp_path / "b.mfb"
    m = build_bundle_file(out, spec(ModelSource(path=model, beside=beside)), [key])
    with out.open("rb") as f, BundleReader(f) as r:
        assert r.head.manifest == m
        got = {e.path: b"".join(chunks) for e, chunks in r.files()}
    assert set(got) == {f.path for f in m.files}
    assert got["labels.txt"] == b"setosa\nversicolor\nvirginica\n"


def test_aux_file_flipped_by_one_byte_is_caught_streaming(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    out = tmp_path / "b.mfb"
    build_bundle_file(out, spec(ModelSource(path=model, beside=beside)), [key])
    data = bytearray(out.read_bytes())
    at = bytes(data).index(b"versicolor")
    data[at] ^= 0x01
    with (
        BundleReader(io.BytesIO(bytes(data))) as r,
        pytest.raises(DigestMismatch, match=r"labels\.txt"),
    ):
        for _, chunks in r.files():
            for _ in chunks:
                pass
    with pytest.raises(DigestMismatch, match=r"labels\.txt"):
        verify_bundle(read_bundle(io.BytesIO(bytes(data))), keyring([key.public_key()]))


def test_streaming_reader_wants_the_manifest_first(key: Ed25519PrivateKey) -> None:
    members = bundle_members(iris_bundle(key))
    reordered = {"model.onnx": members.pop("model.onnx"), **members}
    with pytest.raises(BundleError, match=r"must begin with manifest\.json"):
        BundleReader(io.BytesIO(tar_of(reordered)))


def test_a_file_changed_while_building_fails_the_build(
    tmp_path: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = external_dir(tmp_path / "m")
    model, beside = directory_sources(d)
    s = spec(ModelSource(path=model, beside=beside))
    import control_plane.catalog.build as build

    real = build.plan_bundle

    def plan_then_change(sp: BundleSpec) -> object:
        planned = real(sp)
        (d / "labels.txt").write_text("changed after hashing\n")
        return planned

    monkeypatch.setattr(build, "plan_bundle", plan_then_change)
    with pytest.raises(BuildError, match=r"labels\.txt"):
        build_bundle_file(tmp_path / "b.mfb", s, [key])
    assert not (tmp_path / "b.mfb").exists()


def test_tflite_directory_with_labels(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert (modelfleet[tflite]) missing")
    from bench.devkit.models import iris_tflite

    d = tmp_path / "t"
    (d / "assets").mkdir(parents=True)
    (d / "model.tflite").write_bytes(iris_tflite())
    (d / "assets" / "labels.txt").write_text("a\nb\nc\n")
    model, beside = directory_sources(d)
    spec_ = BundleSpec(
        name="iris", version="1.0.0", runtime="tflite", model=ModelSource(path=model, beside=beside)
    )
    m = build_bundle_file(tmp_path / "t.mfb", spec_, [key])
    assert {f.path: f.role for f in m.files} == {
        "model.tflite": "model",
        "assets/labels.txt": "aux",
    }
    assert m.to_json()["schemaVersion"] == 1  # nothing an older agent would misread
    assert m.inputs[0].shape == (-1, 4)


# ------------------------------------------------------------------ a second signature


def test_a_second_signature_keeps_the_manifest_and_every_file(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    src = tmp_path / "b.mfb"
    build_bundle_file(src, spec(ModelSource(path=model, beside=beside)), [key])
    second = generate_private_key()
    out = tmp_path / "signed" / "b.mfb"
    done = add_signature(src, second, out)
    assert (done.out, done.signatures) == (out, 2)
    before, after = (read_bundle(io.BytesIO(p.read_bytes())) for p in (src, out))
    assert after.manifest_digest == before.manifest_digest
    assert after.files == before.files
    both = keyring([key.public_key(), second.public_key()])
    verify_bundle(after, both, threshold=2)
    # Signing again with the same key replaces its signature, never counts it twice.
    assert add_signature(out, second, out).signatures == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.mfb"]  # no temp file left


def test_a_file_changed_inside_the_bundle_is_refused_and_nothing_written(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    model, beside = directory_sources(external_dir(tmp_path / "m"))
    src = tmp_path / "b.mfb"
    build_bundle_file(src, spec(ModelSource(path=model, beside=beside)), [key])
    data = bytearray(src.read_bytes())
    at = bytes(data).index(b"versicolor")  # labels.txt's bytes, same size after the change
    data[at : at + 10] = b"VERSICOLOR"
    src.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match=r"labels\.txt"):
        add_signature(src, generate_private_key(), src)
    assert src.read_bytes() == bytes(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.mfb", "m"]


def test_signing_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mfb"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError):
        add_signature(junk, generate_private_key(), tmp_path / "out.mfb")
    assert not (tmp_path / "out.mfb").exists()
