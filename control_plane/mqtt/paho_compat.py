"""MQTT 5 strings read as the standard says, so one hostile publisher cannot keep the bridge
off the broker.

paho-mqtt's ``readUTF`` refuses U+FEFF in a string (a user property, a content type, a response
topic) as a malformed packet, though MQTT-1.5.4-3 says a receiver must keep it; mosquitto
forwards it. A single agent publishing a user property that holds U+FEFF on its own topic made
paho drop the bridge's connection with a protocol error; the broker redelivered the
unacknowledged message to the bridge's persistent session on every reconnect, so the bridge
(every replica, on the answer topic none of them shares) never stayed connected again.

:func:`install` replaces paho's reader with one that checks only the string's length and
decodes it (bytes that are not UTF-8 become U+FFFD, which mosquitto never lets through
anyway): what a string holds is hostile input the bridge's own parsers check and set aside.
"""

from __future__ import annotations

from paho.mqtt import properties


def read_utf(buffer: bytes | bytearray, maxlen: int) -> tuple[str, int]:
    """An MQTT UTF-8 string at the start of ``buffer``: (the string, bytes it took).

    Raises paho's MalformedPacket only when the length does not fit (the packet is broken).
    """
    if maxlen < 2:
        raise properties.MalformedPacket("Not enough data to read string length")
    length = properties.readInt16(buffer)
    if length > maxlen - 2:
        raise properties.MalformedPacket("Length delimited string too long")
    return bytes(buffer[2 : 2 + length]).decode("utf-8", "replace"), length + 2


def install() -> None:
    """Use :func:`read_utf` for every MQTT 5 property string paho reads (idempotent)."""
    properties.readUTF = read_utf  # type: ignore[assignment]
