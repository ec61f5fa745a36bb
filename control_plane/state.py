"""What every handler and background task shares: the State, and the app keys that hold it.

Its own module so that the app (``control_plane/app.py``) and the REST handlers
(``control_plane/api/``) both stand on it without importing each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from control_plane.catalog.blobstore import BlobStore
from control_plane.config import ServerConfig
from control_plane.db.engine import Database
from control_plane.events.delivery import WebhookDeliverer
from control_plane.fleet.desired import DesiredSigner
from control_plane.fleet.ingest import Ingestor
from control_plane.fleet.notify import DesiredNotifier
from control_plane.rollout.controller import RolloutController
from control_plane.security import audit
from control_plane.security.ratelimit import RateLimiter
from control_plane.telemetry import OFF, Telemetry

Clock = Callable[[], datetime]


@dataclass
class State:
    """What every handler may use; held in one AppKey."""

    config: ServerConfig
    db: Database
    store: BlobStore
    signer: DesiredSigner
    notifier: DesiredNotifier
    trusted: dict[str, Ed25519PublicKey]
    clock: Clock
    controller: RolloutController
    ingest: Ingestor
    limiter: RateLimiter | None = None
    # Unauthenticated refusals per source address (see source_limit_middleware).
    refusal_limiter: RateLimiter | None = None
    refusals: audit.RefusalLog | None = None
    webhooks: WebhookDeliverer | None = None  # set by create_app
    telemetry: Telemetry = OFF  # OpenTelemetry (off unless an OTLP endpoint is configured)
    # Set when SIGTERM's drain begins: long-polls answer at once instead of waiting.
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    polling: dict[str, int] = field(default_factory=dict)  # agent id -> long-polls waiting
    # Operators waiting for an agent's answer, keyed by command id (fleet/commands.py): woken
    # when this process stores the answer (HTTP or the MQTT bridge).
    answers: DesiredNotifier = field(default_factory=DesiredNotifier)

    def drain(self) -> None:
        """Begin draining: every waiting long-poll answers now, new ones at once."""
        self.draining.set()
        self.notifier.wake(list(self.polling))
        self.answers.wake_all()


STATE = web.AppKey("state", State)
MQTT = web.AppKey("mqtt", object)  # the MqttBridge when a broker is configured
