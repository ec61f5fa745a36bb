"""MQTT topic names. Every topic lives under a prefix (``modelfleet/v1`` by default; tests use
one of their own) so that fleets, and tests, can share a broker."""

from __future__ import annotations

from protocol.exceptions import InvalidMessage

DEFAULT_PREFIX = "modelfleet/v1"
SHARED_GROUP = "modelfleet"
# metrics/ack: the control plane's word that a metrics batch (by seq) is stored, so the agent
# may forget it; a broker's PUBACK only says the broker has it. commands: signed operator
# commands to the agent (protocol/commands.py); commands/answer: its answers, in chunks.
AGENT_KINDS = (
    "desired",
    "status",
    "metrics",
    "metrics/ack",
    "presence",
    "blobs/request",
    "blobs/response",
    "commands",
    "commands/answer",
)
# Bundles over MQTT: chunks of at most this many bytes answer one request each.
MAX_CHUNK_BYTES = 128 * 1024


def agent_topic(agent_id: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>/agents/<id>/<kind>``."""
    if kind not in AGENT_KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{prefix}/agents/{agent_id}/{kind}"


def shared_filter(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """A shared subscription over every agent's ``kind`` topic, so replicas split the load."""
    return f"$share/{SHARED_GROUP}/{prefix}/agents/+/{kind}"


def every_agent_filter(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Every agent's ``kind`` topic, for each subscriber (not shared among replicas)."""
    return f"{prefix}/agents/+/{kind}"


def parse_agent_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """(agent id, kind) of an agent topic; raises InvalidMessage for anything else."""
    head = f"{prefix}/agents/"
    if not topic.startswith(head):
        raise InvalidMessage(f"topic {topic!r} is not under {head}", "topic")
    agent_id, _, kind = topic[len(head) :].partition("/")
    if not agent_id or kind not in AGENT_KINDS:
        raise InvalidMessage(f"topic {topic!r} is not <agent id>/<kind>", "topic")
    return agent_id, kind
