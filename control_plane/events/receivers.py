"""What a receiver URL may be, and which addresses a delivery may connect to (pure).

A receiver URL is operator input that makes the control plane send requests: checked when
the endpoint is created (scheme, host, no credentials, no fragment, no control characters) and
again at every connection, after DNS, so a name that later resolves to a forbidden address
(DNS rebinding) is refused too. Never allowed: unspecified, multicast, reserved and link-local
addresses (169.254.169.254 is a cloud's metadata service). Loopback and private addresses only
when the server allows them (``webhook_allow_private``): on-premises receivers often live
there, but a control plane in a cloud should not be made to probe its own network.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from protocol.exceptions import InvalidMessage

MAX_URL = 2048


def address_allowed(address: str, allow_private: bool) -> bool:
    """Whether a delivery may connect to this IP address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return False
    if ip.is_loopback or ip.is_private or not ip.is_global:
        return allow_private
    return True


def check_url(raw: object, allow_private: bool, field: str = "url") -> str:
    """A receiver URL as given; raises InvalidMessage naming ``field`` when it may not be one."""
    if not isinstance(raw, str) or not raw:
        raise InvalidMessage(f"{field} must be an http:// or https:// URL", field)
    if len(raw) > MAX_URL:
        raise InvalidMessage(f"{field} is longer than {MAX_URL} characters", field)
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in raw) or not raw.isascii():
        raise InvalidMessage(f"{field} holds whitespace, control or non-ASCII characters", field)
    try:
        u = urlsplit(raw)
        port = u.port
    except ValueError as exc:
        raise InvalidMessage(f"{field} is not a valid URL: {exc}", field) from None
    if u.scheme not in ("http", "https"):
        raise InvalidMessage(f"{field} must use http or https, not {u.scheme!r}", field)
    if not u.hostname:
        raise InvalidMessage(f"{field} has no host", field)
    if u.username is not None or u.password is not None:
        raise InvalidMessage(
            f"{field} must not carry credentials (deliveries are signed with the secret)", field
        )
    if u.fragment:
        raise InvalidMessage(f"{field} must not have a #fragment", field)
    if port == 0:
        raise InvalidMessage(f"{field} has port 0", field)
    try:
        ipaddress.ip_address(u.hostname)
    except ValueError:
        if u.hostname == "localhost" and not allow_private:
            raise InvalidMessage(
                f"{field}: loopback receivers are not allowed here", field
            ) from None
        return raw
    if not address_allowed(u.hostname, allow_private):
        raise InvalidMessage(
            f"{field}: {u.hostname} is not an address deliveries may go to "
            "(link-local, multicast, reserved, or private without webhook_allow_private)",
            field,
        )
    return raw
