"""A real agent daemon against a real control plane: activation, serving, refusals, reports."""

from __future__ import annotations

import logging
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.daemon import Agent
from bench.devkit.models import SMOKE_INPUT, iris_model, iris_reference
from bench.devkit.proxies import MitmProxy
from control_plane.catalog.build import build_bundle
from protocol.desired import DesiredModel, DesiredState
from protocol.dsse import generate_private_key
from tests.support.agents import enroll_agent, eventually, infer, running_agent, wait_active
from tests.support.bundles import Publisher, iris_bundle, npy
from tests.support.control_plane import ControlPlane, stored_requests


async def test_agent_activates_serves_and_reports(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    await cp.push(iris_bundle(publisher.key))
    ident = await enroll_agent(cp, tmp_path / "a1", {"site": "onprem"})
    async with running_agent(tmp_path / "a1") as agent:
        rollout = await cp.rollout(selector="site=onprem")
        await wait_active(cp, ident.agent_id, "1.0.0")
        assert agent.serve_port
        status, out = await infer(agent.serve_port)
        assert status == 200, out
        assert out["model_name"] == "iris" and out["model_version"] == "1.0.0"
        want = iris_reference(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        np.testing.assert_allclose(out["outputs"][0]["data"], want.reshape(-1), rtol=1e-5)
        assert out["outputs"][0]["shape"] == [1, 3]

        bad_requests = [
            (
                {"inputs": [{"name": "y", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]},
                "unknown input",
            ),
            (
                {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1] * 5}]},
                "shape",
            ),
            (
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1] * 4}]},
                "datatype",
            ),
            (
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 3}]},
                "3 values",
            ),
            (
                {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "NOPE", "data": [1] * 4}]},
                "not supported",
            ),
            ({"inputs": []}, "inputs"),
            (b"{not json", "not JSON"),
        ]
        for body, fragment in bad_requests:
            status, err = await infer(agent.serve_port, body=body)
            assert status == 400 and fragment in err["error"], (body, err)
        status, err = await infer(agent.serve_port, model="nope")
        assert status == 404
        status, _ = await infer(agent.serve_port)
        assert status == 200  # still serving after all of that

        r = await cp.call("GET", f"/rollouts/{rollout['id']}")
        ro = await r.json()
        assert ro["state"] == "completed"
        assert ro["progress"] == {"matching": 1, "moved": 1, "active": 1}

        # Two good inferences reach the control plane as metrics; bad inputs are not counted.
        async def two_stored() -> bool:
            return await stored_requests(cp) == 2

        await eventually(two_stored)
        a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
        assert a["reportedGeneration"] == 1 and a["facts"]["cpuCount"]


async def test_forged_and_replayed_desired_state_are_refused(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    await cp.push(iris_bundle(publisher.key))
    async with MitmProxy(cp.url) as proxy:
        ident = await enroll_agent(cp, tmp_path / "a1", {"site": "x"}, server=proxy.url)
        async with running_agent(tmp_path / "a1") as agent:
            await cp.rollout(selector="site=x")
            await wait_active(cp, ident.agent_id, "1.0.0")
            genuine_gen1 = proxy.seen_desired[-1]

            # A forged document: right shape, signed by an attacker's key.
            now = datetime.now(UTC)
            forged = DesiredState(
                ident.agent_id,
                99,
                now,
                now + timedelta(days=1),
                (DesiredModel("iris", "6.6.6", "sha256:" + "6" * 64),),
            ).sign(generate_private_key())
            proxy.replacement = forged.to_bytes()

            async def refused(fragment: str) -> bool:
                a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
                return fragment in (a.get("lastError") or "")

            assert await eventually(lambda: refused("signature"))
            assert agent.state.highest_generation == 1
            assert (await infer(agent.serve_port))[1]["model_version"] == "1.0.0"

            # Move on to 2.0.0 genuinely, then replay the genuine generation-1 document.
            proxy.replacement = None
            await cp.push(iris_bundle(publisher.key, version="2.0.0", seed=1))
            await cp.rollout(version="2.0.0", selector="site=x")
            await wait_active(cp, ident.agent_id, "2.0.0")
            proxy.replacement = genuine_gen1
            assert await eventually(lambda: refused("older"))
            assert agent.state.highest_generation == 2
            assert (await infer(agent.serve_port))[1]["model_version"] == "2.0.0"


async def test_failed_smoke_test_and_tampered_blob_keep_the_old_version(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    await cp.push(iris_bundle(publisher.key))
    ident = await enroll_agent(cp, tmp_path / "a1", {"site": "x"})
    async with running_agent(tmp_path / "a1") as agent:
        await cp.rollout(selector="site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")

        # 2.0.0 is validly signed, but its expected smoke output is wrong.
        wrong = (npy(SMOKE_INPUT), npy(iris_reference(SMOKE_INPUT, seed=0) + 0.5))
        bundle, _ = build_bundle(iris_model(seed=1), "iris", "2.0.0", [publisher.key], wrong)
        assert (await cp.push(bundle)).status == 201
        await cp.rollout(version="2.0.0", selector="site=x")

        async def model_state(version: str) -> tuple[str, str] | None:
            a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
            for m in a["models"]:
                if m["version"] == version and m["state"] == "failed":
                    return m["state"], m.get("reason", "")
            return None

        state = await eventually(lambda: model_state("2.0.0"))
        assert "smoke test" in state[1]
        assert (await infer(agent.serve_port))[1]["model_version"] == "1.0.0"

        # 3.0.0's model blob is corrupted in the server's store after it was accepted.
        pushed = await (await cp.push(iris_bundle(publisher.key, "3.0.0", seed=3))).json()
        env = await (await cp.call("GET", f"/manifests/{pushed['manifestDigest']}")).read()
        import base64
        import json

        manifest = json.loads(base64.b64decode(json.loads(env)["payload"]))
        model_digest = next(f["digest"] for f in manifest["files"] if f["role"] == "model")
        path = cp.config.blob_dir / "sha256" / model_digest[7:9] / model_digest[7:]
        data = bytearray(path.read_bytes())
        data[50] ^= 0xFF
        path.write_bytes(bytes(data))
        await cp.rollout(version="3.0.0", selector="site=x")
        state = await eventually(lambda: model_state("3.0.0"))
        assert "digest" in state[1]
        assert (await infer(agent.serve_port))[1]["model_version"] == "1.0.0"
        assert not agent.store.has_blob(model_digest)


async def test_agent_restart_serves_without_the_control_plane(
    cp: ControlPlane, publisher: Publisher, tmp_path: Path
) -> None:
    await cp.push(iris_bundle(publisher.key))
    ident = await enroll_agent(cp, tmp_path / "a1", {"site": "x"})
    async with running_agent(tmp_path / "a1"):
        await cp.rollout(selector="site=x")
        await wait_active(cp, ident.agent_id, "1.0.0")
    await cp.client.close()  # the control plane is gone
    async with running_agent(tmp_path / "a1") as agent:
        status, out = await infer(agent.serve_port)  # type: ignore[arg-type]
        assert status == 200 and out["model_version"] == "1.0.0"
        assert agent.state.highest_generation == 1


def test_state_files_are_private(tmp_path: Path) -> None:
    from agent.storage.state import Identity, StateDir
    from protocol.dsse import public_key_to_pem

    k = public_key_to_pem(generate_private_key().public_key()).decode()
    d = StateDir(tmp_path / "s")
    d.save_enrollment(Identity("a", "http://x", "mfc_secret", "n"), k, [k])
    for p in (d.identity_path, d.control_plane_key_path, *d.trusted_dir.iterdir()):
        assert p.stat().st_mode & 0o777 == 0o600, p
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700


async def test_a_start_that_fails_lets_go_of_what_it_took(cp: ControlPlane, tmp_path: Path) -> None:
    # The serve port is taken: the start fails, and leaves no HTTP session open and no log ring
    # on the root logger (it would go on collecting every record of the process).
    await enroll_agent(cp, tmp_path / "a1", {"site": "x"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = Agent(AgentConfig(state_dir=tmp_path / "a1", serve_port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            async with agent:
                pytest.fail("started on a port that is taken")
    assert agent.ring not in logging.getLogger().handlers
    assert agent.client._session is not None and agent.client._session.closed
