"""Pure and local pieces of the agent: variants, versions, the metrics buffer, the store,
the TFLite runtime, Prometheus output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.exceptions import UpdateError
from agent.host.failpoints import Failpoints
from agent.report.buffer import MetricsBuffer
from agent.serving.runtime import TFLiteModel, check_feeds
from agent.storage.blobs import LocalStore
from agent.update.variants import choose_variant, providers_for
from bench.devkit.models import SMOKE_INPUT, iris_reference, iris_tflite
from protocol.manifest import FileEntry, Manifest, TensorSpec
from protocol.versions import compare_versions

D = "sha256:" + "1" * 64
SPEC = (TensorSpec("x", "FP32", (-1, 4)),)


def manifest(*files: FileEntry) -> Manifest:
    return Manifest("m", "1", "onnx", "2026-01-01T00:00:00Z", files, SPEC, SPEC)


CUDA = FileEntry("v/cuda.onnx", D, 1, "x", "model", "cuda-fp16", {"accelerator": "cuda"})
ARM = FileEntry("v/arm.onnx", D, 1, "x", "model", "arm-int8", {"arch": "aarch64"})
CPU = FileEntry("model.onnx", D, 1, "x", "model", "default")


def test_variant_choice_follows_preference_and_hardware() -> None:
    m = manifest(CUDA, ARM, CPU)
    gpu_box = {"accelerators": ["cuda"], "arch": "x86_64"}
    assert choose_variant(m, gpu_box) is CUDA
    assert providers_for(CUDA, gpu_box, allow_cuda=True)[0] == "CUDAExecutionProvider"
    assert providers_for(CUDA, gpu_box, allow_cuda=False) == ["CPUExecutionProvider"]
    assert choose_variant(m, {"accelerators": [], "arch": "aarch64"}) is ARM
    assert choose_variant(m, {"accelerators": [], "arch": "x86_64"}) is CPU
    assert providers_for(CPU, {"accelerators": []}, allow_cuda=True) == ["CPUExecutionProvider"]


def test_no_variant_fits() -> None:
    with pytest.raises(UpdateError, match="cuda-fp16 needs accelerator=cuda"):
        choose_variant(manifest(CUDA), {"accelerators": []})
    odd = FileEntry("m.onnx", D, 1, "x", "model", "odd", {"quantum": "yes"})
    with pytest.raises(UpdateError, match="quantum"):
        choose_variant(manifest(odd), {"quantum": "yes"})  # unknown requirements never match


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ("1.10.0", "1.9.0", 1),
        ("2.0.0", "2.0.0-rc1", 1),
        ("2.0.0-rc1", "2.0.0-rc2", -1),
        ("1.0.0+build7", "1.0.0", 0),
        ("1.0", "1.0.1", -1),
        ("v2", "v10", -1),
    ],
)
def test_version_order(a: str, b: str, want: int) -> None:
    assert compare_versions(a, b) == want


def test_metrics_buffer_keeps_seq_across_reopen_and_drops_oldest(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    buf = MetricsBuffer(path, max_batches=3)
    seqs = [buf.append(lambda seq, dropped: {"seq": seq, "dropped": dropped}) for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert buf.pending() == 3 and buf.dropped() == 2
    oldest = buf.oldest()
    assert oldest is not None and oldest[0] == 3
    buf.ack(3)
    buf.close()
    buf = MetricsBuffer(path, max_batches=3)
    assert buf.append(lambda seq, dropped: {"seq": seq, "dropped": dropped}) == 6
    oldest = buf.oldest()
    assert oldest is not None and oldest == (4, {"seq": 4, "dropped": 0})
    last = None
    while (item := buf.oldest()) is not None:
        last = item
        buf.ack(item[0])
    assert last is not None and last[1] == {"seq": 6, "dropped": 2}
    buf.close()


def test_store_prune_keeps_shared_blobs(tmp_path: Path) -> None:
    import base64
    import json

    from protocol.digest import sha256_digest

    store = LocalStore(tmp_path)

    def install(content: list[bytes]) -> str:
        files = []
        for i, data in enumerate(content):
            d = sha256_digest(data)
            store.partial_path(d).write_bytes(data)
            store.commit_partial(d, len(data))
            files.append(FileEntry(f"f{i}", d, len(data), "x", "model" if i == 0 else "data"))
        m = manifest(*files)
        env = json.dumps(
            {
                "payloadType": "t",
                "payload": base64.b64encode(m.to_bytes()).decode(),
                "signatures": [{"keyid": "", "sig": ""}],
            }
        ).encode()
        digest = sha256_digest(m.to_bytes())
        store.save_manifest(digest, env)
        return digest

    shared = b"shared"
    v1 = install([b"one", shared])
    v2 = install([b"two", shared])
    assert store.prune({v2}) == 1
    assert store.load_manifest(v1) is None and store.load_manifest(v2) is not None
    assert not store.has_blob(sha256_digest(b"one"))
    assert store.has_blob(sha256_digest(shared)) and store.has_blob(sha256_digest(b"two"))
    with pytest.raises(ValueError, match="digest"):
        bad = sha256_digest(b"expected")
        store.partial_path(bad).write_bytes(b"tampered")
        store.commit_partial(bad, 8)
    assert not store.partial_path(bad).exists()


def test_tflite_runtime_matches_numpy(tmp_path: Path) -> None:
    p = tmp_path / "m.tflite"
    p.write_bytes(iris_tflite(0))
    m = TFLiteModel(p)
    assert m.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
    np.testing.assert_allclose(
        m.run({"x": SMOKE_INPUT})["probs"], iris_reference(SMOKE_INPUT), atol=1e-5
    )
    assert m.run({"x": SMOKE_INPUT[:1]})["probs"].shape == (1, 3)  # resized back
    check_feeds(m, {"x": SMOKE_INPUT})


def test_tflite_garbage_is_an_update_error(tmp_path: Path) -> None:
    p = tmp_path / "m.tflite"
    p.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(UpdateError, match="TFLite"):
        TFLiteModel(p)


def test_unknown_failpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown failpoint"):
        Failpoints(["nope"])
    Failpoints(["download-midway"]).hit("blob-committed")  # another point: nothing happens


async def test_token_bucket_holds_downloads_to_the_rate() -> None:
    import time

    from agent.update.ratelimit import TokenBucket

    bucket = TokenBucket(1_000_000)  # 1 MB/s, with a burst of one second's worth
    t0 = time.monotonic()
    for _ in range(24):
        await bucket.consume(62_500)  # 1.5 MB in all
    # A lower bound only: however slow the machine, the limit cannot be beaten.
    assert time.monotonic() - t0 >= 0.45


def test_inference_port_binds_loopback_unless_configured() -> None:
    from agent.settings import merge, serve_address

    assert serve_address(merge({}, {})["serve"]) == ("127.0.0.1", 8510)
    assert serve_address(merge({"serve": "0.0.0.0:9000"}, {})["serve"]) == ("0.0.0.0", 9000)


def test_the_agent_process_does_not_import_the_server_stack() -> None:
    """`modelfleet agent run` loads the CLI of every group; the control plane's database stack
    (SQLAlchemy, about 30 MB resident) must stay out of the agent's memory."""
    import subprocess
    import sys

    code = (
        "import sys, control_plane.cli, agent.cli, agent.daemon; "
        "print(sorted(m for m in ('sqlalchemy', 'alembic', 'asyncpg', 'boto3') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out == "[]", out


def test_agent_credentials_are_stored_as_salted_scrypt() -> None:
    """control_plane/security/auth.py: what a stolen copy of the database holds."""
    import hashlib

    from control_plane.security.auth import check_credential, credential_lookup, hash_credential

    secret = "mfc_" + "s" * 43
    a, b = hash_credential(secret), hash_credential(secret)
    assert a.startswith("scrypt$12$8$1$") and a != b  # a fresh salt each time
    sha = hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in a and sha not in a and credential_lookup(secret) == sha[:16]
    assert check_credential(secret, a) and check_credential(secret, b)
    assert not check_credential(secret + "x", a)
    assert check_credential(secret, sha)  # stored by an older version: still verifies
    assert not check_credential(secret + "x", sha)
    c = hash_credential(secret, 14)  # a cost raised later: stored with the hash
    assert c.startswith("scrypt$14$") and check_credential(secret, c)
    huge = "scrypt$30" + a[len("scrypt$12") :]  # a planted row must not cost 2^30
    for bad in ("revoked:" + "0" * 48, "scrypt$12$8$1$!!$!!", "scrypt$99", "", a[:-4], huge):
        assert not check_credential(secret, bad), bad


class _Fixed:
    """A runtime stand-in that answers one fixed output (what score_with_shadow reads)."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value
        self.outputs = (TensorSpec("y", "FP32", (-1, 3)),)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": self.value}


def test_shadow_drift_of_non_finite_or_huge_outputs_stays_reportable() -> None:
    from agent.serving.shadow import score_with_shadow
    from protocol.reports import MAX_DRIFT

    feeds = {"x": np.zeros((1, 4), np.float32)}
    live = _Fixed(np.array([[0.1, 0.7, 0.2]], np.float32))
    _, _, drift, agree = score_with_shadow(live, _Fixed(live.value + 0.1), feeds)
    assert drift == pytest.approx(0.1) and agree
    # A NaN output cannot be compared: no drift (a NaN would get the batch refused).
    nan = _Fixed(np.array([[np.nan, 0.7, 0.2]], np.float32))
    assert score_with_shadow(live, nan, feeds)[2:] == (None, False)
    huge = _Fixed(np.array([[3e38, -3e38, 3e38]], np.float32))
    assert score_with_shadow(live, huge, feeds)[2] == MAX_DRIFT


class _RaisesKeyError:
    """A runtime whose inference raises KeyError (as a runtime's own bug might)."""

    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("y", "FP32", (-1, 3)),)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise KeyError("y")


async def test_a_runtime_key_error_is_an_inference_failure_not_a_missing_model(
    tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from datetime import UTC, datetime

    from agent.config import AgentConfig
    from agent.exceptions import ModelNotLoaded
    from agent.report.metrics import MetricsRecorder
    from agent.serving.runtime import LoadedModel
    from agent.serving.table import ServingTable

    with ThreadPoolExecutor(1) as pool:
        table = ServingTable(
            config=AgentConfig(state_dir=tmp_path),
            executor=pool,
            metrics=MetricsRecorder(datetime.now(UTC)),
            on_rolled_back=lambda _: None,
        )
        table.models["m"] = LoadedModel("m", "1.0.0", D, _RaisesKeyError())  # type: ignore[arg-type]
        feeds = {"x": np.zeros((1, 4), np.float32)}
        with pytest.raises(ModelNotLoaded):
            await table.infer("absent", feeds)
        with pytest.raises(KeyError):  # reaches the serve app's 500 branch, not its 404
            await table.infer("m", feeds)
