"""What counts as a secret in text the project writes (log lines, state files, support
bundles), and how it is masked: one list for the control plane's log filter
(control_plane/security/redact.py) and the agent's diagnostics (agent/host/diagnostics.py),
so a secret shape taught to one is known to both.

Redacted, wherever it appears: ``Bearer <anything>`` and the credentials of an
``Authorization`` header (Basic too); PEM private keys, also cut short; the project's secrets by
their prefixes (API tokens ``mfa_``, agent credentials ``mfc_``, enrollment tokens ``mfe_``,
webhook secrets ``mfw_``); the value after a key whose name holds a secret's word
(``password=…``, ``"credential": "…"``, ``access_token=…``, ``client_secret: …``,
``X-Api-Key: …``; a quoted value whole); a password in a URL (``mqtt://user:pw@host``). In a
JSON value, the value of every key that names a secret is replaced whole. Every pattern reads
a name from its start only, so the work is linear in the text (it runs on every log record).

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
# The words that make a key name a secret's: also inside a longer name (access_token,
# client_secret, AWS_SECRET_ACCESS_KEY, mqttToken, X-Api-Key). Masking a harmless value whose
# key happens to hold one of them costs a line of a support bundle; missing a secret costs more.
_SECRET_WORDS = (
    r"password|passwd|passphrase|secret|credential|token|authorization|private|api[_\-]?key"
)
# A JSON key whose value is a secret, whatever the value looks like.
SECRET_KEY = re.compile(rf"(?i)({_SECRET_WORDS})")
# A key name is read from its start only, and at most 48 characters either side of the word:
# the regex engine then does bounded work per name, not per character (an unbounded
# ``[a-z_.-]*`` made an 8 KiB line of ``a-a-a-...`` take seconds, in every log record).
_KEY_START = r"(?<![a-z0-9_.\-])"
_KEY_CHARS = r"[a-z0-9_.\-]{0,48}"

_PATTERNS = (
    # A PEM private key (RSA, EC, OPENSSH, PKCS#8...), also cut short before its END line.
    (
        re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----.*?(?:-----END \1-----|\Z)", re.S),
        rf"-----BEGIN \g<1>-----{MASK}-----END \g<1>-----",
    ),
    # Authorization: <scheme> <credentials>: the credentials after a known scheme's name
    # (Basic's are not a bearer token, and would be missed by the key=value rule below).
    (
        re.compile(
            r"""(?i)(\bauthorization["']?\s*[:=]\s*["']?"""
            r"(?:(?:basic|bearer|digest|negotiate|ntlm|token|aws4-hmac-sha256)\s+)?)"
            r"""(?!\[redacted\])[^\s'",;]+"""
        ),
        rf"\g<1>{MASK}",
    ),
    # A bearer token, also cut short (aiohttp quotes a header's first 100 bytes).
    (re.compile(r"(?i)(bearer\s+)(?!\[redacted\])[^\s'\"\\,;]+"), rf"\g<1>{MASK}"),
    (re.compile(r"\b(" + "|".join(SECRET_PREFIXES) + r")[A-Za-z0-9_\-]+"), rf"\g<1>{MASK}"),
    # key=value, key: value, "key": "value" for keys that name a secret; a quoted value is
    # masked whole, spaces and all.
    (
        re.compile(
            rf"""(?ix)
            (["']?{_KEY_START}{_KEY_CHARS}?(?:{_SECRET_WORDS}){_KEY_CHARS}["']?\s*[:=]\s*)
            (?:"(?!\[redacted\])[^"\r\n]*"|'(?!\[redacted\])[^'\r\n]*'
               |(?!\[redacted\])(?!["'])[^\s'"&,;}}]+)"""
        ),
        lambda m: _masked_value(m[1], m[0][len(m[1]) :]),
    ),
    # scheme://user:password@host; the scheme read from its start only, as a key name is.
    (
        re.compile(r"((?<![a-z0-9+.\-])[a-z][a-z0-9+.\-]{0,31}://[^/\s:@]+:)[^/\s@]+@", re.I),
        rf"\g<1>{MASK}@",
    ),
)


def _masked_value(key: str, value: str) -> str:
    """``key`` followed by the mask, in the quotes the value had."""
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{key}{quote}{MASK}{quote}"


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
