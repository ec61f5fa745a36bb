"""The one table from domain errors to HTTP statuses."""

from __future__ import annotations

import pytest

from control_plane.api.errors import ApiError, status_of, to_api
from control_plane.catalog.blobstore import BlobNotFound
from control_plane.errors import (
    Conflict,
    DatabaseBusy,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Refused,
    TooLarge,
    Unauthenticated,
)
from protocol.exceptions import InvalidMessage


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        (Invalid, 400),
        (Unauthenticated, 401),
        (Forbidden, 403),
        (NotFound, 404),
        (Conflict, 409),
        (TooLarge, 413),
        (Refused, 422),
        (DomainError, 400),
    ],
)
def test_each_domain_error_has_its_status(kind: type[DomainError], status: int) -> None:
    err = to_api(kind("some_code", "a message", "aField"))
    assert isinstance(err, ApiError)
    assert (err.status, err.code, err.message, err.field) == (
        status,
        "some_code",
        "a message",
        "aField",
    )
    assert status_of(kind("c", "m")) == status


def test_the_body_leaves_out_a_missing_field() -> None:
    assert to_api(NotFound("agent_not_found", "no agent x")).to_json() == {
        "error": {"code": "agent_not_found", "message": "no agent x"}
    }


def test_the_edge_knows_the_protocol_refusal_a_busy_database_and_a_missing_blob() -> None:
    bad = to_api(InvalidMessage("labels must be an object", "labels"))
    assert (bad.status, bad.code, bad.field) == (400, "invalid", "labels")
    busy = to_api(DatabaseBusy("pool timeout", retry_after_s=2.5))
    assert (busy.status, busy.code, busy.headers) == (503, "database_busy", {"Retry-After": "3"})
    missing = to_api(BlobNotFound("sha256:" + "0" * 64))
    assert (missing.status, missing.code, missing.field) == (404, "blob_not_found", "digest")
