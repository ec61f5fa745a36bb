"""DSSE signing and verification."""

from __future__ import annotations

import base64
import json

import pytest

from protocol.dsse import (
    MANIFEST_PAYLOAD_TYPE,
    generate_private_key,
    key_id,
    keyring,
    pae,
    parse_envelope,
    sign,
    verify,
)
from protocol.exceptions import InvalidMessage, SignatureError


def test_pae_matches_the_dsse_spec() -> None:
    # The example from the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_round_trip_and_keyid() -> None:
    k = generate_private_key()
    env = sign(MANIFEST_PAYLOAD_TYPE, b"{}", [k])
    parsed = parse_envelope(env.to_bytes())
    payload, kids = verify(parsed, keyring([k.public_key()]), MANIFEST_PAYLOAD_TYPE)
    assert payload == b"{}"
    assert kids == [key_id(k.public_key())]
    assert len(kids[0]) == 64


def test_untrusted_key_is_refused() -> None:
    env = sign(MANIFEST_PAYLOAD_TYPE, b"{}", [generate_private_key()])
    with pytest.raises(SignatureError, match="trusted"):
        verify(env, keyring([generate_private_key().public_key()]), MANIFEST_PAYLOAD_TYPE)


def test_tampered_payload_is_refused() -> None:
    k = generate_private_key()
    doc = sign(MANIFEST_PAYLOAD_TYPE, b'{"a":1}', [k]).to_json()
    doc["payload"] = base64.b64encode(b'{"a":2}').decode()
    env = parse_envelope(json.dumps(doc).encode())
    with pytest.raises(SignatureError):
        verify(env, keyring([k.public_key()]), MANIFEST_PAYLOAD_TYPE)


def test_payload_type_is_bound() -> None:
    k = generate_private_key()
    env = sign("application/other", b"{}", [k])
    with pytest.raises(SignatureError, match="payload type"):
        verify(env, keyring([k.public_key()]), MANIFEST_PAYLOAD_TYPE)


def test_threshold_counts_distinct_trusted_keys() -> None:
    a, b = generate_private_key(), generate_private_key()
    env = sign(MANIFEST_PAYLOAD_TYPE, b"x", [a, a])
    with pytest.raises(SignatureError, match="needs 2"):
        verify(env, keyring([a.public_key(), b.public_key()]), MANIFEST_PAYLOAD_TYPE, 2)
    env = sign(MANIFEST_PAYLOAD_TYPE, b"x", [a, b])
    _, kids = verify(env, keyring([a.public_key(), b.public_key()]), MANIFEST_PAYLOAD_TYPE, 2)
    assert len(kids) == 2


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"payloadType": "", "payload": "", "signatures": []}',
        b'{"payloadType": "t", "payload": "!!!", "signatures": [{"keyid": "", "sig": ""}]}',
        b'{"payloadType": "t", "payload": "", "signatures": []}',
        b'{"payloadType": "t", "payload": "", "signatures": ["x"]}',
        b'{"payloadType": "t", "payload": "", "signatures": [{"keyid": 1, "sig": ""}]}',
    ],
)
def test_malformed_envelopes_raise_invalid_message(raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        parse_envelope(raw)
