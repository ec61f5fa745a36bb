"""The REST data plane with Triton's own client: JSON and binary tensors, BYTES, versions,
model config and per-model statistics, against a real agent serving real models."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.daemon import Agent
from bench.devkit.models import strings_onnx, tile_onnx
from control_plane.catalog.build import build_bundle
from protocol.bundle import read_bundle
from protocol.execution import Batching, Execution
from tests.support.agents import enroll_agent, eventually, running_agent
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane
from tests.support.fleet import run_cli
from tests.support.pki import make_pki

httpclient = pytest.importorskip("tritonclient.http.aio", reason="tritonclient[http] not installed")
InferInput = httpclient.InferInput
InferRequestedOutput = httpclient.InferRequestedOutput
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException
TILE = {"channels": 3, "size": 32, "repeat": 1}  # x[N,3,32,32] -> the same


@asynccontextmanager
async def serving(
    cp: ControlPlane,
    publisher: Publisher,
    tmp_path: Path,
    execution: Execution | None = None,
    **overrides: Any,
) -> AsyncIterator[Agent]:
    """An agent serving iris, an image-shaped model (run as ``execution`` says) and a strings
    model, with these AgentConfig overrides."""
    tile, _ = build_bundle(tile_onnx(**TILE), "tile", "1.0.0", [publisher.key], execution=execution)
    strings, _ = build_bundle(strings_onnx(), "strings", "1.0.0", [publisher.key])
    for bundle in (iris_bundle(publisher.key), tile, strings):
        r = await cp.push(bundle)
        assert r.status == 201, await r.text()
    await enroll_agent(cp, tmp_path / "a1", {"site": "edge"})
    async with running_agent(tmp_path / "a1", **overrides) as agent:
        for model in ("iris", "tile", "strings"):
            await cp.rollout(model=model)
        await eventually(lambda: {"iris", "tile", "strings"} <= set(agent.models))
        yield agent


@asynccontextmanager
async def triton(agent: Agent) -> AsyncIterator[Any]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{agent.serve_port}")
    try:
        yield client
    finally:
        await client.close()


def image_input(x: np.ndarray, binary: bool) -> Any:
    inp = InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


@pytest.mark.parametrize("binary", [False, True])
async def test_triton_client_json_and_binary_get_the_models_answer(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, binary: bool
) -> None:
    async with serving(cp_sqlite, publisher, tmp_path) as agent, triton(agent) as client:
        meta = await client.get_server_metadata()
        assert "binary_tensor_data" in meta["extensions"]
        x = np.random.default_rng(3).normal(size=(2, 3, 32, 32)).astype(np.float32)
        out = InferRequestedOutput("y", binary_data=binary)
        result = await client.infer("tile", [image_input(x, binary)], outputs=[out])
        assert np.array_equal(result.as_numpy("y"), x)
        response = result.get_response()
        assert response["model_name"] == "tile"
        assert ("parameters" in response["outputs"][0]) == binary
        # The versioned route is the same model; another version is not served.
        result = await client.infer(
            "tile", [image_input(x[:1], binary)], model_version="1.0.0", request_id="r7"
        )
        assert np.array_equal(result.as_numpy("y"), x[:1])
        assert result.get_response()["id"] == "r7"
        with pytest.raises(InferenceServerException, match=r"'2\.0\.0'"):
            await client.infer("tile", [image_input(x[:1], binary)], model_version="2.0.0")


@pytest.mark.parametrize("binary", [False, True])
async def test_bytes_tensors_both_ways(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, binary: bool
) -> None:
    async with serving(cp_sqlite, publisher, tmp_path) as agent, triton(agent) as client:
        words = np.array(["cat", "", "n\u00e9ant", "x" * 300], dtype=object)
        inp = InferInput("s", [4], "BYTES")
        inp.set_data_from_numpy(words, binary_data=binary)
        out = InferRequestedOutput("t", binary_data=binary)
        result = await client.infer("strings", [inp], outputs=[out])
        got = result.as_numpy("t")
        assert [v.decode() if isinstance(v, bytes) else v for v in got] == list(words)


async def test_config_versions_and_per_model_stats(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async with serving(cp_sqlite, publisher, tmp_path) as agent, triton(agent) as client:
        x = np.ones((1, 3, 32, 32), np.float32)
        for _ in range(3):
            await client.infer("tile", [image_input(x, True)])
        base = f"http://127.0.0.1:{agent.serve_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/v2/models/tile/versions/1.0.0/config") as r:
                assert r.status == 200
                config = await r.json()
            assert config["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
            assert (config["max_batch_size"], config["instance_count"]) == (0, 1)
            async with s.get(f"{base}/v2/models/tile/versions/9.9.9/ready") as r:
                assert r.status == 503
            async with s.get(f"{base}/v2/models/tile/versions/1.0.0") as r:
                assert (await r.json())["versions"] == ["1.0.0"]
            async with s.get(f"{base}/metrics") as r:
                text = await r.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("queue_seconds", "compute_seconds", "batch_size"):
            counts = [
                s.value
                for s in families[f"modelfleet_inference_{name}"].samples
                if s.name.endswith("_count") and s.labels["model"] == "tile"
            ]
            assert counts == [3], name


async def metric_samples(port: int, family: str, model: str, **kw: Any) -> dict[str, float]:
    """The samples of one /metrics family for one model, by sample name."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics", **kw) as r:
        text = await r.text()
    for f in text_string_to_metric_families(text):
        if f.name == family:
            return {
                x.name: x.value
                for x in f.samples
                if x.labels.get("model") == model and "le" not in x.labels
            }
    return {}


@pytest.mark.parametrize("override", [None, Execution(batching=Batching(0))])
async def test_batching_from_the_manifest_joins_requests_unless_the_agent_turns_it_off(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, override: Execution | None
) -> None:
    asked = Execution(batching=Batching(8, 200.0), instances=2, warmup_requests=1)
    overrides = {"tile": override} if override else {}
    async with (
        serving(cp_sqlite, publisher, tmp_path, asked, model_execution=overrides) as agent,
        triton(agent) as client,
    ):
        assert agent.serve_port
        images = np.random.default_rng(5).normal(size=(8, 1, 3, 32, 32)).astype(np.float32)
        results = await asyncio.gather(
            *(client.infer("tile", [image_input(x, True)]) for x in images)
        )
        for x, result in zip(images, results, strict=True):
            assert np.array_equal(result.as_numpy("y"), x)  # each its own rows back
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{agent.serve_port}/v2/models/tile/config"
            async with s.get(url) as r:
                config = await r.json()
        facts = next(f for f in agent.status_report().facts["serving"] if f["model"] == "tile")
        assert (facts["instances"], config["instance_count"]) == (2, 2)
        assert facts["warmupRequests"] == 1
        sizes = await metric_samples(agent.serve_port, "modelfleet_inference_batch_size", "tile")
        assert sizes["modelfleet_inference_batch_size_count"] == 8
        if override is None:
            assert config["max_batch_size"] == facts["maxBatchSize"] == 8
            assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 200_000
            # The eight requests arrived within the 200 ms delay: batches of more than one.
            assert sizes["modelfleet_inference_batch_size_sum"] > 8
        else:
            assert config["max_batch_size"] == facts["maxBatchSize"] == 0
            assert "dynamic_batching" not in config
            assert sizes["modelfleet_inference_batch_size_sum"] == 8


async def test_tokens_and_mutual_tls_guard_the_inference_port(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    token = "k" * 32
    async with serving(
        cp_sqlite,
        publisher,
        tmp_path,
        serve_tokens=(token,),
        serve_cert_file=str(pki["server_cert"]),
        serve_key_file=str(pki["server_key"]),
        serve_client_ca_file=str(pki["ca"]),
    ) as agent:
        base = f"https://127.0.0.1:{agent.serve_port}"
        trusting = ssl.create_default_context(cafile=str(pki["ca"]))
        client = ssl.create_default_context(cafile=str(pki["ca"]))
        client.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
        body = {"inputs": [x]}
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/v2/health/ready", ssl=client) as r:
                assert r.status == 200  # probes need no token
            async with s.post(f"{base}/v2/models/iris/infer", json=body, ssl=client) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
            bad = {"Authorization": "Bearer " + "j" * 32}
            async with s.get(f"{base}/metrics", headers=bad, ssl=client) as r:
                assert r.status == 401
            async with s.post(
                f"{base}/v2/models/iris/infer", json=body, headers=auth, ssl=client
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["outputs"][0]["shape"] == [1, 3]
            with pytest.raises(aiohttp.ClientError):  # no client certificate
                async with s.get(f"{base}/v2/health/live", ssl=trusting) as r:
                    await r.read()


async def test_bundle_build_signs_the_execution_section(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(tile_onnx(**TILE))
    await run_cli("keys", "generate", "--out", tmp_path / "pub")
    execution = {"batching": {"maxBatchSize": 4, "maxQueueDelayMs": 1}, "instances": 2}
    (tmp_path / "execution.json").write_text(json.dumps(execution))
    out = tmp_path / "tile.mfb"
    build = ["bundle", "build", tmp_path / "model.onnx", "--name", "tile", "--version", "1.0.0"]
    build += ["--key", tmp_path / "pub.key", "--out", out]
    done = await run_cli(*build, "--execution", tmp_path / "execution.json")
    assert done.returncode == 0, done.stderr
    with out.open("rb") as f:
        manifest = read_bundle(f).manifest
    assert manifest.execution == Execution(batching=Batching(4, 1.0), instances=2)
    (tmp_path / "execution.json").write_text(json.dumps({"instances": 0}))
    done = await run_cli(*build, "--execution", tmp_path / "execution.json")
    assert done.returncode != 0 and "execution.instances" in done.stderr, done.stderr


async def test_malformed_binary_framing_is_400_naming_the_field_and_serving_goes_on(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async with serving(cp_sqlite, publisher, tmp_path) as agent:
        url = f"http://127.0.0.1:{agent.serve_port}/v2/models/tile/infer"
        x = np.ones((1, 3, 32, 32), np.float32)

        def framed(size: int, shape: list[int], raw: bytes) -> tuple[bytes, int]:
            spec = {"name": "x", "shape": shape, "datatype": "FP32"}
            spec["parameters"] = {"binary_data_size": size}
            head = json.dumps({"inputs": [spec]}).encode()
            return head + raw, len(head)

        good, n = framed(x.nbytes, [1, 3, 32, 32], x.tobytes())
        cases = [
            # (body, the header's value, a fragment the error must hold)
            (good, len(good) + 1, "longer than the body"),
            (good, "-4", "Inference-Header-Content-Length must be"),
            (*framed(x.nbytes + 4, [1, 3, 32, 32], x.tobytes()), "runs past the end"),
            (*framed(x.nbytes - 4, [1, 3, 32, 32], x.tobytes()), "add up to"),
            (*framed(x.nbytes, [1, 3, 32, 31], x.tobytes()), "needs 11904 bytes"),
            (good, n - 3, "not JSON"),
        ]
        async with aiohttp.ClientSession() as s:
            for body, header, fragment in cases:
                hdr = {"Inference-Header-Content-Length": str(header)}
                async with s.post(url, data=body, headers=hdr) as r:
                    assert r.status == 400, (fragment, await r.text())
                    assert fragment in (await r.json())["error"], fragment
            hdr = {"Inference-Header-Content-Length": str(n)}
            async with s.post(url, data=good, headers=hdr) as r:
                assert r.status == 200
                assert np.array_equal(
                    np.array((await r.json())["outputs"][0]["data"], np.float32), x.ravel()
                )
