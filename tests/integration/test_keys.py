"""The signed key set end to end: `modelfleet keys rotate` adds and revokes publishers, sets a
k-of-n threshold, and rotates the control plane's own key with no agent re-enrolled."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bench.devkit.proxies import MitmProxy
from control_plane.errors import ConfigError
from protocol.bundle import MEDIA_TYPE
from protocol.desired import DesiredState
from protocol.dsse import key_id
from protocol.keyset import make_keyset, open_first, sign_keyset
from tests.support.agents import enroll_agent, eventually, infer, running_agent, wait_active
from tests.support.bundles import Publisher, iris_bundle, make_publisher
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane
from tests.support.fleet import run_cli


async def keyset_version(cp: ControlPlane) -> int | None:
    body = await (await cp.call("GET", "/keyset")).json()
    return body["keyset"]["version"] if body["keyset"] else None


async def model_state(cp: ControlPlane, agent_id: str, version: str) -> dict | None:
    a = await (await cp.call("GET", f"/agents/{agent_id}")).json()
    return next((m for m in a["models"] if m["version"] == version), None)


async def test_publishers_threshold_and_control_plane_key_rotate_without_re_enrolling(
    tmp_path: Path, publisher: Publisher
) -> None:
    keys = tmp_path / "keys"
    root, p2, cp1, cp2 = (make_publisher(keys, n) for n in ("root", "p2", "cp1", "cp2"))
    ks_file = tmp_path / "keyset.json"
    p = await run_cli(
        "keys",
        "rotate",
        "--init",
        "--root-key",
        root.key_path,
        "--add-publisher",
        publisher.pub_path,
        "--add-control-plane",
        cp1.key_path,
        "--out",
        ks_file,
    )
    assert p.returncode == 0, p.stderr
    config = replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        keyset_file=ks_file,
        signing_key_file=cp1.key_path,
    )
    cp = await start_control_plane(config)
    cli = ("--server", cp.url, "--token", cp.token)
    try:
        assert await keyset_version(cp) == 1
        assert (await cp.push(iris_bundle(publisher.key))).status == 201
        # Signed by one publisher while one signature was enough: fine then, not later.
        assert (await cp.push(iris_bundle(publisher.key, "2.0.0", seed=1))).status == 201
        async with MitmProxy(cp.url) as proxy:
            ident = await enroll_agent(cp, tmp_path / "a1", {"site": "x"}, server=proxy.url)
            async with running_agent(tmp_path / "a1", keyset_refresh_s=0.5) as agent:
                assert agent.keyset is not None and agent.keyset.version == 1
                await cp.rollout(selector="site=x")
                await wait_active(cp, ident.agent_id, "1.0.0")
                # A second agent, not started yet, is moved to 2.0.0 while that is still valid.
                ident2 = await enroll_agent(cp, tmp_path / "a2", {"site": "late"}, proxy.url)
                await cp.rollout(version="2.0.0", selector="site=late")

                # k-of-n: a second publisher, two signatures needed from now on.
                p = await run_cli(
                    "keys",
                    "rotate",
                    "--root-key",
                    root.key_path,
                    "--add-publisher",
                    p2.pub_path,
                    "--threshold",
                    "2",
                    *cli,
                )
                assert p.returncode == 0, p.stderr
                assert "publishers: 2 of 2" in p.stdout
                one = iris_bundle(publisher.key, "3.0.0", seed=2)
                r = await cp.push(one)
                assert r.status == 422 and "needs 2" in (await r.json())["error"]["message"]
                versions = await (await cp.call("GET", "/models/iris/versions")).json()
                assert "3.0.0" not in {v["version"] for v in versions["versions"]}
                path = tmp_path / "iris-3.mfb"
                path.write_bytes(one)
                p = await run_cli("bundle", "sign", path, "--key", p2.key_path)
                assert p.returncode == 0 and "2 signature(s)" in p.stdout, p.stderr
                assert (await cp.push(path.read_bytes())).status == 201

                # A version pushed under the old rule: no new rollout of it, and an agent it
                # was already headed for follows the key set and refuses it.
                r = await cp.call(
                    "POST",
                    "/rollouts",
                    json={"model": "iris", "version": "2.0.0", "selector": "site=x"},
                )
                err = (await r.json())["error"]
                assert r.status == 422 and "no longer meets key set version 2" in err["message"]

                async def refused() -> dict | None:
                    m = await model_state(cp, ident2.agent_id, "2.0.0")
                    ok = m and m["state"] == "failed" and "needs 2" in (m.get("reason") or "")
                    return m if ok else None

                async with running_agent(tmp_path / "a2", keyset_refresh_s=0.5) as agent2:
                    await eventually(refused, within_s=20)
                    assert agent2.keyset is not None and agent2.keyset.version == 2
                    assert agent2.keyring.publisher_threshold == 2 and not agent2.models
                await eventually(lambda: agent.keyset.version == 2 or None, within_s=10)
                status, out = await infer(agent.serve_port)
                assert status == 200 and out["model_version"] == "1.0.0"
                await cp.rollout(version="3.0.0", selector="site=x")
                await wait_active(cp, ident.agent_id, "3.0.0")
                a = await (await cp.call("GET", f"/agents/{ident.agent_id}")).json()
                assert a["keysetVersion"] == 2

                # Rotate the control plane's key: list both, restart signing with the new one.
                p = await run_cli(
                    "keys",
                    "rotate",
                    "--root-key",
                    root.key_path,
                    "--add-control-plane",
                    cp2.pub_path,
                    *cli,
                )
                assert p.returncode == 0, p.stderr
                await cp.client.close()
                cp = await start_control_plane(replace(config, signing_key_file=cp2.key_path))
                cli = ("--server", cp.url, "--token", cp.token)
                proxy.upstream = cp.url
                both = iris_bundle(publisher.key, "4.0.0", seed=3)
                path.write_bytes(both)
                assert (await run_cli("bundle", "sign", path, "--key", p2.key_path)).returncode == 0
                assert (await cp.push(path.read_bytes())).status == 201
                await cp.rollout(version="4.0.0", selector="site=x")
                await wait_active(cp, ident.agent_id, "4.0.0")  # signed by cp2: same identity

                # Retire the old key; a desired state forged with it is refused from then on.
                p = await run_cli(
                    "keys",
                    "rotate",
                    "--root-key",
                    root.key_path,
                    "--remove-control-plane",
                    cp1.pub_path,
                    *cli,
                )
                assert p.returncode == 0, p.stderr
                await eventually(lambda: agent.keyset.version == 4 or None, within_s=10)
                now = datetime.now(UTC)
                forged = DesiredState(
                    ident.agent_id,
                    agent.state.highest_generation + 5,
                    now,
                    now + timedelta(days=7),
                    (),
                )
                proxy.replacement = forged.sign(cp1.key).to_bytes()
                await eventually(
                    lambda: "refused desired state" in (agent.last_error or "") or None, 10
                )
                proxy.replacement = None
                status, out = await infer(agent.serve_port)
                assert status == 200 and out["model_version"] == "4.0.0"
                assert agent.identity.credential == ident.credential  # never re-enrolled
        await cp.client.close()
        # A replica still signing with the retired key refuses to start.
        with pytest.raises(ConfigError, match="does not list"):
            await start_control_plane(replace(config, signing_key_file=cp1.key_path))
    finally:
        await cp.client.close()


async def test_bad_key_sets_are_refused_and_change_nothing(
    tmp_path: Path, publisher: Publisher
) -> None:
    keys = tmp_path / "keys"
    root, other, cp1 = (make_publisher(keys, n) for n in ("root", "other", "cp1"))
    config = cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)
    config = replace(config, signing_key_file=cp1.key_path)
    later = datetime.now(UTC) + timedelta(days=30)

    def version(v: int, *, cps: tuple = (cp1,), pubs: tuple = (publisher,)) -> bytes:
        ks = make_keyset(
            v,
            later,
            [root.key.public_key()],
            [p.key.public_key() for p in pubs],
            [c.key.public_key() for c in cps],
        )
        return sign_keyset(ks, [root.key]).to_bytes()

    cp = await start_control_plane(config)
    try:
        # No key set yet: the API cannot plant the first one (it would name its own roots).
        r = await cp.call("PUT", "/keyset", json=json.loads(version(1)))
        assert r.status == 409 and (await r.json())["error"]["code"] == "no_keyset"
        p = await run_cli(
            "keys", "rotate", "--root-key", root.key_path, "--server", cp.url, "--token", cp.token
        )
        assert p.returncode != 0 and "--init" in p.stderr
    finally:
        await cp.client.close()
    (tmp_path / "v1.json").write_bytes(version(1))
    config = replace(config, keyset_file=tmp_path / "v1.json")
    cp = await start_control_plane(config)
    try:
        assert await keyset_version(cp) == 1
        other_signed = make_keyset(
            2, later, [root.key.public_key()], [publisher.key.public_key()], [cp1.key.public_key()]
        )
        cases = [
            (json.loads(version(1)), 409, "keyset_not_newer"),  # replayed
            (json.loads(version(3)), 409, "invalid_keyset"),  # skips version 2
            (
                json.loads(sign_keyset(other_signed, [other.key]).to_bytes()),
                422,
                "untrusted_keyset",
            ),  # not signed by the root
            (json.loads(version(2, cps=(other,))), 409, "signing_key_not_listed"),
            ({"payloadType": "x", "payload": "!!", "signatures": []}, 400, "invalid_keyset"),
        ]
        for body, status, code in cases:
            r = await cp.call("PUT", "/keyset", json=body)
            got = await r.json()
            assert (r.status, got["error"]["code"]) == (status, code), got
        r = await cp.call("PUT", "/keyset", data=b"{", headers={"Content-Type": MEDIA_TYPE})
        assert r.status == 400
        assert await keyset_version(cp) == 1  # nothing stored
        r = await cp.call("GET", "/keyset", params={"after": "-1"})
        assert r.status == 400
        r = await cp.call("PUT", "/keyset", json=json.loads(version(2)))
        assert r.status == 200 and (await r.json())["keyset"]["version"] == 2
        chain = (await (await cp.call("GET", "/keyset", params={"after": "0"})).json())["chain"]
        assert [open_first(e.encode(), datetime.now(UTC)).version for e in chain] == [1, 2]
        # A stale file on a restarted replica does not roll the stored key set back.
        await cp.client.close()
        cp = await start_control_plane(config)
        assert await keyset_version(cp) == 2
        # CLI refusals name the problem.
        p = await run_cli(
            "keys",
            "rotate",
            "--root-key",
            other.key_path,
            "--threshold",
            "1",
            "--server",
            cp.url,
            "--token",
            cp.token,
        )
        assert p.returncode != 0 and "would be refused" in p.stderr
        p = await run_cli(
            "keys",
            "rotate",
            "--root-key",
            root.key_path,
            "--threshold",
            "3",
            "--server",
            cp.url,
            "--token",
            cp.token,
        )
        assert p.returncode != 0 and "--threshold 3" in p.stderr
        p = await run_cli(
            "keys",
            "rotate",
            "--root-key",
            root.key_path,
            "--revoke-publisher",
            "deadbeef",
            "--server",
            cp.url,
            "--token",
            cp.token,
        )
        assert p.returncode != 0 and "names no key" in p.stderr
        assert await keyset_version(cp) == 2
        p = await run_cli("keys", "show", "--server", cp.url, "--token", cp.token)
        assert p.returncode == 0 and key_id(publisher.key.public_key())[:16] in p.stdout
    finally:
        await cp.client.close()
    # A key set file the server cannot believe stops it at start, naming the file.
    (tmp_path / "bad.json").write_bytes(b"{}")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        await start_control_plane(
            replace(
                config,
                keyset_file=tmp_path / "bad.json",
                data_dir=tmp_path / "cp2",
                db_url=f"sqlite:///{tmp_path / 'cp2.db'}",
            )
        )
