"""gRPC Open Inference Protocol against a real agent (issue 15, item 2 and the gRPC half of 7).

A real agent daemon, enrolled with a real control plane, serves the iris model and an
image-shaped tile model on a gRPC port; Triton's own client (``tritonclient.grpc.aio``) is
the client, and hostile messages go through a bare gRPC channel with the agent's messages.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc
from tritonclient.utils import InferenceServerException

from agent.daemon import Agent
from agent.exceptions import AgentConfigError
from agent.serving.proto import grpc_predict_v2_pb2 as pb
from bench.devkit.models import iris_reference, tile_onnx
from control_plane.catalog.build import build_bundle
from tests.support.agents import enroll_agent, eventually, infer, running_agent
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane
from tests.support.pki import make_pki

TILE = {"channels": 3, "size": 8, "repeat": 2}  # x[N,3,8,8] -> y[N,6,8,8]
TOKEN = "grpc-test-token-0123456789"
ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@asynccontextmanager
async def serving(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Agent]:
    """An agent serving iris and the tile model over REST and gRPC."""
    tile, _ = build_bundle(tile_onnx(**TILE), "tile", "1.0.0", [publisher.key])
    for bundle in (iris_bundle(publisher.key), tile):
        r = await cp.push(bundle)
        assert r.status == 201, await r.text()
    await enroll_agent(cp, tmp_path / "a1", {"site": "edge"})
    settings = {"grpc_host": "127.0.0.1", "grpc_port": 0, **overrides}
    async with running_agent(tmp_path / "a1", **settings) as agent:
        await cp.rollout(model="iris")
        await cp.rollout(model="tile")
        await eventually(lambda: {"iris", "tile"} <= set(agent.models))
        yield agent


@asynccontextmanager
async def triton(agent: Agent, **kw: Any) -> AsyncIterator[tgrpc.InferenceServerClient]:
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{agent.grpc_port}", **kw)
    try:
        yield client
    finally:
        await client.close()


def iris_input(rows: np.ndarray = ROWS) -> tgrpc.InferInput:
    x = tgrpc.InferInput("x", list(rows.shape), "FP32")
    x.set_data_from_numpy(rows)
    return x


async def raw_infer(agent: Agent, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """ModelInfer through a bare channel: messages no well-behaved client would build."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        return await call(req, timeout=10)


def iris_request(**extra: Any) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(**{"model_name": "iris", **extra})
    if "inputs" not in extra:
        req.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    if "raw_input_contents" not in extra and not any(t.HasField("contents") for t in req.inputs):
        req.raw_input_contents.append(ROWS.tobytes())
    return req


async def test_triton_client_infers_and_reads_metadata(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async with serving(cp_sqlite, publisher, tmp_path) as agent, triton(agent) as client:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("iris")
        assert await client.is_model_ready("iris", "1.0.0")
        assert not await client.is_model_ready("iris", "9.9.9")
        assert not await client.is_model_ready("nope")
        meta = await client.get_server_metadata(as_json=True)
        assert meta["name"] == "modelfleet-agent"
        model = await client.get_model_metadata("iris", as_json=True)
        assert model["name"] == "iris"
        assert model["versions"] == ["1.0.0"]
        assert model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
        assert [o["name"] for o in model["outputs"]] == ["probs"]

        out = await client.infer("iris", [iris_input()], request_id="r-1")
        assert out.get_response().id == "r-1"
        assert out.get_response().model_version == "1.0.0"
        probs = out.as_numpy("probs")
        np.testing.assert_allclose(probs, iris_reference(ROWS), rtol=1e-5, atol=1e-6)
        # The same table answers REST: the same numbers, to the last bit JSON can carry.
        status, rest = await infer(agent.serve_port or 0)
        assert status == 200
        # (REST writes each FP32 as the shortest text that reads back as that float32.)
        assert np.array(rest["outputs"][0]["data"], np.float32).tolist() == probs[0].tolist()

        # An image-shaped model: a bigger answer, its layout kept.
        x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
        tin = tgrpc.InferInput("x", list(x.shape), "FP32")
        tin.set_data_from_numpy(x)
        y = (await client.infer("tile", [tin])).as_numpy("y")
        np.testing.assert_array_equal(y, np.tile(x, (1, 2, 1, 1)))

        # Typed contents (not raw) are accepted too; the answer is raw either way.
        req = iris_request(raw_input_contents=[])
        req.inputs[0].contents.fp32_contents.extend(ROWS.reshape(-1).tolist())
        typed = await raw_infer(agent, req)
        got = np.frombuffer(typed.raw_output_contents[0], dtype="<f4").reshape(2, 3)
        np.testing.assert_array_equal(got, probs)

        # Only the outputs asked for.
        asked = await client.infer(
            "iris", [iris_input()], outputs=[tgrpc.InferRequestedOutput("probs")]
        )
        np.testing.assert_array_equal(asked.as_numpy("probs"), probs)

        # The serving table counted the gRPC requests with the REST one, in /metrics.
        text = await _metrics(agent)
        line = 'modelfleet_inference_requests_total{model="iris",version="1.0.0"}'
        assert [ln for ln in text.splitlines() if ln.startswith(line)] == [f"{line} 4"], text


async def _metrics(agent: Agent) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{agent.serve_port}/metrics") as r,
    ):
        return await r.text()


def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> Any:
    req = pb.ModelInferRequest(model_name="iris")
    t = req.inputs.add(name="x", datatype=datatype, shape=shape)
    getattr(t.contents, field).extend(values)
    return req


# (what it is, request, status code, a fragment the message must hold)
HOSTILE: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]] = [
    (
        "raw bytes shorter than the shape",
        iris_request(raw_input_contents=[ROWS.tobytes()[:-4]]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents[0]: 28 bytes",
    ),
    (
        "raw entries that do not match the inputs",
        iris_request(raw_input_contents=[ROWS.tobytes(), b"x"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "raw_input_contents has 2 entries for 1 inputs",
    ),
    (
        "unknown datatype",
        iris_request(inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP8")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].datatype",
    ),
    (
        "no inputs",
        pb.ModelInferRequest(model_name="iris"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs",
    ),
    (
        "a shape of 2**80 values",
        iris_request(
            inputs=[
                pb.ModelInferRequest.InferInputTensor(
                    name="x", datatype="FP32", shape=[2**40, 2**40]
                )
            ]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "max_request_elements",
    ),
    (
        "a negative dimension",
        iris_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[-2, 4])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].shape",
    ),
    (
        "typed values that do not fill the shape",
        _typed("FP32", "fp32_contents", [1.0] * 7, [2, 4]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents.fp32_contents: 7 values",
    ),
    (
        "typed values in the wrong field",
        _typed("FP32", "int64_contents", [1] * 8, [2, 4]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].contents.int64_contents",
    ),
    (
        "a datatype the model does not take",
        _typed("FP64", "fp64_contents", [1.0] * 8, [2, 4]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x' has datatype FP64",
    ),
    (
        "a shape the model does not take",
        _typed("FP32", "fp32_contents", [1.0] * 10, [2, 5]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x' has shape [2, 5]",
    ),
    (
        "an input the model does not have",
        iris_request(
            inputs=[pb.ModelInferRequest.InferInputTensor(name="z", datatype="FP32", shape=[2, 4])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown input 'z'",
    ),
    (
        "an output the model does not have",
        iris_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "outputs[0].name",
    ),
    (
        "a model not loaded",
        iris_request(model_name="nope"),
        grpc.StatusCode.NOT_FOUND,
        "model 'nope'",
    ),
    (
        "a version not serving",
        iris_request(model_version="0.0.1"),
        grpc.StatusCode.NOT_FOUND,
        "version '0.0.1'",
    ),
    (
        "a message over max_request_bytes",
        iris_request(raw_input_contents=[b"\0" * 70_000]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
]


@pytest.mark.parametrize(("case", "req", "code", "fragment"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_malformed_requests_are_refused_naming_the_field(
    cp_sqlite: ControlPlane,
    publisher: Publisher,
    tmp_path: Path,
    case: str,
    req: pb.ModelInferRequest,
    code: grpc.StatusCode,
    fragment: str,
) -> None:
    async with serving(
        cp_sqlite, publisher, tmp_path, max_request_elements=1000, max_request_bytes=64 * 1024
    ) as agent:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw_infer(agent, req)
        assert err.value.code() == code, err.value.details()
        assert fragment in (err.value.details() or ""), err.value.details()
        # The agent goes on answering, on both ports.
        ok = await raw_infer(agent, iris_request())
        assert ok.model_name == "iris"
        assert (await infer(agent.serve_port or 0))[0] == 200


async def test_triton_client_sees_invalid_argument(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async with serving(cp_sqlite, publisher, tmp_path) as agent, triton(agent) as client:
        bad = tgrpc.InferInput("x", [2, 4], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 4), np.float32))
        bad._raw_content = bad._raw_content[:-1]  # a client that lies about its byte count
        with pytest.raises(InferenceServerException) as err:
            await client.infer("iris", [bad])
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "raw_input_contents[0]" in (err.value.message() or "")


@pytest.mark.parametrize("tokens", ["grpc_tokens", "serve_tokens"])
async def test_bearer_token_is_required_when_configured(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, tokens: str
) -> None:
    """With the gRPC port's own tokens, or with the serve port's (which guard both)."""
    async with (
        serving(cp_sqlite, publisher, tmp_path, **{tokens: (TOKEN,)}) as agent,
        triton(agent) as client,
    ):
        for headers in (None, {"authorization": "Bearer wrong-token-0123456789"}):
            # The health calls stay open, as REST's probes do.
            assert await client.is_server_live(headers=headers)
            assert await client.is_server_ready(headers=headers)
            for call in (
                client.infer("iris", [iris_input()], headers=headers),
                client.is_model_ready("iris", headers=headers),
                client.get_model_metadata("iris", headers=headers),
                client.get_server_metadata(headers=headers),
            ):
                with pytest.raises(InferenceServerException) as err:
                    await call
                assert err.value.status() == "StatusCode.UNAUTHENTICATED"
                assert "Bearer" in (err.value.message() or "")
        good = {"authorization": f"Bearer {TOKEN}"}
        out = await client.infer("iris", [iris_input()], headers=good)
        np.testing.assert_allclose(out.as_numpy("probs"), iris_reference(ROWS), rtol=1e-5)
        assert await client.is_model_ready("iris", headers=good)


@pytest.mark.parametrize("port", ["grpc", "serve"])
async def test_mutual_tls_refuses_a_client_without_a_certificate(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, port: str
) -> None:
    """With the gRPC port's own TLS files, or with the serve port's (which guard both)."""
    (tmp_path / "tls").mkdir()
    pki = make_pki(tmp_path / "tls")
    async with serving(
        cp_sqlite,
        publisher,
        tmp_path,
        **{
            f"{port}_cert_file": str(pki["server_cert"]),
            f"{port}_key_file": str(pki["server_key"]),
            f"{port}_client_ca_file": str(pki["ca"]),
        },
    ) as agent:
        url = f"127.0.0.1:{agent.grpc_port}"
        ca = str(pki["ca"])
        async with tgrpc.InferenceServerClient(
            url,
            ssl=True,
            root_certificates=ca,
            private_key=str(pki["client_key"]),
            certificate_chain=str(pki["client_cert"]),
        ) as client:
            out = await client.infer("iris", [iris_input()])
            np.testing.assert_allclose(out.as_numpy("probs"), iris_reference(ROWS), rtol=1e-5)
        for kw in ({"ssl": True, "root_certificates": ca}, {}):  # no certificate; no TLS
            async with tgrpc.InferenceServerClient(url, **kw) as client:
                with pytest.raises(InferenceServerException) as err:
                    await client.is_server_live(client_timeout=5)
                assert err.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.UNKNOWN")


async def test_grpc_off_without_the_extra_or_a_free_port(
    cp_sqlite: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await enroll_agent(cp_sqlite, tmp_path / "a1", {"site": "edge"})
    async with running_agent(tmp_path / "a1") as agent:
        assert agent.grpc_port is None  # off unless asked for
    # An address already taken: the agent does not start, and leaves nothing running.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="gRPC could not listen"):
            async with running_agent(tmp_path / "a1", grpc_host="127.0.0.1", grpc_port=port):
                pass
    # No grpc extra installed: the agent says which extra it needs.
    monkeypatch.setitem(sys.modules, "agent.serving.grpc", None)
    with pytest.raises(AgentConfigError, match=r"modelfleet\[grpc\]"):
        async with running_agent(tmp_path / "a1", grpc_host="127.0.0.1", grpc_port=0):
            pass


async def test_stopping_the_agent_drains_calls_in_flight(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    entered = threading.Event()
    async with serving(cp_sqlite, publisher, tmp_path) as agent:
        runtime: Any = agent.models["iris"].runtime
        run = runtime.run

        def slow_run(feeds: Any) -> Any:
            entered.set()
            time.sleep(1.0)  # in the worker thread: the call is in flight
            return run(feeds)

        runtime.run = slow_run
        port = agent.grpc_port
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        infer_call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        in_flight = asyncio.ensure_future(infer_call(iris_request(id="late"), timeout=20))
        assert await asyncio.to_thread(entered.wait, 15)
    # Leaving the agent waited for the call (drain_s is 2 s) and then closed the port.
    try:
        answer = await in_flight
    finally:
        await ch.close()
    assert answer.id == "late"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch2:
        call = ch2.unary_unary(
            "/inference.GRPCInferenceService/ServerLive",
            request_serializer=pb.ServerLiveRequest.SerializeToString,
            response_deserializer=pb.ServerLiveResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(pb.ServerLiveRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
