"""``emit``: an event written in the same transaction as the change it announces.

Written as an outbox row, never sent from here: the change and its event commit together
or not at all, and the delivery loop (control_plane/events/delivery.py) sends it later from
whichever replica claims it. Emitting costs one INSERT and never fails the change for a
receiver's sake.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.db.models import OutboxEvent


def emit(s: AsyncSession, event_type: str, subject: str, data: dict[str, Any], at: datetime) -> str:
    """Add an event to the open transaction; returns its id."""
    event_id = str(uuid.uuid4())
    s.add(
        OutboxEvent(
            event_id=event_id,
            type=event_type,
            subject=subject[:200],
            at=at,
            data=data,
            dispatched=False,
        )
    )
    return event_id


def event_body(event_id: str, event_type: str, subject: str, at: str, data: dict[str, Any]) -> dict:
    """The JSON every delivery of an event carries."""
    return {"id": event_id, "type": event_type, "subject": subject, "time": at, "data": data}
