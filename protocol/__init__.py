"""Pure wire formats shared by the control plane and the agent.

Bytes and values in, values or :mod:`protocol.exceptions` out: no sockets, no asyncio, no files.
"""

PROTOCOL_VERSION = "v1"
