"""The transport choice (pure): which route a bundle fetch takes, HTTP or MQTT.

``bundle_transport`` is ``http``, ``mqtt`` or ``auto`` (HTTP first, MQTT when the control
plane cannot be reached over HTTP and the broker link is up). An HTTP answer with a status
(404, 500, ...) is an answer, not an unreachable control plane: it never falls back.
"""

from __future__ import annotations

from enum import Enum


class Route(Enum):
    HTTP = "http"
    MQTT = "mqtt"


class NoRoute(Exception):
    """The configured transport cannot be used (``mqtt`` without a broker)."""


def first_route(mode: str, *, broker: bool) -> Route:
    """The route to try first; raises NoRoute for ``mqtt`` without a broker configured."""
    if mode == "mqtt":
        if not broker:
            raise NoRoute("bundle transport mqtt needs a broker (--mqtt or enrollment)")
        return Route.MQTT
    return Route.HTTP


def falls_back(mode: str, *, http_answered: bool, broker_connected: bool) -> bool:
    """After HTTP failed: try MQTT? Only in ``auto`` mode, when HTTP gave no answer at all
    (link trouble, not a status) and the broker link is up."""
    return mode == "auto" and not http_answered and broker_connected
