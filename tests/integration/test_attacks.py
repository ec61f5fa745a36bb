"""Update-framework attacks against a real agent, with a man in the middle on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
from pathlib import Path

import aiohttp
from aiohttp import web

from bench.devkit.proxies import LoopbackProxy, MitmProxy
from tests.support.agents import enroll_agent, eventually, infer, running_agent, wait_active
from tests.support.bundles import Publisher, bundle_members, iris_bundle
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane


async def test_freeze_attack_makes_the_agent_stale_but_serving(
    tmp_path: Path, publisher: Publisher
) -> None:
    """A validly signed but old desired state replayed forever (TUF's freeze attack): once it
    expires the agent reports itself stale, keeps serving, and recovers when fresh documents
    reach it again."""
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher), desired_ttl_s=4.0
    )
    cp = await start_control_plane(config)
    try:
        await cp.push(iris_bundle(publisher.key))
        async with MitmProxy(cp.url) as proxy:
            ident = await enroll_agent(cp, tmp_path / "a1", {"site": "x"}, server=proxy.url)
            async with running_agent(tmp_path / "a1") as agent:
                await cp.rollout(selector="site=x")
                await wait_active(cp, ident.agent_id, "1.0.0")

                async def view() -> dict:
                    return await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()

                assert (await view())["desiredState"] == "current"
                # Freeze: the document the agent holds now, replayed for every poll.
                assert agent.state.desired_envelope is not None
                proxy.replacement = agent.state.desired_envelope.encode()

                async def stale() -> bool:
                    v = await view()
                    # The replay is refused (as expired, or as older when a fresher document
                    # slipped through on a poll already in flight when the freeze began).
                    return (
                        v["desiredState"] == "stale"
                        and v["state"] == "stale"
                        and "refused desired state" in (v["lastError"] or "")
                    )

                assert await eventually(stale, within_s=20)
                status, out = await infer(agent.serve_port)
                assert status == 200 and out["model_version"] == "1.0.0"

                proxy.replacement = None  # the attacker goes away

                async def current() -> bool:
                    v = await view()
                    return v["desiredState"] == "current" and v["state"] == "online"

                assert await eventually(current, within_s=20)
    finally:
        await cp.client.close()


class BlobAttacker(LoopbackProxy):
    """A man in the middle that passes everything through but the blob it is told to attack."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        # digest -> how its download is attacked; attacks stay on, so an earlier version that
        # is still being retried with backoff never gets through when the next case starts
        self.attacks: dict[str, str] = {}
        self.swap_with = b""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        digest = request.path.rsplit("/blobs/", 1)[-1] if "/blobs/" in request.path else ""
        mode = self.attacks.get(digest)
        if mode:
            resp = web.StreamResponse(status=200)
            resp.content_type = "application/octet-stream"
            if mode == "swap":  # mix-and-match: a genuine file of another version
                resp.content_length = len(self.swap_with)
                await resp.prepare(request)
                await resp.write(self.swap_with)
            elif mode == "endless":  # never-ending response, no length
                await resp.prepare(request)
                with contextlib.suppress(ConnectionError, RuntimeError):
                    for _ in range(100_000):
                        await resp.write(b"\0" * 65536)
            elif mode == "trickle":  # slow retrieval: a byte now and then
                await resp.prepare(request)
                with contextlib.suppress(ConnectionError, RuntimeError):
                    for _ in range(600):
                        await resp.write(b"\0")
                        await asyncio.sleep(0.1)
            return resp
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.request(
                request.method,
                self.upstream + request.path_qs,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
                data=await request.read(),
            ) as r,
        ):
            body = await r.read()
            drop = ("content-length", "transfer-encoding", "connection")
            headers = {k: v for k, v in r.headers.items() if k.lower() not in drop}
            return web.Response(status=r.status, body=body, headers=headers)


def model_digest(bundle: bytes) -> tuple[str, bytes]:
    data = bundle_members(bundle)["model.onnx"]
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


async def test_mix_and_match_endless_data_and_slow_retrieval_are_refused(
    cp_sqlite: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    """Blob attacks from a man in the middle; each leaves 1.0.0 serving and says why."""
    cp = cp_sqlite
    v1 = iris_bundle(publisher.key)
    await cp.push(v1)
    _, v1_model = model_digest(v1)
    async with BlobAttacker(cp.url) as proxy:
        ident = await enroll_agent(cp, tmp_path / "a1", {"site": "x"}, server=proxy.url)
        async with running_agent(
            tmp_path / "a1", download_attempts=2, download_grace_s=1.0, download_min_rate=200.0
        ) as agent:
            await cp.rollout(selector="site=x")
            await wait_active(cp, ident.agent_id, "1.0.0")
            cases = (
                ("2.0.0", "swap", "digest"),
                ("3.0.0", "endless", "more than"),
                ("4.0.0", "trickle", "slower than"),
            )
            for seed, (version, mode, reason) in enumerate(cases, start=1):
                bundle = iris_bundle(publisher.key, version=version, seed=seed)
                assert (await cp.push(bundle)).status == 201
                digest, _ = model_digest(bundle)
                proxy.attacks[digest], proxy.swap_with = mode, v1_model
                await cp.rollout(version=version, selector="site=x")

                async def refused(version: str = version, reason: str = reason) -> dict | None:
                    # Failed outright (a wrong digest), or held back and retried with backoff
                    # (a transfer that broke its bounds): either way, reported with the cause.
                    a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
                    return next(
                        (
                            m
                            for m in a["models"]
                            if m["version"] == version
                            and m["state"] in ("failed", "downloading")
                            and reason in (m.get("reason") or "")
                        ),
                        None,
                    )

                await eventually(refused, within_s=30)
                status, out = await infer(agent.serve_port)
                assert status == 200 and out["model_version"] == "1.0.0", (mode, out)
                assert not list((tmp_path / "a1").rglob("partial/*")) or mode != "swap"
