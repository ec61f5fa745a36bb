"""Property tests of the protocol's parsers and the .mfb reader: any input gives either a value
or the package's own error (ProtocolError and its subclasses), never another exception."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.bundle import BundleLimits, read_bundle
from protocol.desired import accept_desired, desired_from_json
from protocol.dsse import generate_private_key, keyring, parse_envelope, sign
from protocol.exceptions import ProtocolError
from protocol.keyset import KEYSET_PAYLOAD_TYPE, keyset_from_json, open_first
from protocol.labels import parse_selector, selector_from_json
from protocol.manifest import manifest_from_json, parse_manifest
from protocol.reports import metrics_from_json, status_from_json
from protocol.sketch import DDSketch

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON-shaped values, with keys the parsers look for so that deep branches are reached.
KEYS = st.sampled_from(
    [
        "agentId",
        "generation",
        "sentAt",
        "models",
        "name",
        "version",
        "manifestDigest",
        "state",
        "seq",
        "windowStart",
        "windowEnd",
        "series",
        "requests",
        "errors",
        "latencyMs",
        "bins",
        "relativeAccuracy",
        "count",
        "zeroCount",
        "min",
        "max",
        "sum",
        "issuedAt",
        "expiresAt",
        "rollback",
        "shadow",
        "sample",
        "files",
        "path",
        "digest",
        "size",
        "mediaType",
        "runtime",
        "inputs",
        "outputs",
        "shape",
        "datatype",
        "smokeTest",
        "variants",
        "schemaVersion",
        "key",
        "operator",
        "values",
        "payload",
        "payloadType",
        "signatures",
        "keyid",
        "sig",
        "facts",
        "lastError",
        "created",
        "shadowCount",
        "driftSum",
        "argmaxAgree",
        "x",
        "type",
        "keys",
        "roles",
        "root",
        "publishers",
        "controlPlane",
        "keyids",
        "threshold",
        "keytype",
        "publicKey",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        ["2026-01-01T00:00:00Z", "sha256:" + "a" * 64, "1.0.0", "iris", "onnx", "FP32", "active"]
    )
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=8)
    ),
    max_leaves=40,
)


KEY = generate_private_key()


def only_protocol_errors(fn: Any, *args: Any) -> None:
    with contextlib.suppress(ProtocolError):
        fn(*args)


@SETTINGS
@given(JSON)
def test_json_parsers_raise_only_protocol_errors(doc: Any) -> None:
    for fn in (
        status_from_json,
        metrics_from_json,
        desired_from_json,
        manifest_from_json,
        selector_from_json,
        DDSketch.from_json,
    ):
        only_protocol_errors(fn, doc)


@SETTINGS
@given(JSON)
def test_signed_but_malformed_keyset_is_refused_cleanly(doc: Any) -> None:
    """A key set payload of any shape, validly signed: a value or our error, nothing else."""
    only_protocol_errors(keyset_from_json, doc)
    env = sign(KEYSET_PAYLOAD_TYPE, json.dumps(doc, default=str).encode(), [KEY])
    only_protocol_errors(open_first, env.to_bytes(), datetime.now(UTC))


@SETTINGS
@given(st.binary(max_size=400) | JSON.map(lambda d: json.dumps(d, default=str).encode()))
def test_byte_parsers_raise_only_protocol_errors(data: bytes) -> None:
    only_protocol_errors(parse_envelope, data)
    only_protocol_errors(parse_manifest, data)
    keys = keyring([KEY.public_key()])
    only_protocol_errors(accept_desired, data, keys, "agent", 0, datetime.now(UTC))
    only_protocol_errors(open_first, data, datetime.now(UTC))


@SETTINGS
@given(st.text(max_size=80))
def test_selector_text_raises_only_protocol_errors(text: str) -> None:
    only_protocol_errors(parse_selector, text)


@SETTINGS
@given(JSON)
def test_signed_but_malformed_desired_state_is_refused_cleanly(doc: Any) -> None:
    """Even with a valid signature, a payload of any shape gives a value or our error."""
    env = sign(
        "application/vnd.modelfleet.desired.v1+json", json.dumps(doc, default=str).encode(), [KEY]
    )
    only_protocol_errors(
        accept_desired, env.to_bytes(), keyring([KEY.public_key()]), "agent", 0, datetime.now(UTC)
    )


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "../../etc/passwd"
                info.size = 0
                data = b""
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBER = st.tuples(
    st.sampled_from(
        [
            "manifest.dsse.json",
            "model.onnx",
            "../x",
            "/abs",
            "a/../../b",
            "ok.bin",
            "dir/",
            "x" * 120,
        ]
    ),
    st.binary(max_size=200),
    st.sampled_from(
        [tarfile.REGTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE]
    ),
)


@SETTINGS
@given(st.lists(MEMBER, max_size=5), st.binary(max_size=64), st.integers(0, 2000))
def test_bundle_reader_raises_only_protocol_errors(members: list, junk: bytes, cut: int) -> None:
    data = _tar(members)
    limits = BundleLimits(max_total_bytes=4096, max_member_bytes=1024, max_members=4)
    for blob in (data, data[:cut], data[:cut] + junk + data[cut:], junk):
        only_protocol_errors(read_bundle, io.BytesIO(blob), limits)
