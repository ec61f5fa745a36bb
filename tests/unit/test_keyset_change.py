"""control_plane/security/keyset_change.py: the next key set version from a change (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control_plane.security.keyset_change import (
    KeySetChange,
    KeySetChangeError,
    RoleChange,
    next_version,
)
from protocol.dsse import generate_private_key, key_id

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ROOT, PUB, PUB2, CP = (generate_private_key().public_key() for _ in range(4))
CP_ID = key_id(CP)


def first() -> KeySetChange:
    return KeySetChange(
        roles={"publishers": RoleChange(add=(PUB,)), "controlPlane": RoleChange(add=(CP,))},
        expires_days=30,
    )


def test_version_one_takes_its_signers_as_roots() -> None:
    v1 = next_version(None, first(), [ROOT], NOW)
    assert v1.version == 1 and v1.expires_at == NOW + timedelta(days=30)
    assert v1.roles["root"].keyids == (key_id(ROOT),)
    assert v1.roles["publishers"].keyids == (key_id(PUB),)
    assert set(v1.keys) == {key_id(k) for k in (ROOT, PUB, CP)}


def test_a_revoked_publisher_leaves_the_role_and_the_key_list() -> None:
    v1 = next_version(None, first(), [ROOT], NOW)
    change = KeySetChange(
        roles={"publishers": RoleChange(add=(PUB2,), remove=(key_id(PUB),), threshold=1)}
    )
    v2 = next_version(v1, change, [ROOT], NOW)
    assert v2.version == 2 and v2.roles["publishers"].keyids == (key_id(PUB2),)
    assert key_id(PUB) not in v2.keys and v2.roles["root"] == v1.roles["root"]


@pytest.mark.parametrize(
    ("change", "role", "what"),
    [
        (
            KeySetChange(roles={"publishers": RoleChange(remove=("0" * 64,))}),
            "publishers",
            "remove",
        ),
        (
            KeySetChange(roles={"controlPlane": RoleChange(remove=(key_id(CP),))}),
            "controlPlane",
            "remove",
        ),
        (KeySetChange(roles={"root": RoleChange(threshold=2)}), "root", "threshold"),
        (KeySetChange(roles={"auditors": RoleChange()}), "auditors", "role"),
        (KeySetChange(expires_days=0), "", "expires"),
    ],
)
def test_a_change_that_cannot_make_a_valid_key_set_is_refused(
    change: KeySetChange, role: str, what: str
) -> None:
    v1 = next_version(None, first(), [ROOT], NOW)
    with pytest.raises(KeySetChangeError) as err:
        next_version(v1, change, [ROOT], NOW)
    assert (err.value.role, err.value.what) == (role, what)
