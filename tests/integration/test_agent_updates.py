"""The agent under updates: zero downtime, rollback protection, on-device rollback, offline
buffering, cut downloads, disk budget, pruning, TFLite, variants, several models."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from bench.devkit.models import iris_model, iris_tflite
from bench.devkit.proxies import CuttingProxy
from control_plane.catalog.build import Variant
from tests.support.agents import Load, enroll_agent, eventually, infer, running_agent, wait_active
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane, start_control_plane, stored_requests


async def agent_model(cp: ControlPlane, agent_id: str, version: str) -> dict | None:
    a = await (await cp.call("GET", f"/agents/{agent_id}")).json()
    return next((m for m in a["models"] if m["version"] == version), None)


async def wait_state(cp: ControlPlane, agent_id: str, version: str, state: str) -> dict:
    async def check() -> dict | None:
        m = await agent_model(cp, agent_id, version)
        return m if m and m["state"] == state else None

    return await eventually(check)


async def test_zero_downtime_up_and_back(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        assert agent.serve_port
        async with Load(agent.serve_port) as load:
            await asyncio.sleep(0.2)
            await cp.rollout("2.0.0", "site=x")
            await wait_active(cp, ident.agent_id, "2.0.0")
            await asyncio.sleep(0.2)
            await cp.rollout("1.0.0", "site=x", rollback=True)
            await wait_active(cp, ident.agent_id, "1.0.0")
            await asyncio.sleep(0.2)
        assert load.failures == [] and load.transport_errors == 0
        assert set(load.statuses) == {200} and load.ok > 50
        assert load.versions == {"1.0.0", "2.0.0"}


async def test_rollback_protection(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout("2.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "2.0.0")
    # Across a restart the agent still knows 2.0.0 was the highest it ran.
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout("1.0.0", "site=x")
        m = await wait_state(cp, ident.agent_id, "1.0.0", "refused")
        assert "lower than 2.0.0" in m["reason"]
        assert (await infer(agent.serve_port))[1]["model_version"] == "2.0.0"  # type: ignore[arg-type]
        await cp.rollout("1.0.0", "site=x", rollback=True)
        await wait_active(cp, ident.agent_id, "1.0.0")
        assert agent.state.highest_versions["iris"] == "1.0.0"


async def test_health_window_rolls_back_a_version_that_fails_live(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    await cp.push(iris_bundle(publisher.key, "1.0.0"))
    # 2.0.0 answers single rows (its smoke test passes) but fails on every batch.
    bad = iris_model(seed=1, fail_on_batches=True)
    await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1, model=bad, smoke_rows=1))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    batch = {
        "inputs": [
            {
                "name": "x",
                "shape": [2, 4],
                "datatype": "FP32",
                "data": [5.1, 3.5, 1.4, 0.2, 6.7, 3.0, 5.2, 2.3],
            }
        ]
    }
    async with running_agent(
        tmp_path / "a", health_window_s=60, health_min_requests=10, health_max_error_rate=0.2
    ) as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        await cp.rollout("2.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "2.0.0")
        codes = [(await infer(agent.serve_port, body=batch))[0] for _ in range(15)]  # type: ignore[arg-type]
        assert codes[:10] == [500] * 10 and codes[10:] == [200] * 5
        m = await wait_state(cp, ident.agent_id, "2.0.0", "failed")
        assert "rolled back" in m["reason"] and "10 of 10" in m["reason"]
        status, out = await infer(agent.serve_port, body=batch)  # type: ignore[arg-type]
        assert status == 200 and out["model_version"] == "1.0.0"
        await asyncio.sleep(1.0)  # not retried while the desired state stays the same
        assert agent.models["iris"].version == "1.0.0"
        assert agent.state.active["iris"]["version"] == "1.0.0"


async def test_offline_buffer_loses_and_doubles_nothing(
    tmp_path: Path, publisher: Publisher
) -> None:
    from tests.support.control_plane import cp_config

    config = cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)
    cp = await start_control_plane(config)
    port = cp.client.port
    await cp.push(iris_bundle(publisher.key))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a", metrics_interval_s=0.2) as agent:
        await cp.rollout("1.0.0", "site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
        async with Load(agent.serve_port) as load:  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            await cp.client.close()  # the control plane goes away under load
            await eventually(lambda: agent.counters["pending_batches"] >= 3)
            await asyncio.sleep(0.5)
            cp = await start_control_plane(config, port=port)
            await asyncio.sleep(0.5)
        assert load.failures == [] and load.transport_errors == 0
        served = load.ok
    # Leaving the agent flushed the last window; the control plane holds every request once.
    assert await stored_requests(cp) == served
    assert (tmp_path / "a" / "metrics-buffer.db").exists()
    await cp.client.close()


async def test_cut_download_resumes_without_fetching_twice(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    big = iris_model(seed=0, pad_bytes=4_000_000)
    await cp.push(iris_bundle(publisher.key, "1.0.0", model=big, smoke_rows=1))  # three blobs
    async with CuttingProxy(cp.url, cut_after=1_500_000) as proxy:
        ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"}, server=proxy.url)
        async with running_agent(tmp_path / "a", max_concurrent_downloads=1) as agent:
            await cp.rollout("1.0.0", "site=x")
            await wait_active(cp, ident.agent_id, "1.0.0")
            assert agent.counters["downloads"] == 3
    assert proxy.cuts == 1
    resumed = [r for r in proxy.blob_requests if r is not None]
    assert len(proxy.blob_requests) == 4 and len(resumed) == 1 and resumed[0].startswith("bytes=")
    assert proxy.max_inflight == 1  # --max-concurrent-downloads 1
    assert len(big) <= proxy.blob_bytes_sent < len(big) * 1.1


async def test_disk_budget_and_pruning(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    for i, v in enumerate(("1.0.0", "2.0.0", "3.0.0")):
        await cp.push(iris_bundle(publisher.key, v, seed=i))
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a", keep_versions=1) as agent:
        for v in ("1.0.0", "2.0.0", "3.0.0"):
            await cp.rollout(v, "site=x")
            await wait_active(cp, ident.agent_id, v)
        installed = {p.name for p in agent.store.manifests.iterdir()}
        assert len(installed) == 2  # 3.0.0 and the one before it, for rollback
        assert agent.store.load_manifest(agent.models["iris"].manifest_digest) is not None
    big = iris_model(seed=5, pad_bytes=1_000_000)
    await cp.push(iris_bundle(publisher.key, "4.0.0", model=big, smoke=False))
    async with running_agent(tmp_path / "a", disk_budget_bytes=200_000) as agent:
        await cp.rollout("4.0.0", "site=x")
        m = await wait_state(cp, ident.agent_id, "4.0.0", "failed")
        assert "disk budget" in m["reason"]
        assert (await infer(agent.serve_port))[1]["model_version"] == "3.0.0"  # type: ignore[arg-type]


async def test_tflite_and_onnx_models_side_by_side_with_variants(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cp = cp_sqlite
    cuda = Variant("cuda-fp16", iris_model(seed=0), {"accelerator": "cuda"})
    await cp.push(iris_bundle(publisher.key, "1.0.0", variants=(cuda,)))
    await cp.push(
        iris_bundle(
            publisher.key, "1.0.0", name="iris-lite", model=iris_tflite(0), runtime="tflite"
        )
    )
    ident = await enroll_agent(cp, tmp_path / "a", {"site": "x"})
    async with running_agent(tmp_path / "a") as agent:
        await cp.rollout("1.0.0", "site=x")
        await cp.rollout("1.0.0", "site=x", model="iris-lite")

        async def both() -> bool:
            a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
            return {m["name"] for m in a["models"] if m["state"] == "active"} == {
                "iris",
                "iris-lite",
            }

        await eventually(both)
        port = agent.serve_port
        s1, onnx_out = await infer(port, "iris")  # type: ignore[arg-type]
        s2, lite_out = await infer(port, "iris-lite")  # type: ignore[arg-type]
        assert s1 == s2 == 200
        assert abs(onnx_out["outputs"][0]["data"][0] - lite_out["outputs"][0]["data"][0]) < 1e-5
        a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
        variants = {m["name"]: m.get("variant") for m in a["models"]}
        assert variants == {"iris": "default", "iris-lite": "default"}  # no CUDA here
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/v2/models/iris-lite") as r:
                meta = await r.json()
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                prom = await r.text()
        assert meta["platform"] == "tflite" and meta["inputs"][0]["shape"] == [-1, 4]
        assert 'modelfleet_inference_requests_total{model="iris",version="1.0.0"} 1' in prom
        assert (
            'modelfleet_inference_latency_seconds_count{model="iris-lite",version="1.0.0"} 1'
            in prom
        )
        assert "modelfleet_desired_generation 2" in prom
        assert 'le="+Inf"' in prom
