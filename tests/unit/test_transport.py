"""agent/transport.py: HTTP or MQTT for a bundle fetch."""

from __future__ import annotations

import pytest

from agent.transport import NoRoute, Route, falls_back, first_route


def test_first_route() -> None:
    assert first_route("http", broker=True) is Route.HTTP
    assert first_route("auto", broker=True) is Route.HTTP
    assert first_route("auto", broker=False) is Route.HTTP
    assert first_route("mqtt", broker=True) is Route.MQTT
    with pytest.raises(NoRoute, match="needs a broker"):
        first_route("mqtt", broker=False)


def test_only_auto_falls_back_and_only_when_http_gave_no_answer_and_the_broker_is_up() -> None:
    assert falls_back("auto", http_answered=False, broker_connected=True)
    assert not falls_back("auto", http_answered=True, broker_connected=True)  # a 404 is an answer
    assert not falls_back("auto", http_answered=False, broker_connected=False)
    assert not falls_back("http", http_answered=False, broker_connected=True)
