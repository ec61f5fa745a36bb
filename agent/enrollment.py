"""Enrolling this machine: one enrollment with the control plane, its answer saved whole.

``modelfleet agent enroll`` and ``modelfleet agent install`` both call :func:`enroll_into`, so an
installed agent keeps everything the control plane hands out at enrollment (the MQTT broker and
credentials among them) exactly as an enrolled one does.
"""

from __future__ import annotations

import ssl
from typing import Any

from agent.client import enroll
from agent.exceptions import TransportError
from agent.storage.state import Identity, StateDir


async def enroll_into(
    dirs: StateDir,
    *,
    server: str,
    token: str,
    name: str | None,
    labels: dict[str, str],
    facts: dict[str, Any],
    ssl_context: ssl.SSLContext | None = None,
) -> Identity:
    """Enroll with ``token`` and save the identity, keys and key set in ``dirs``.

    Raises TransportError (HttpStatusError for a refusal, or an answer missing a field).
    """
    out = await enroll(server, token, name, labels, facts, ssl_context)
    try:
        identity = Identity(
            agent_id=out["agentId"],
            server=server,
            credential=out["credential"],
            name=out["name"],
            labels=out["labels"],
            mqtt=out.get("mqtt"),
        )
        control_plane_key = out["controlPlaneKey"]
    except (KeyError, TypeError) as exc:
        raise TransportError(f"the control plane's enrollment answer lacks {exc}") from None
    dirs.save_enrollment(
        identity, control_plane_key, out.get("trustedPublishers", []), out.get("keyset")
    )
    return identity
