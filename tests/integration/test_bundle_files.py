"""Multi-file bundles on a real agent: external data resolved in the version's directory, an
auxiliary labels file read by post-processing, a flipped byte, and the disk and memory plans
refusing a second version cleanly while the first keeps serving."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import aiohttp
import numpy as np

from bench.devkit.models import SMOKE_INPUT, iris_reference, write_external_iris
from control_plane.catalog.build import build_bundle
from tests.support.agents import enroll_agent, eventually, infer, running_agent, wait_active
from tests.support.bundles import Publisher, npy
from tests.support.control_plane import ControlPlane

LABELS = ["setosa", "versicolor", "virginica"]


def external_bundle(
    publisher: Publisher, root: Path, version: str, seed: int, pad_bytes: int = 3000
) -> bytes:
    """iris with its weights in three external data files, a labels file and a smoke test."""
    d = root / version
    write_external_iris(d, seed=seed, pad_bytes=pad_bytes, shards=2)
    files = {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    files["labels.txt"] = "\n".join(LABELS).encode()
    model = files.pop("model.onnx")
    smoke = (npy(SMOKE_INPUT), npy(iris_reference(SMOKE_INPUT, seed)))
    data, _ = build_bundle(model, "iris", version, [publisher.key], smoke, files=files)
    return data


async def model_state(cp: ControlPlane, agent_id: str, version: str, state: str) -> dict:
    async def check() -> dict | None:
        a = await (await cp.call("GET", f"/agents/{agent_id}")).json()
        m = next((m for m in a["models"] if m["version"] == version), None)
        return m if m and m["state"] == state else None

    return await eventually(check)


def post_process(probs: list[float], labels_file: Path) -> str:
    """What a deployment's post-processing does: the class name from the labels file."""
    labels = labels_file.read_text().splitlines()
    return labels[int(np.argmax(probs))]


async def test_external_data_and_labels_from_the_version_directory(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    r = await cp.push(external_bundle(publisher, tmp_path / "src", "1.0.0", seed=4))
    digest = (await r.json())["manifestDigest"]
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        row = SMOKE_INPUT[1:2]
        body = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": row[0].tolist()}]
        }
        status, out = await infer(agent.serve_port, body=body)  # type: ignore[arg-type]
        assert status == 200
        probs = out["outputs"][0]["data"]
        assert np.allclose(probs, iris_reference(row, 4)[0], atol=1e-5)
        vdir = agent.store.version_dir(digest)
        assert agent.serving.get("iris").directory == vdir  # type: ignore[union-attr]
        want = LABELS[int(np.argmax(iris_reference(row, 4)[0]))]
        assert post_process(probs, vdir / "labels.txt") == want
        # The serving API names the labels file by digest: a client can check it has the same.
        url = f"http://127.0.0.1:{agent.serve_port}/v2/models/iris"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            meta = await r.json()
        labels = (vdir / "labels.txt").read_bytes()
        assert meta["files"] == [
            {
                "path": "labels.txt",
                "digest": "sha256:" + hashlib.sha256(labels).hexdigest(),
                "size": len(labels),
            }
        ]
        # Laid out by path, each file a link to its blob: the weights are on disk once.
        weights = sorted(p.relative_to(vdir).as_posix() for p in (vdir / "weights").iterdir())
        assert weights == ["weights/core.bin", "weights/shard-0.bin", "weights/shard-1.bin"]
        for p in (vdir / "weights").iterdir():
            assert os.stat(p).st_nlink == 2
        blobs = sum(p.stat().st_size for p in agent.store.blobs.iterdir())
        assert agent.store.used_bytes() == blobs


async def test_aux_file_flipped_on_disk_refuses_the_load(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(external_bundle(publisher, tmp_path / "src", "1.0.0", seed=1))
    await cp.push(external_bundle(publisher, tmp_path / "src", "2.0.0", seed=2))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        # 2.0.0 shares the labels file (same digest, stored once): flip one byte of it.
        labels = next(
            p for p in agent.store.blobs.iterdir() if p.read_bytes().startswith(b"setosa")
        )
        data = bytearray(labels.read_bytes())
        data[0] ^= 0x01
        labels.write_bytes(bytes(data))
        await cp.rollout("2.0.0", "site=x")
        m = await model_state(cp, ident.agent_id, "2.0.0", "failed")
        assert m["reason"] == "stored file 'labels.txt' is corrupt"
        assert (await infer(agent.serve_port))[1]["model_version"] == "1.0.0"  # type: ignore[arg-type]


async def test_disk_budget_too_small_for_the_second_version(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(external_bundle(publisher, tmp_path / "src", "1.0.0", 1, pad_bytes=300_000))
    await cp.push(external_bundle(publisher, tmp_path / "src", "2.0.0", 2, pad_bytes=300_000))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a", disk_budget_bytes=500_000) as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        before = agent.counters["download_bytes"]
        await cp.rollout("2.0.0", "site=x")
        m = await model_state(cp, ident.agent_id, "2.0.0", "failed")
        assert "disk budget of 500000" in m["reason"]
        assert agent.counters["download_bytes"] == before  # refused before any byte
        assert list(agent.store.partial.iterdir()) == []
        assert (await infer(agent.serve_port))[1]["model_version"] == "1.0.0"  # type: ignore[arg-type]


async def test_too_little_memory_for_both_versions(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(external_bundle(publisher, tmp_path / "src", "1.0.0", 1, pad_bytes=300_000))
    await cp.push(external_bundle(publisher, tmp_path / "src", "2.0.0", 2, pad_bytes=300_000))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a", memory_limit_bytes=500_000) as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        await cp.rollout("2.0.0", "site=x")
        m = await model_state(cp, ident.agent_id, "2.0.0", "failed")
        assert m["reason"].startswith("not enough memory to load iris 2.0.0: it needs ~293.")
        assert "over the 488.3 KiB memory limit" in m["reason"]
        assert (await infer(agent.serve_port))[1]["model_version"] == "1.0.0"  # type: ignore[arg-type]
