"""The signature of a delivery: ``X-Modelfleet-Signature: sha256=<hex>`` (pure).

HMAC-SHA256 of the raw body with the endpoint's secret. The body carries the event's id and
time, so a receiver that keeps the ids it has seen refuses a replay; it must compare with
``hmac.compare_digest`` and hash the bytes it received, not a re-serialisation.
"""

from __future__ import annotations

import hashlib
import hmac

HEADER = "X-Modelfleet-Signature"
EVENT_HEADER = "X-Modelfleet-Event"
DELIVERY_HEADER = "X-Modelfleet-Delivery"


def signature(secret: str, body: bytes) -> str:
    """The header value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` under ``secret`` (constant time)."""
    return header is not None and hmac.compare_digest(signature(secret, body), header)
