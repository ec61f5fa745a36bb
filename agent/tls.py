"""TLS for the agent's connections to the control plane: a custom CA, and a client
certificate for mutual TLS."""

from __future__ import annotations

import ssl

from agent.exceptions import AgentConfigError


def client_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext | None:
    """The context for https:// control planes; None to use the system's CAs and no client
    certificate. Raises AgentConfigError for unreadable files."""
    if not (ca_file or cert_file):
        return None
    if bool(cert_file) != bool(key_file):
        raise AgentConfigError("a client certificate needs both client_cert and client_key")
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise AgentConfigError(f"TLS files: {exc}") from None
    return ctx
