"""The delivery loop: events fanned out to the endpoints that want them, then POSTed, signed,
with retries, from whichever replica claims them.

Every pass:

1. *fan out*: outbox events not yet dispatched become one delivery row per subscribed
   endpoint (the body is serialised once, here: the bytes signed are the bytes sent, on every
   attempt);
2. *claim*: due deliveries are leased to this replica (``claimed_until``), under
   ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several replicas deliver each one once; a
   replica that dies mid-send loses its lease and another sends it again (at least once: the
   ``X-Modelfleet-Delivery`` header and the event id let a receiver drop a repeat);
3. *send*: each claimed delivery is its own task, at most ``per_endpoint`` in flight per
   endpoint and ``concurrency`` in all, so an endpoint that hangs holds only its own slots;
   its answer is written to the delivery's log and decides (control_plane/events/retry.py)
   whether it is done, retried after a jittered back-off, or given up.

A bad endpoint, a bad row or a failing pass never stops the loop (each has its boundary).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.engine import Database
from control_plane.db.models import EventMark, OutboxEvent, WebhookDelivery, WebhookEndpoint
from control_plane.events.outbox import event_body
from control_plane.events.receivers import address_allowed, check_url
from control_plane.events.retry import RetryPolicy
from control_plane.events.signing import DELIVERY_HEADER, EVENT_HEADER, HEADER, signature
from control_plane.events.types import wanted
from control_plane.events.watch import OfflineWatch
from control_plane.setaside import is_transient, reason_of
from protocol.exceptions import InvalidMessage
from protocol.timeutil import format_time

log = logging.getLogger("modelfleet.events")
MAX_ERROR = 500
USER_AGENT = "modelfleet-webhooks/1"
SWEEP_EVERY_S = 5.0


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    """How the loop delivers: retries, timeouts, how much at once, how long the log is kept."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout_s: float = 10.0  # one attempt, connection to last byte of the answer's head
    interval_s: float = 1.0  # between passes when nothing is due
    concurrency: int = 16
    per_endpoint: int = 2
    fan_out_batch: int = 500
    retention_s: float = 7 * 86400.0  # delivered and failed deliveries, dispatched events
    allow_private: bool = False  # see control_plane/events/receivers.py

    @property
    def lease_s(self) -> float:
        """How long a claim holds: an attempt's timeout and a margin for writing its result."""
        return self.timeout_s + 30.0


@dataclass(frozen=True)
class _Claimed:
    id: int
    endpoint_id: str
    url: str
    secret: str
    body: str
    event_id: str
    type: str
    attempts: int


class _GuardedResolver(AbstractResolver):
    """DNS answers filtered by receivers.address_allowed: a name that resolves only to
    forbidden addresses (a rebinding, a metadata service) cannot be reached."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if address_allowed(r["host"], self._allow_private)]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses deliveries may not reach")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class WebhookDeliverer:
    """Owns the delivery loop and its sends; ``run`` is the app's background task."""

    def __init__(
        self,
        *,
        db: Database,
        clock: Callable[[], datetime],
        config: DeliveryConfig,
        offline: OfflineWatch | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.config = config
        self.offline = offline  # swept every few passes: agent.offline has no change to emit it
        self._last_sweep = 0.0
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._per_endpoint: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._last_prune = 0.0
        # Figures for /metrics: attempts by verdict, fanned-out deliveries, failed passes.
        self.attempts: Counter[str] = Counter()
        self.fanned_out = 0
        self.failed_passes = 0

    def kick(self) -> None:
        """Run a pass now (after an emit in this process)."""
        self._wake.set()

    async def run(self) -> None:
        """Pass after pass until cancelled; sends in flight are cancelled with it."""
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=_GuardedResolver(self.config.allow_private), limit=self.config.concurrency
            ),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout_s),
            headers={"User-Agent": USER_AGENT},
        )
        try:
            while True:
                try:
                    await self.one_pass(session)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if not is_transient(exc):
                        log.exception("webhook delivery pass failed")
                    else:
                        log.warning("webhook delivery pass failed: %s", reason_of(exc))
                    # The loop's boundary: the next pass tries again.
                    self.failed_passes += 1
                try:
                    async with asyncio.timeout(self.config.interval_s):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            tasks = list(self._inflight.values())
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await session.close()

    async def one_pass(self, session: aiohttp.ClientSession) -> None:
        """Sweep for silent agents, fan out, claim what is due and start sending it; prune now
        and then."""
        if self.offline is not None and time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()
            await self.offline.sweep()
        due: list[_Claimed] = []
        if await self._work_waiting():
            async with self.db.write() as s:  # one transaction a pass: the pool is shared
                await self.fan_out(s)
                due = await self.claim(s)
        for claimed in due:
            self._per_endpoint[claimed.endpoint_id] += 1
            task = asyncio.create_task(
                self._send_task(session, claimed), name=f"webhook-delivery-{claimed.id}"
            )
            self._inflight[claimed.id] = task
        if time.monotonic() - self._last_prune > 60:
            self._last_prune = time.monotonic()
            await self.prune()

    async def _work_waiting(self) -> bool:
        """Whether an event waits for fan-out or a delivery is due: two indexed reads, so an
        idle pass never takes the write lock (SQLite has one writer)."""
        now = self.clock()
        async with self.db.read() as s:
            event = await s.scalar(
                select(OutboxEvent.id).where(OutboxEvent.dispatched.is_(False)).limit(1)
            )
            if event is not None:
                return True
            due = await s.scalar(
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                )
                .limit(1)
            )
            return due is not None

    async def fan_out(self, s: AsyncSession) -> int:
        """Turn undispatched events into deliveries; returns how many deliveries were made."""
        made = 0
        events = list(
            await s.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.dispatched.is_(False))
                .order_by(OutboxEvent.id)
                .limit(self.config.fan_out_batch)
                .with_for_update(skip_locked=True)
            )
        )
        if not events:
            return 0
        endpoints = list(await s.scalars(select(WebhookEndpoint)))
        now = self.clock()
        for e in events:
            e.dispatched = True
            targets = [ep for ep in endpoints if _subscribed(ep, e.type)]
            if not targets:
                continue
            body = json.dumps(
                event_body(e.event_id, e.type, e.subject, format_time(e.at), e.data),
                separators=(",", ":"),
                sort_keys=True,
                default=str,
            )
            for ep in targets:
                s.add(
                    WebhookDelivery(
                        endpoint_id=ep.id,
                        event_id=e.event_id,
                        type=e.type,
                        body=body,
                        state="pending",
                        attempts=0,
                        next_attempt_at=now,
                        log=[],
                        created_at=now,
                    )
                )
                made += 1
        self.fanned_out += made
        return made

    async def claim(self, s: AsyncSession) -> list[_Claimed]:
        """Lease due deliveries to this replica, within the in-flight limits."""
        room = self.config.concurrency - len(self._inflight)
        if room <= 0:
            return []
        now = self.clock()
        out: list[_Claimed] = []
        rows = (
            await s.execute(
                select(WebhookDelivery, WebhookEndpoint)
                .join(WebhookEndpoint, WebhookDelivery.endpoint_id == WebhookEndpoint.id)
                .where(
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    (WebhookDelivery.claimed_until.is_(None))
                    | (WebhookDelivery.claimed_until < now),
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(room * 4)
                .with_for_update(skip_locked=True, of=WebhookDelivery)
            )
        ).all()
        taken: Counter[str] = Counter()
        until = now + timedelta(seconds=self.config.lease_s)
        for d, ep in rows:
            busy = self._per_endpoint[ep.id] + taken[ep.id]
            if len(out) >= room or busy >= self.config.per_endpoint:
                continue
            if d.id in self._inflight:
                continue
            d.claimed_until = until
            taken[ep.id] += 1
            out.append(
                _Claimed(d.id, ep.id, ep.url, ep.secret, d.body, d.event_id, d.type, d.attempts)
            )
        return out

    async def _send_task(self, session: aiohttp.ClientSession, c: _Claimed) -> None:
        try:
            await self.deliver(session, c)
        except asyncio.CancelledError:
            raise
        except Exception:
            # This delivery's boundary: its lease runs out and a later pass tries it again;
            # the other deliveries are not concerned.
            log.exception("webhook delivery %d to %s could not be recorded", c.id, c.endpoint_id)
        finally:
            self._inflight.pop(c.id, None)
            self._per_endpoint[c.endpoint_id] -= 1
            if self._per_endpoint[c.endpoint_id] <= 0:
                del self._per_endpoint[c.endpoint_id]
            self._wake.set()  # a slot is free

    async def deliver(self, session: aiohttp.ClientSession, c: _Claimed) -> None:
        """One attempt of one claimed delivery, and its result written."""
        status, error, ms = await self._post(session, c)
        attempts = c.attempts + 1
        verdict = self.config.retry.verdict(status, attempts)
        self.attempts[verdict] += 1
        now = self.clock()
        entry = {"at": format_time(now), "status": status, "error": error, "ms": round(ms, 1)}
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status": status,
            "last_error": error,
            "claimed_until": None,
        }
        if verdict == "retry":
            values["next_attempt_at"] = now + timedelta(seconds=self.config.retry.delay_s(attempts))
        else:
            values["state"] = verdict
            values["finished_at"] = now
        if verdict != "delivered":
            log.info(
                "webhook %s delivery %d attempt %d: %s (%s)",
                c.endpoint_id[:8],
                c.id,
                attempts,
                error or status,
                verdict,
            )
        async with self.db.write() as s:
            row = await s.get(WebhookDelivery, c.id, with_for_update=True)
            if row is None or row.state != "pending":
                return  # the endpoint was deleted meanwhile
            row.log = [*row.log, entry][-self.config.retry.max_attempts :]
            for k, v in values.items():
                setattr(row, k, v)

    async def _post(
        self, session: aiohttp.ClientSession, c: _Claimed
    ) -> tuple[int | None, str | None, float]:
        """POST the body; (status or None, error text or None, milliseconds)."""
        started = time.perf_counter()
        try:
            check_url(c.url, self.config.allow_private)  # the policy may have tightened
        except InvalidMessage as exc:
            return None, str(exc)[:MAX_ERROR], 0.0
        body = c.body.encode()
        headers = {
            "Content-Type": "application/json",
            HEADER: signature(c.secret, body),
            EVENT_HEADER: c.type,
            DELIVERY_HEADER: str(c.id),
        }
        try:
            async with session.post(c.url, data=body, headers=headers, allow_redirects=False) as r:
                status: int | None = r.status
                error = None if 200 <= r.status < 300 else f"HTTP {r.status}"
        except TimeoutError:
            status, error = None, f"no answer within {self.config.timeout_s:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            status, error = None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
        return status, error, (time.perf_counter() - started) * 1000

    async def prune(self) -> None:
        """Drop finished deliveries, dispatched events and marks past the retention."""
        cutoff = self.clock() - timedelta(seconds=self.config.retention_s)
        async with self.db.write() as s:
            await s.execute(
                delete(WebhookDelivery).where(
                    WebhookDelivery.state != "pending", WebhookDelivery.finished_at < cutoff
                )
            )
            await s.execute(
                delete(OutboxEvent).where(OutboxEvent.dispatched.is_(True), OutboxEvent.at < cutoff)
            )
            await s.execute(delete(EventMark).where(EventMark.at < cutoff))


def _subscribed(ep: WebhookEndpoint, event_type: str) -> bool:
    events = ep.events if isinstance(ep.events, list) else []
    return wanted([p for p in events if isinstance(p, str)], event_type)
