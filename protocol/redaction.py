"""What counts as a secret in text the project writes (log lines, state files, support
bundles), and how it is masked: one list for the control plane's log filter
(control_plane/security/redact.py) and the agent's diagnostics (agent/host/diagnostics.py),
so a secret shape taught to one is known to both.

Redacted, wherever it appears: ``Bearer <anything>``; the project's secrets by their prefixes
(API tokens ``mfa_``, agent credentials ``mfc_``, enrollment tokens ``mfe_``, webhook secrets
``mfw_``); the value after a key that names a secret (``password=…``, ``"credential": "…"``,
``token: …``); a password in a URL (``mqtt://user:pw@host``). In a JSON value, the value of
every key that names a secret is replaced whole.

Pure: strings and JSON values in, strings and JSON values out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "[redacted]"
# The prefixes of control_plane/security/auth.py (API_TOKEN_PREFIX, AGENT_CREDENTIAL_PREFIX,
# ENROLLMENT_TOKEN_PREFIX, WEBHOOK_SECRET_PREFIX); tests/unit/test_redact.py holds the two
# lists together.
SECRET_PREFIXES = ("mfa_", "mfc_", "mfe_", "mfw_")
# A JSON key whose value is a secret, whatever the value looks like.
SECRET_KEY = re.compile(r"(?i)(password|passwd|secret|credential|token|authorization|private)")

_PATTERNS = (
    # A bearer token, also cut short (aiohttp quotes a header's first 100 bytes).
    (re.compile(r"(?i)(bearer\s+)[^\s'\"\\,;]+"), rf"\g<1>{MASK}"),
    (re.compile(r"\b(" + "|".join(SECRET_PREFIXES) + r")[A-Za-z0-9_\-]+"), rf"\g<1>{MASK}"),
    # key=value, key: value, "key": "value" for keys that name a secret.
    (
        re.compile(r"""(?ix)
        (["']?\b(?:[a-z_]*password|passwd|secret|credential|token|authorization)["']?
         \s*[:=]\s*["']?)
        (?!\[redacted\])[^\s'"&,;}]+"""),
        rf"\g<1>{MASK}",
    ),
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^/\s:@]+:)[^/\s@]+@", re.I), rf"\g<1>{MASK}@"),
)


def redact(text: str) -> str:
    """``text`` with every secret of a known shape replaced by ``[redacted]``."""
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_json(value: Any) -> Any:
    """A JSON value with every value under a key that names a secret masked, strings redacted."""
    if isinstance(value, Mapping):
        return {k: MASK if SECRET_KEY.search(str(k)) else redact_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    if isinstance(value, str):
        return redact(value)
    return value
