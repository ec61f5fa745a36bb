"""The agent's serve-port guard: a head deadline that a busy event loop cannot turn against a
client whose head arrived in time (agent/netguard.py)."""

from __future__ import annotations

import asyncio

from agent.netguard import ConnectionGuard, ConnectionLimits

DEADLINE_S = 0.05


class Inner(asyncio.Protocol):
    """Stands for aiohttp's protocol: takes the bytes, runs nothing."""

    def __init__(self) -> None:
        self.data = b""

    def data_received(self, data: bytes) -> None:
        self.data += data


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def connect() -> tuple[ConnectionGuard, object, Inner, Transport]:
    guard = ConnectionGuard(ConnectionLimits(header_timeout_s=DEADLINE_S))
    inner = Inner()
    conn = guard.protocol_factory(lambda: inner)()
    transport = Transport()
    conn.connection_made(transport)
    return guard, conn, inner, transport


async def test_a_head_that_arrived_in_time_is_kept_however_late_the_handler_runs() -> None:
    guard, conn, inner, transport = connect()
    # The blank line split across two reads, then part of a body.
    conn.data_received(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: a\r\n\r")
    conn.data_received(b'\nContent-Length: 9\r\n{"inp')
    await asyncio.sleep(DEADLINE_S * 4)  # the handler has not started: the loop is busy
    assert not transport.closed and guard.timed_out == 0
    assert inner.data.startswith(b"POST")


async def test_a_head_that_never_ends_is_closed_at_the_deadline() -> None:
    guard, conn, _, transport = connect()
    conn.data_received(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: a\r\n")
    conn.data_received(b"X-Slow: 1\r\n")
    await asyncio.sleep(DEADLINE_S * 4)
    assert transport.closed and guard.timed_out == 1


async def test_silence_is_closed_and_the_next_head_has_its_own_deadline() -> None:
    guard, conn, _, transport = connect()
    await asyncio.sleep(DEADLINE_S * 4)
    assert transport.closed and guard.timed_out == 1

    guard, conn, _, transport = connect()
    conn.data_received(b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n")
    conn.request_started()
    conn.request_done()
    await asyncio.sleep(DEADLINE_S * 4)  # idle between requests: aiohttp's keep-alive's job
    assert not transport.closed
    conn.data_received(b"GET /v2/health/live HTTP/1.1\r\n")  # a second head that stalls
    await asyncio.sleep(DEADLINE_S * 4)
    assert transport.closed and guard.timed_out == 1
