"""The signed key set: who may sign what, and how a new version is believed (protocol/keyset)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.desired import DesiredState, accept_desired
from protocol.dsse import generate_private_key, key_id, sign
from protocol.exceptions import InvalidMessage, ReplayError, SignatureError
from protocol.keyset import (
    KEYSET_PAYLOAD_TYPE,
    KeySet,
    follow_chain,
    make_keyset,
    next_keyset,
    open_first,
    sign_keyset,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=365)


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [generate_private_key() for _ in range(n)]


def build(
    version: int,
    roots: list,
    pubs: list,
    cps: list,
    *,
    rt: int = 1,
    pt: int = 1,
    expires: datetime = LATER,
) -> KeySet:
    return make_keyset(
        version,
        expires,
        [k.public_key() for k in roots],
        [k.public_key() for k in pubs],
        [k.public_key() for k in cps],
        root_threshold=rt,
        publisher_threshold=pt,
    )


def test_first_version_is_believed_when_its_own_roots_signed_it() -> None:
    root, pub, cp = keys(3)
    ks = build(1, [root], [pub], [cp])
    data = sign_keyset(ks, [root]).to_bytes()
    got = open_first(data, NOW)
    assert got.version == 1
    assert list(got.trusted("publishers")) == [key_id(pub.public_key())]
    assert list(got.trusted("controlPlane")) == [key_id(cp.public_key())]
    assert got.to_bytes() == ks.to_bytes()  # the canonical form round-trips
    with pytest.raises(SignatureError, match="its own root keys"):
        open_first(sign_keyset(ks, [pub]).to_bytes(), NOW)
    with pytest.raises(ReplayError, match="expired"):
        open_first(data, LATER)


def test_next_version_needs_the_old_roots_and_the_new_ones() -> None:
    r1, r2, pub, cp = keys(4)
    v1 = build(1, [r1], [pub], [cp])
    v2 = build(2, [r2], [pub], [cp])  # the root moves from r1 to r2
    assert next_keyset(v1, sign_keyset(v2, [r1, r2]).to_bytes(), NOW).version == 2
    with pytest.raises(SignatureError, match="version 1's root keys"):
        next_keyset(v1, sign_keyset(v2, [r2]).to_bytes(), NOW)  # a thief of the new key alone
    with pytest.raises(SignatureError, match="its own root keys"):
        next_keyset(v1, sign_keyset(v2, [r1]).to_bytes(), NOW)
    # Once rotated, the old root key alone can sign nothing that is believed.
    v3 = build(3, [r1], [pub], [cp])
    with pytest.raises(SignatureError, match="version 2's root keys"):
        next_keyset(v2, sign_keyset(v3, [r1]).to_bytes(), NOW)


def test_rollback_skip_and_expired_versions_are_refused() -> None:
    root, pub, cp = keys(3)
    v1, v2, v3 = (build(v, [root], [pub], [cp]) for v in (1, 2, 3))
    with pytest.raises(ReplayError, match="not newer"):
        next_keyset(v2, sign_keyset(v1, [root]).to_bytes(), NOW)
    with pytest.raises(ReplayError, match="not newer"):
        next_keyset(v2, sign_keyset(v2, [root]).to_bytes(), NOW)
    with pytest.raises(InvalidMessage, match="skips"):
        next_keyset(v1, sign_keyset(v3, [root]).to_bytes(), NOW)
    old = build(2, [root], [pub], [cp], expires=NOW - timedelta(seconds=1))
    with pytest.raises(ReplayError, match="expired"):  # a stale one withheld, then replayed
        next_keyset(v1, sign_keyset(old, [root]).to_bytes(), NOW)


def test_thresholds_count_distinct_root_keys() -> None:
    a, b, c, pub, cp = keys(5)
    v1 = build(1, [a, b, c], [pub], [cp], rt=2)
    data = sign_keyset(v1, [a]).to_bytes()
    with pytest.raises(SignatureError, match="needs 2"):
        open_first(data, NOW)
    env = json.loads(data)
    env["signatures"] = env["signatures"] * 2  # the same key's signature twice is still one
    with pytest.raises(SignatureError, match="needs 2"):
        open_first(json.dumps(env).encode(), NOW)
    assert open_first(sign_keyset(v1, [a, c]).to_bytes(), NOW).threshold("root") == 2


def test_chain_walks_every_version_and_stops_at_a_bad_one() -> None:
    r1, r2, r3, pub, cp = keys(5)
    v1 = build(1, [r1], [pub], [cp])
    v2 = build(2, [r2], [pub], [cp])
    v3 = build(3, [r3], [pub], [cp], expires=LATER)
    envs = [
        sign_keyset(v1, [r1]).to_bytes(),
        sign_keyset(v2, [r1, r2]).to_bytes(),
        sign_keyset(v3, [r2, r3]).to_bytes(),
    ]
    got, applied = follow_chain(v1, envs[1:], NOW)
    assert (got.version, applied) == (3, 2) if got else False
    # From nothing: version 1 is taken as offered (trust on first use), the rest must follow.
    got, applied = follow_chain(None, envs, NOW)
    assert (got.version, applied) == (3, 3) if got else False
    with pytest.raises(InvalidMessage, match="skips"):
        follow_chain(v1, [envs[2]], NOW)  # v3 after v1 without v2
    with pytest.raises(SignatureError, match="version 1's root keys"):
        follow_chain(v1, [sign_keyset(v2, [r2]).to_bytes()], NOW)  # v2 signed by its new root alone
    assert follow_chain(v1, [], NOW) == (v1, 0)


def test_desired_state_from_a_rotated_control_plane_key() -> None:
    """What the agent does with the controlPlane role: a removed key's documents are refused."""
    root, pub, cp1, cp2 = keys(4)
    both = build(2, [root], [pub], [cp1, cp2])
    only_new = build(3, [root], [pub], [cp2])
    state = DesiredState("a1", 5, NOW, NOW + timedelta(days=7), ())
    by_old = state.sign(cp1).to_bytes()
    assert accept_desired(by_old, both.trusted("controlPlane"), "a1", 4, NOW) is not None
    with pytest.raises(SignatureError):
        accept_desired(by_old, only_new.trusted("controlPlane"), "a1", 4, NOW)
    by_new = state.sign(cp2).to_bytes()
    assert accept_desired(by_new, only_new.trusted("controlPlane"), "a1", 4, NOW) is not None


def _tampered(ks: KeySet, root: Ed25519PrivateKey, change: Any) -> bytes:
    doc = ks.to_json()
    change(doc)
    return sign(KEYSET_PAYLOAD_TYPE, json.dumps(doc).encode(), [root]).to_bytes()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["roles"]["publishers"].update(threshold=2), "roles.publishers.threshold"),
        (lambda d: d["roles"]["publishers"].update(threshold=0), "roles.publishers.threshold"),
        (lambda d: d["roles"]["root"].update(keyids=[]), "roles.root.keyids"),
        (
            lambda d: d["roles"]["controlPlane"].update(keyids=["ab" * 32]),
            "roles.controlPlane.keyids",
        ),
        (lambda d: d["roles"].update(admins={"keyids": [], "threshold": 1}), "roles"),
        (lambda d: d["roles"].pop("controlPlane"), "roles.controlPlane"),
        (lambda d: d.update(version=0), "version"),
        (lambda d: d.update(version="2"), "version"),
        (lambda d: d.update(expiresAt="soon"), "expiresAt"),
        (lambda d: d.update(type="manifest"), "type"),
        (lambda d: d.update(extra=1), "keyset"),
    ],
)
def test_malformed_key_sets_name_the_field(change: Any, field: str) -> None:
    root, pub, cp = keys(3)
    ks = build(1, [root], [pub], [cp])
    with pytest.raises(InvalidMessage) as err:
        open_first(_tampered(ks, root, change), NOW)
    assert err.value.field == field


def test_a_key_listed_under_another_keys_id_is_refused() -> None:
    root, pub, cp, other = keys(4)
    ks = build(1, [root], [pub], [cp])

    def swap(d: dict) -> None:
        kid = key_id(pub.public_key())
        d["keys"][kid]["publicKey"] = build(1, [other], [other], [other]).to_json()["keys"][
            key_id(other.public_key())
        ]["publicKey"]

    with pytest.raises(InvalidMessage, match="is not the key's id"):
        open_first(_tampered(ks, root, swap), NOW)
    manifest_typed = sign("application/vnd.modelfleet.manifest.v1+json", ks.to_bytes(), [root])
    with pytest.raises(SignatureError, match="payload type"):
        open_first(manifest_typed.to_bytes(), NOW)
