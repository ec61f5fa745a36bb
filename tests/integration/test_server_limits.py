"""A control plane that holds up (issue 13): whole bodies, connection limits, refusals that
cost little, secrets kept out of answers and logs, private files, a bounded drain, and an
exhausted database pool answered 503, never 500. Raw sockets on loopback where the point is
what a client does byte by byte."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select

from control_plane.app import create_app
from control_plane.db.engine import Database, PoolLimits
from control_plane.db.models import AuditEvent
from control_plane.errors import DatabaseBusy
from control_plane.security import audit
from control_plane.security.netguard import ConnectionLimits, GuardedSite
from control_plane.state import STATE, State
from tests.support.agents import eventually
from tests.support.broker import Broker
from tests.support.bundles import Publisher
from tests.support.control_plane import ControlPlane, cp_config, start_control_plane
from tests.support.fleet import MODELFLEET, free_port


def state_of(cp: ControlPlane) -> State:
    return cp.client.server.app[STATE]


async def raw_request(port: int, head: bytes, body: bytes = b"", pause_s: float = 0.0) -> bytes:
    """Send ``head`` then ``body`` in two TCP writes ``pause_s`` apart; the whole answer."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(head)
        await w.drain()
        if pause_s:
            await asyncio.sleep(pause_s)
        w.write(body)
        await w.drain()
        return await r.read()
    finally:
        w.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ------------------------------------------------------------------------------ bodies


async def test_a_json_body_in_two_tcp_pieces_is_read_whole(cp_sqlite: ControlPlane) -> None:
    port = cp_sqlite.client.port
    body = json.dumps({"labels": {"site": "split"}}).encode()
    head = (
        f"POST /api/v1/enrollment-tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Authorization: Bearer {cp_sqlite.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answer = await raw_request(port, head + body[:7], body[7:], pause_s=0.3)
    assert status_of(answer) == 201, answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["token"].startswith("mfe_")


async def test_a_chunked_body_past_the_cap_is_413(tmp_path: Path, publisher: Publisher) -> None:
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher), max_json_bytes=1000
    )
    cp = await start_control_plane(config)
    try:
        head = (
            f"POST /api/v1/enrollment-tokens HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {cp.token}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        chunk = b'{"labels": {"a": "' + b"x" * 600 + b'"}}'
        one = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        answer = await raw_request(cp.client.port, head + one, one + b"0\r\n\r\n", pause_s=0.2)
        assert status_of(answer) == 413, answer
        assert b"body_too_large" in answer
    finally:
        await cp.client.close()


@pytest.mark.parametrize("token", [b"\xff\xfe", b"mfc_\xc3\x28", b"mfa_\xed\xa0\x80", b"\x80"])
async def test_a_bearer_token_that_is_not_utf8_is_401_not_500(
    cp_sqlite: ControlPlane, token: bytes
) -> None:
    # aiohttp hands such header bytes over as lone surrogates; hashing the token encoded it
    # as UTF-8 and raised: a 500 from one anonymous request.
    head = (
        b"GET /api/v1/fleet HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: Bearer " + token + b"\r\n\r\n"
    )
    answer = await raw_request(cp_sqlite.client.port, head)
    assert status_of(answer) == 401, answer
    assert token not in answer


# ----------------------------------------------------------------------------- connections


@dataclasses.dataclass
class Guarded:
    site: GuardedSite
    token: str

    @property
    def port(self) -> int:
        return self.site.port


@pytest.fixture
async def guarded(tmp_path: Path, publisher: Publisher) -> AsyncIterator[Guarded]:
    """The control plane behind the connection guard, as `modelfleet server` runs it."""
    config = cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher)
    runner = web.AppRunner(create_app(config), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    limits = ConnectionLimits(header_timeout_s=0.5, keepalive_timeout_s=1.0, max_connections=3)
    site = GuardedSite(runner, "127.0.0.1", 0, limits=limits)
    await site.start()
    try:
        yield Guarded(site, (config.data_dir / "admin-token").read_text().strip())
    finally:
        await runner.cleanup()


HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_a_connection_that_never_sends_a_header_is_closed(guarded: Guarded) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", guarded.port)
    try:
        assert await asyncio.wait_for(r.read(), 30) == b""  # closed by the server, unanswered
    finally:
        w.close()
    assert status_of(await raw_request(guarded.port, HEALTH)) == 200


async def test_a_trickling_request_head_is_closed(guarded: Guarded) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", guarded.port)
    sent = 0
    try:
        for byte in HEALTH[:-4]:  # never the blank line that ends the head
            if r.at_eof() or w.is_closing():
                break
            try:
                w.write(bytes([byte]))
                await w.drain()
            except ConnectionError:
                break
            sent += 1
            await asyncio.sleep(0.1)
        answer = await asyncio.wait_for(r.read(), 30)
    except ConnectionError:
        answer = b""
    finally:
        w.close()
    assert answer == b"" and sent < len(HEALTH) - 4, (sent, answer)


async def test_at_the_cap_a_new_connection_is_refused_until_one_frees(guarded: Guarded) -> None:
    held = []
    for _ in range(3):
        r, w = await asyncio.open_connection("127.0.0.1", guarded.port)
        # Each one kept busy by a request whose body never comes: not idle, not timed out.
        w.write(b"POST /api/v1/agents/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        await w.drain()
        held.append((r, w))
    await eventually(lambda: guarded.site.open_connections == 3)
    answer = await raw_request(guarded.port, HEALTH)
    assert status_of(answer) == 503 and b"Retry-After: 1" in answer
    assert guarded.site.refused_connections >= 1
    held[0][1].close()
    await eventually(lambda: guarded.site.open_connections == 2)
    assert status_of(await raw_request(guarded.port, HEALTH)) == 200
    for _, w in held[1:]:
        w.close()


async def test_an_oversized_authorization_header_is_not_echoed_or_logged(
    guarded: Guarded, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "mfa_" + "S3cr3tT0k3n" * 900  # over aiohttp's 8190-byte field limit
    head = (
        f"GET /api/v1/fleet HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with caplog.at_level(logging.DEBUG):
        answer = await raw_request(guarded.port, head)
    assert status_of(answer) == 431, answer[:200]
    assert b"S3cr3t" not in answer
    logged = "\n".join(
        r.getMessage() + (r.exc_text or "") + repr(r.exc_info) for r in caplog.records
    )
    assert "S3cr3t" not in logged


# ------------------------------------------------------------------------------- refusals


async def test_refusals_from_one_source_get_429_and_one_audit_row(
    tmp_path: Path, publisher: Publisher
) -> None:
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        refusal_rate_per_s=0.5,
        refusal_burst=5.0,
    )
    cp = await start_control_plane(config)
    try:
        codes = [(await cp.call("GET", "/fleet", token=f"mfa_bad{i}")).status for i in range(8)]
        assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3, codes
        r = await cp.call("GET", "/fleet", token="mfa_bad")
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        assert (await r.json())["error"]["code"] == "too_many_refusals"
        # Bad enrollments are refusals of a public route; health is never refused.
        r = await cp.call("POST", "/agents/enroll", token="", json={"token": "mfe_nope"})
        assert r.status == 429
        assert (await cp.call("GET", "/health", token="")).status == 200
        # A good credential from the same (spent) address still gets through: one attacker
        # behind a shared NAT or proxy cannot lock the fleet's agents and operators out.
        assert (await cp.call("GET", "/fleet")).status == 200
        assert (await cp.call("GET", "/fleet", token="")).status == 429
        state = state_of(cp)
        await state.refusals.flush()  # type: ignore[union-attr]
        state.refusal_limiter = None  # the admin's reads below come from the same address
        events = (await (await cp.call("GET", "/audit")).json())["events"]
        fleet = [e for e in events if e["action"] == "GET /api/v1/fleet"]
        by_outcome = {o: [e for e in fleet if e["outcome"] == o] for o in (401, 429)}
        assert len(by_outcome[401]) == 2 and len(by_outcome[429]) == 2, fleet
        assert by_outcome[401][1]["detail"]["repeated"] == 4
        assert by_outcome[429][1]["detail"]["repeated"] == 4  # three bad tokens, one without
        assert audit.verify(events).ok
    finally:
        await cp.client.close()


async def test_refusals_on_paths_no_route_has_share_one_audit_run(
    tmp_path: Path, publisher: Publisher
) -> None:
    # Refusals were coalesced by "METHOD path" when no route matched: a source that put a new
    # path in every request (401, then 429 from its bucket) wrote one audit row per request.
    config = dataclasses.replace(
        cp_config(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}", publisher),
        refusal_rate_per_s=0.5,
        refusal_burst=5.0,
    )
    cp = await start_control_plane(config)
    try:
        state = state_of(cp)
        async with state.db.read() as s:
            before = await s.scalar(select(func.count()).select_from(AuditEvent))
        codes = [
            (await cp.call("GET", f"/nothing-{i}", token=f"mfa_bad{i}")).status for i in range(30)
        ]
        assert set(codes) == {401, 429}, codes
        await state.refusals.flush()  # type: ignore[union-attr]
        async with state.db.read() as s:
            rows = list(await s.scalars(select(AuditEvent).where(AuditEvent.id > before)))
        # The first 401 and the first 429 as rows of their own, then one count of each.
        assert len(rows) == 4, [(r.action, r.outcome, r.detail) for r in rows]
        assert sum(r.detail.get("repeated", 0) for r in rows) == 28
    finally:
        await cp.client.close()


# --------------------------------------------------------------------------- database pool


async def test_an_exhausted_pool_is_503_with_retry_after_never_500(
    tmp_path: Path, db_url: str, publisher: Publisher
) -> None:
    config = dataclasses.replace(
        cp_config(tmp_path, db_url, publisher), db_pool_size=1, db_wait_s=0.2, rate_limit_per_s=0
    )
    cp = await start_control_plane(config)
    try:
        db = state_of(cp).db

        async def hold() -> None:  # another task holds the one session meanwhile
            async with db.read() as s:
                await s.execute(select(1))
                await held.wait()

        held = asyncio.Event()
        holder = asyncio.create_task(hold())
        await eventually(lambda: db._slots.locked())
        r = await cp.call("GET", "/fleet")
        assert r.status == 503 and int(r.headers["Retry-After"]) >= 1, await r.text()
        assert (await r.json())["error"]["code"] == "database_busy"
        held.set()
        await holder
        assert (await cp.call("GET", "/fleet")).status == 200
        # Many at once: each waits its turn or is told to retry; none is a 500.
        codes = await asyncio.gather(*(cp.call("GET", "/agents") for _ in range(40)))
        assert {r.status for r in codes} <= {200, 503}, [r.status for r in codes]
        assert all("Retry-After" in r.headers for r in codes if r.status == 503)
    finally:
        await cp.client.close()


async def test_pool_timeouts_and_refused_connections_are_database_busy(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}", pool=PoolLimits(size=1, wait_s=0.1))
    try:
        with pytest.raises(DatabaseBusy):
            async with db.read():
                raise sa_exc.TimeoutError("QueuePool limit of size 1 overflow 1 reached")

        class TooMany(Exception):
            sqlstate = "53300"

        with pytest.raises(DatabaseBusy):
            async with db.read():
                raise sa_exc.DBAPIError("connect", None, TooMany("too many connections"))

        class Other(Exception):
            sqlstate = "42P01"

        with pytest.raises(sa_exc.DBAPIError):
            async with db.read():
                raise sa_exc.DBAPIError("select", None, Other("no such table"))
        # A nested session of the same task does not wait for itself.
        async with db.read() as outer, db.write() as inner:
            await outer.execute(select(1))
            await inner.execute(select(1))
    finally:
        await db.close()


# ------------------------------------------------------------------ files and SIGTERM


def _umask_022() -> None:
    os.umask(0o022)


def _get(url: str, token: str | None = None, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


@pytest.mark.slow
async def test_sigterm_with_a_long_poll_and_mqtt_open_exits_within_the_drain(
    tmp_path: Path, publisher: Publisher
) -> None:
    broker = Broker(tmp_path / "broker", prefix=f"limits-{os.getpid()}", anonymous=True)
    await broker.start()
    data = tmp_path / "cp"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    (data / "modelfleet.db").touch(mode=0o644)  # an older install's modes: fixed at start
    port = free_port()
    log_path = tmp_path / "server.log"
    env = {**os.environ, "MODELFLEET_MQTT_PASSWORD": "broker-pass-xyz"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                MODELFLEET,
                "server",
                "--data-dir",
                str(data),
                "--port",
                str(port),
                "--trust-publisher",
                str(publisher.pub_path),
                "--mqtt",
                broker.url,
                "--mqtt-prefix",
                broker.prefix,
                "--drain",
                "4",
            ],
            stdout=log,
            stderr=log,
            env=env,
            preexec_fn=_umask_022,
        )
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        await eventually(lambda: _get(f"{base}/health")[0] == 200, within_s=60)
        await eventually(lambda: "MQTT connected" in log_path.read_text(), within_s=30)
        for f in ("modelfleet.db", "modelfleet.db-wal", "modelfleet.db-shm"):
            assert (data / f).stat().st_mode & 0o777 == 0o600, f
        assert data.stat().st_mode & 0o777 == 0o700
        token = (data / "admin-token").read_text().strip()
        agent_id, credential = await enroll_over_http(base, token)
        auth = {"Authorization": f"Bearer {credential}"}
        # One connection: a first answer proves the server has it before the long-poll starts.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
            async with s.get(f"{base}/agents/{agent_id}", headers=auth) as r:
                assert r.status == 200
            poll = asyncio.create_task(
                s.get(f"{base}/agents/{agent_id}/desired?after=999&wait=60", headers=auth)
            )
            await asyncio.sleep(0.5)
            assert not poll.done()  # waiting in the server
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 4 + 6)  # --drain 4, and start-up slack
            assert code == 0, log_path.read_text()[-3000:]
            assert (await poll).status == 204  # answered at once, not cut off
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()
    text = log_path.read_text()
    assert "broker-pass-xyz" not in text and token not in text
    assert re.search(r"Client modelfleet-cp-\S+ disconnected\.", broker_log(broker)), broker_log(
        broker
    )[-2000:]


def broker_log(broker: Broker) -> str:
    return (broker.root / "mosquitto.log").read_text()


async def enroll_over_http(base: str, token: str) -> tuple[str, str]:
    """Enroll one agent over plain HTTP; its id and credential."""

    def post(path: str, body: dict[str, object], auth: str | None) -> dict[str, object]:
        req = urllib.request.Request(
            f"{base}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                **({"Authorization": f"Bearer {auth}"} if auth else {}),
            },
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    enrollment = await asyncio.to_thread(post, "/enrollment-tokens", {"labels": {}}, token)
    agent = await asyncio.to_thread(
        post, "/agents/enroll", {"token": enrollment["token"], "labels": {}}, None
    )
    return str(agent["agentId"]), str(agent["credential"])
