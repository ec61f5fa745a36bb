"""Errors of the agent.

::

    AgentError
    ├── AgentConfigError    the agent cannot start: bad state dir, missing identity, bad key
    ├── TransportError      the control plane could not be reached or answered with an error
    │   └── HttpStatusError an HTTP answer with an unexpected status (.status, .body)
    ├── UpdateError         a model version could not be fetched, verified, loaded or tested;
    │                       the old version keeps serving and the reason is reported
    ├── InferenceInputError an inference request does not fit the model's signature (HTTP 400)
    │   └── InferenceLimitError  a request or its answer is over a configured cap (HTTP 413)
    └── ModelNotLoaded      no version of the named model is serving (HTTP 404)

aiohttp's exceptions are translated into TransportError once, in agent/client.py.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of the agent's errors."""


class AgentConfigError(AgentError):
    """The agent's configuration or state directory is unusable."""


class TransportError(AgentError):
    """The control plane could not be reached, or refused the request."""


class HttpStatusError(TransportError):
    """An unexpected HTTP status from the control plane."""

    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body


class UpdateError(AgentError):
    """A model version could not be made ready; the message is the reason reported."""


class InferenceInputError(AgentError):
    """An inference request does not match the model's inputs."""


class InferenceLimitError(InferenceInputError):
    """An inference request, or the answer it would get, is over a configured cap."""


class ModelNotLoaded(AgentError):
    """No version of the named model is serving on this agent."""
