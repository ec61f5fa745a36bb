"""The agent's inference server against hostile requests and sockets (issue 13: 7, 9, 10).

A real agent daemon, enrolled with a real control plane, serves the iris model and a model
whose answer is four times its request; every hostile body is sent twice, small (decoded on
the event loop) and padded past ``inline_json_bytes`` (decoded in pieces in a worker thread),
and the agent must answer a normal request right after each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from agent.daemon import Agent
from bench.devkit.models import tile_onnx
from control_plane.catalog.build import build_bundle
from tests.support.agents import enroll_agent, eventually, infer, running_agent
from tests.support.bundles import Publisher, iris_bundle
from tests.support.control_plane import ControlPlane

INLINE = 1024  # bytes: bodies above this take the large-request path
MAX_BODY = 256 * 1024
TILE = {"channels": 1, "size": 4, "repeat": 4}  # x[N,1,4,4] -> y[N,4,4,4]


@asynccontextmanager
async def serving(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path, **overrides: Any
) -> AsyncIterator[Agent]:
    """An agent serving iris and the tile model, with these AgentConfig overrides."""
    tile, _ = build_bundle(tile_onnx(**TILE), "tile", "1.0.0", [publisher.key])
    for bundle in (iris_bundle(publisher.key), tile):
        r = await cp.push(bundle)
        assert r.status == 201, await r.text()
    await enroll_agent(cp, tmp_path / "a1", {"site": "edge"})
    async with running_agent(tmp_path / "a1", **overrides) as agent:
        await cp.rollout(model="iris")
        await cp.rollout(model="tile")
        await eventually(lambda: {"iris", "tile"} <= set(agent.models))
        yield agent


async def still_serving(agent: Agent) -> None:
    assert agent.serve_port
    status, out = await infer(agent.serve_port)
    assert status == 200, out


def request(data: Any, shape: list[int], **extra: Any) -> bytes:
    return json.dumps(
        {**extra, "inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": data}]}
    ).encode()


ROW = [5.1, 3.5, 1.4, 0.2]
# (what it is, body, status, a fragment the error must hold)
HOSTILE: list[tuple[str, bytes, int, str]] = [
    ("deep JSON", b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "nested too deeply"),
    (
        "1e999",
        request([1e308, 1, 1, 1], [1, 4]).replace(b"1e+308", b"1e999"),
        400,
        "input 'x': data holds a number too large",
    ),
    ("NaN in data", request([0, 1, 1, 1], [1, 4]).replace(b"[0,", b"[NaN,"), 400, "input 'x'"),
    (
        "-Infinity in data",
        request([0, 1, 1, 1], [1, 4]).replace(b"[0,", b"[-Infinity,"),
        400,
        "input 'x'",
    ),
    (
        "NaN elsewhere",
        request(ROW, [1, 4], parameters={"t": 0}).replace(b'"t": 0', b'"t": NaN'),
        400,
        "parameters.t",
    ),
    ("lone surrogate", request(ROW, [1, 4]).replace(b'"x"', b'"x\\ud800"'), 400, "inputs[0].name"),
    ("lone surrogate", request(ROW, [1, 4], id="r").replace(b'"r"', b'"\\udc00"'), 400, "id"),
    ("not UTF-8", request(ROW, [1, 4]).replace(b'"x"', b'"\xff"'), 400, "not JSON"),
    ("overflowing shape", request(ROW, [2**40, 2**40]), 413, "max_request_elements"),
    ("dimension past 64 bits", request(ROW, [2**64, 1]), 400, "shape"),
    ("negative dimension", request(ROW, [-1, 4]), 400, "shape"),
    ("too many values", request([ROW] * 300, [300, 4]), 413, "max_request_elements"),
    ("data/shape mismatch", request(ROW[:3], [1, 4]), 400, "3 values given"),
    ("data/shape mismatch", request([ROW, ROW[:3]], [2, 4]), 400, "input 'x'"),
    # An integer beyond 64 bits is a float (as orjson reads it); past a float's range it is
    # refused like 1e999.
    ("integer past a float", request([10**400, 1, 1, 1], [1, 4]), 400, "input 'x'"),
    (
        "integer text of 5000 digits",
        request([1, 1, 1, 1], [1, 4]).replace(b"[1,", b"[" + b"9" * 5000 + b","),
        400,
        "digits",
    ),
    ("strings as numbers", request(["5.1", "3.5", "1.4", "0.2"], [1, 4]), 400, "input 'x'"),
    ("body over the cap", b" " * (MAX_BODY + 1), 413, "max_request_bytes"),
    # Finite inputs whose answer is not: iris's logits overflow, its softmax is NaN.
    ("an answer JSON cannot carry", request([3e38] * 4, [1, 4]), 422, "output 'probs'"),
]


async def test_hostile_bodies_are_refused_naming_the_field_or_limit(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async with serving(
        cp_sqlite,
        publisher,
        tmp_path,
        inline_json_bytes=INLINE,
        max_request_bytes=MAX_BODY,
        max_request_elements=1000,
    ) as agent:
        assert agent.serve_port
        for what, body, status, fragment in HOSTILE:
            for sent in (body, body + b" " * (INLINE + 1)):
                if len(sent) > MAX_BODY and status != 413:
                    continue
                got, err = await infer(agent.serve_port, body=sent)
                assert (got, fragment in err.get("error", "")) == (status, True), (what, err)
                await still_serving(agent)


async def test_a_body_over_the_cap_without_a_length_is_413(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY // 4096 + 2):
            yield b" " * 4096

    async with serving(cp_sqlite, publisher, tmp_path, max_request_bytes=MAX_BODY) as agent:
        url = f"http://127.0.0.1:{agent.serve_port}/v2/models/iris/infer"
        async with aiohttp.ClientSession() as s, s.post(url, data=chunks()) as r:
            assert r.status == 413
            assert "max_request_bytes" in (await r.json())["error"]
        await still_serving(agent)


async def test_an_answer_over_the_cap_is_413_and_one_under_it_is_streamed_whole(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    # One row of the tile model answers 64 values, over inline_json_elements (streamed in
    # pieces); two rows answer 128, over max_response_elements.
    async with serving(
        cp_sqlite, publisher, tmp_path, max_response_elements=100, inline_json_elements=16
    ) as agent:
        assert agent.serve_port
        x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        one = {"name": "x", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": x.ravel().tolist()}
        body = {"id": "one", "inputs": [one]}
        status, out = await infer(agent.serve_port, model="tile", body=body)
        assert status == 200, out
        assert (out["id"], out["model_name"], out["outputs"][0]["shape"]) == (
            "one",
            "tile",
            [1, 4, 4, 4],
        )
        np.testing.assert_array_equal(out["outputs"][0]["data"], np.tile(x, (1, 4, 1, 1)).ravel())

        two = np.concatenate([x, x])
        one.update(shape=[2, 1, 4, 4], data=two.ravel().tolist())
        status, err = await infer(agent.serve_port, model="tile", body=body)
        assert status == 413 and "max_response_elements 100" in err["error"], err
        assert "128" in err["error"]
        await still_serving(agent)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (a generous bound: never closing fails)."""
    async with asyncio.timeout(20):
        return await reader.read()


async def test_idle_trickling_and_kept_alive_connections_are_closed(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    async with serving(
        cp_sqlite,
        publisher,
        tmp_path,
        header_timeout_s=0.5,
        keepalive_timeout_s=0.5,
        body_timeout_s=0.5,
    ) as agent:
        port = agent.serve_port
        assert port
        # Connected, sends nothing.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until_closed(reader) == b""
        writer.close()

        # Sends a header line every 0.1 s, never the end of its head.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: a\r\n")

        async def trickle() -> None:
            while True:
                await asyncio.sleep(0.1)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()

        task = asyncio.create_task(trickle())
        try:
            assert await read_until_closed(reader) == b""
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        writer.close()

        # A complete head, then a body that never arrives whole: 408 naming the timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: a\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs"'
        )
        answer = await read_until_closed(reader)
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer, answer
        writer.close()

        # One request answered on a kept-alive connection, then idle.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n")
        answer = await read_until_closed(reader)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"live": true}'), answer
        writer.close()
        await still_serving(agent)


async def test_connections_over_the_cap_are_refused_and_serving_goes_on(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    cap = 4
    async with serving(cp_sqlite, publisher, tmp_path, max_connections=cap) as agent:
        port = agent.serve_port
        assert port
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await read_until_closed(reader)
        assert refused.startswith(b"HTTP/1.1 503") and b"max_connections 4" in refused, refused
        writer.close()
        for _, w in idle:
            w.close()

        async def served() -> bool:
            status, _ = await infer(port)
            return status == 200

        await eventually(served)  # once the idle ones are seen closed


@pytest.mark.parametrize("model", ["iris", "tile"])
async def test_big_and_small_requests_together_all_answered(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path, model: str
) -> None:
    # Large bodies wait for the one large-request slot; small ones never wait for it.
    async with serving(
        cp_sqlite,
        publisher,
        tmp_path,
        inline_json_bytes=INLINE,
        inline_json_elements=16,
        max_large_requests=1,
    ) as agent:
        assert agent.serve_port
        rows = 64 if model == "iris" else 8
        x = np.random.default_rng(1).normal(size=(rows, *((4,) if model == "iris" else (1, 4, 4))))
        data = x.ravel().tolist()
        big = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": data}]}
        results = await asyncio.gather(
            *(infer(agent.serve_port, model=model, body=big) for _ in range(4)),
            *(infer(agent.serve_port) for _ in range(8)),
        )
        assert [s for s, _ in results] == [200] * 12, results
        for _, out in results[:4]:
            assert out["outputs"][0]["shape"][0] == rows
