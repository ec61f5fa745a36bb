"""Webhook endpoints and their delivery log: the service behind REST and the CLI."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select

from control_plane.db.engine import Database
from control_plane.db.models import WebhookDelivery, WebhookEndpoint
from control_plane.errors import Conflict, NotFound
from control_plane.events.receivers import check_url
from control_plane.events.types import check_patterns
from control_plane.security.auth import WEBHOOK_SECRET_PREFIX, new_secret
from protocol.fields import get_str
from protocol.timeutil import format_time

MAX_ENDPOINTS = 100
MAX_LIST = 500


@dataclass(frozen=True, kw_only=True)
class WebhookRequest:
    """A request for a webhook endpoint, parsed at the edge."""

    url: str
    events: tuple[str, ...]
    description: str = ""

    @classmethod
    def parse(cls, body: dict[str, Any], allow_private: bool) -> WebhookRequest:
        """Parse a JSON body; raises InvalidMessage naming the field."""
        return cls(
            url=check_url(body.get("url"), allow_private),
            events=check_patterns(body.get("events")),
            description=get_str(body, "description", optional=True, max_len=200) or "",
        )


def endpoint_json(row: WebhookEndpoint) -> dict[str, Any]:
    """Public view of an endpoint: never its secret."""
    return {
        "id": row.id,
        "url": row.url,
        "events": list(row.events),
        "description": row.description,
        "createdAt": format_time(row.created_at),
    }


def delivery_json(row: WebhookDelivery) -> dict[str, Any]:
    """One delivery and its attempts."""
    return {
        "id": row.id,
        "eventId": row.event_id,
        "type": row.type,
        "state": row.state,
        "attempts": row.attempts,
        "lastStatus": row.last_status,
        "lastError": row.last_error,
        "createdAt": format_time(row.created_at),
        "nextAttemptAt": format_time(row.next_attempt_at) if row.state == "pending" else None,
        "finishedAt": format_time(row.finished_at) if row.finished_at else None,
        "log": list(row.log),
    }


async def create_endpoint(db: Database, req: WebhookRequest, now: datetime) -> dict[str, Any]:
    """Create an endpoint; its secret is in this answer only. Raises Conflict past the limit."""
    secret = new_secret(WEBHOOK_SECRET_PREFIX)
    row = WebhookEndpoint(
        id=str(uuid.uuid4()),
        url=req.url,
        events=list(req.events),
        secret=secret,
        description=req.description,
        created_at=now,
    )
    async with db.write() as s:
        count = await s.scalar(select(func.count()).select_from(WebhookEndpoint))
        if (count or 0) >= MAX_ENDPOINTS:
            raise Conflict("too_many_webhooks", f"at most {MAX_ENDPOINTS} webhook endpoints")
        s.add(row)
    return {**endpoint_json(row), "secret": secret}


async def list_endpoints(db: Database) -> list[dict[str, Any]]:
    """Every endpoint, oldest first, with counts of its deliveries by state."""
    async with db.read() as s:
        rows = list(
            await s.scalars(
                select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
            )
        )
        counts: dict[str, dict[str, int]] = {}
        for endpoint_id, state, n in await s.execute(
            select(WebhookDelivery.endpoint_id, WebhookDelivery.state, func.count()).group_by(
                WebhookDelivery.endpoint_id, WebhookDelivery.state
            )
        ):
            counts.setdefault(endpoint_id, {})[state] = n
    return [{**endpoint_json(r), "deliveries": counts.get(r.id, {})} for r in rows]


async def delete_endpoint(db: Database, endpoint_id: str) -> dict[str, Any]:
    """Delete an endpoint and its delivery log; raises NotFound."""
    async with db.write() as s:
        row = await s.get(WebhookEndpoint, endpoint_id)
        if row is None:
            raise NotFound("webhook_not_found", f"no webhook endpoint {endpoint_id}", "id")
        out = endpoint_json(row)
        await s.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id))
        await s.delete(row)
    return out


async def list_deliveries(
    db: Database, endpoint_id: str, limit: int, state: str | None = None
) -> list[dict[str, Any]]:
    """An endpoint's deliveries, newest first; raises NotFound for an unknown endpoint."""
    async with db.read() as s:
        if await s.get(WebhookEndpoint, endpoint_id) is None:
            raise NotFound("webhook_not_found", f"no webhook endpoint {endpoint_id}", "id")
        q = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
        if state is not None:
            q = q.where(WebhookDelivery.state == state)
        rows = await s.scalars(q.order_by(WebhookDelivery.id.desc()).limit(min(limit, MAX_LIST)))
        return [delivery_json(r) for r in rows]
