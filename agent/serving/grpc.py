"""Open Inference Protocol over gRPC (the KServe v2 ``GRPCInferenceService``) on its own port.

Behind the same serving table as the REST app: ``ModelInfer`` calls ``ServingTable.infer``,
so a request is checked against the model's signature, batched, counted in the metrics and in
the health window exactly as over REST. The limits are the agent's config, read at each
request (a reload changes them) but for the two taken when the server starts: the largest
message (``max_request_bytes``, refused by gRPC itself with RESOURCE_EXHAUSTED) and the
requests handled at once (``max_connections``; more are refused with RESOURCE_EXHAUSTED).

Refusals map to status codes in one table (``STATUS``): bad input INVALID_ARGUMENT naming the
field, a limit RESOURCE_EXHAUSTED naming it, an unknown model or version NOT_FOUND, a missing
or wrong bearer token UNAUTHENTICATED, the runtime's own failure INTERNAL.

Access: with bearer tokens set (``grpc_tokens``, or else the serve port's ``serve_tokens``),
every call but the health ones (ServerLive, ServerReady: open, as REST's health probes are)
must carry ``authorization: Bearer <token>`` metadata naming one of them; with a certificate
and key (the gRPC port's own, or else the serve port's) the port speaks TLS, and with a client
CA as well it asks every client for a certificate signed by it (mutual TLS). So what guards
REST guards gRPC unless the gRPC port is given settings of its own.

The ``grpc`` extra (grpcio, protobuf) is imported only by this module, which the daemon
imports only when ``--grpc`` is given.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc import aio

from agent.config import AgentConfig
from agent.exceptions import (
    InferenceInputError,
    InferenceLimitError,
    ModelNotLoaded,
)
from agent.serving import grpc_tensors
from agent.serving.oip import MAX_NAME
from agent.serving.proto import grpc_predict_v2_pb2 as pb
from agent.serving.table import ServingTable

log = logging.getLogger("modelfleet.agent.grpc")
SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "modelfleet-agent"
SERVER_VERSION = "0.1.0"
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tflite"}

# The one table from the serving table's refusals to gRPC status codes (first match wins).
STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InferenceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InferenceInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotLoaded, grpc.StatusCode.NOT_FOUND),
)


def status_of(exc: Exception) -> grpc.StatusCode | None:
    """The status code a refusal is answered with; None for a failure of the runtime."""
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return None


@dataclass(frozen=True)
class GrpcTls:
    """The gRPC port's TLS: PEM files; ``client_ca`` set asks every client for a certificate
    signed by it."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials from the files; raises OSError when one cannot be read."""
        ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def grpc_tls(cfg: AgentConfig) -> GrpcTls | None:
    """The gRPC port's TLS: its own files when given, else the serve port's (one certificate,
    and one client CA, guard both ports); None: plain."""
    if cfg.grpc_cert_file and cfg.grpc_key_file:
        cert, key, ca = cfg.grpc_cert_file, cfg.grpc_key_file, cfg.grpc_client_ca_file
    elif cfg.serve_cert_file and cfg.serve_key_file:
        cert, key, ca = cfg.serve_cert_file, cfg.serve_key_file, cfg.serve_client_ca_file
    else:
        return None
    return GrpcTls(Path(cert), Path(key), Path(ca) if ca else None)


def grpc_tokens(cfg: AgentConfig) -> tuple[str, ...]:
    """The bearer tokens the gRPC port admits: its own when given, else the serve port's, so
    that tokens set for REST never leave gRPC open."""
    return cfg.grpc_tokens or cfg.serve_tokens


Handler = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


class InferenceServicer:
    """The six calls of ``GRPCInferenceService`` over one serving table."""

    def __init__(self, table: ServingTable) -> None:
        self.table = table

    async def server_live(
        self, req: pb.ServerLiveRequest, ctx: aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        """ServerLive: the process answers."""
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, req: pb.ServerReadyRequest, ctx: aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        """ServerReady: every desired model has a version serving."""
        return pb.ServerReadyResponse(ready=self.table.ready())

    async def model_ready(
        self, req: pb.ModelReadyRequest, ctx: aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """ModelReady: the model (at that version, when one is named) is serving."""
        lm = self.table.get(req.name)
        ok = lm is not None and req.version in ("", lm.version)
        return pb.ModelReadyResponse(ready=ok)

    async def server_metadata(
        self, req: pb.ServerMetadataRequest, ctx: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        """ServerMetadata: the server's name and version."""
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def model_metadata(
        self, req: pb.ModelMetadataRequest, ctx: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        """ModelMetadata: the serving version's inputs and outputs; NOT_FOUND else."""
        try:
            grpc_tensors.check_name("name", req.name)
            lm = self.table.serving(req.name, req.version[:MAX_NAME] or None)
        except (InferenceInputError, ModelNotLoaded) as exc:
            await ctx.abort(status_of(exc) or grpc.StatusCode.INTERNAL, str(exc))
        resp = pb.ModelMetadataResponse(
            name=lm.name,
            versions=[lm.version],
            platform=PLATFORMS.get(lm.runtime_name, lm.runtime_name),
        )
        for spec, out in ((lm.runtime.inputs, resp.inputs), (lm.runtime.outputs, resp.outputs)):
            for t in spec:
                out.add(name=t.name, datatype=t.datatype, shape=list(t.shape))
        return resp

    async def model_infer(
        self, req: pb.ModelInferRequest, ctx: aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """ModelInfer through the serving table; refusals as the STATUS table says."""
        cfg = self.table.config
        try:
            parse = functools.partial(
                grpc_tensors.parse_infer, req, max_elements=cfg.max_request_elements
            )
            # Raw contents become arrays without a copy; typed ones are copied value by value,
            # which for a big request is too long a stop for the event loop.
            large = not req.raw_input_contents and req.ByteSize() > cfg.inline_json_bytes
            call = await asyncio.to_thread(parse) if large else parse()
            done = await self.table.infer(call.model, call.feeds, version=call.version)
            chosen = grpc_tensors.check_outputs(
                done.outputs, call.outputs, max_elements=cfg.max_response_elements
            )
            return _answer(done.model.name, done.model.version, call.request_id, chosen)
        except (InferenceInputError, ModelNotLoaded) as exc:
            await ctx.abort(status_of(exc) or grpc.StatusCode.INTERNAL, str(exc))
        except Exception as exc:
            # The runtime's failures are the model's, not the server's: answer and keep serving.
            log.warning("inference on %s failed: %s", req.model_name[:256], exc)
            await ctx.abort(grpc.StatusCode.INTERNAL, f"inference failed: {exc}")
        raise AssertionError("unreachable: abort raises")

    def handlers(self) -> dict[str, tuple[Handler, Any, Any]]:
        """Method name -> (handler, request message, response message)."""
        return {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (
                self.server_metadata,
                pb.ServerMetadataRequest,
                pb.ServerMetadataResponse,
            ),
            "ModelMetadata": (
                self.model_metadata,
                pb.ModelMetadataRequest,
                pb.ModelMetadataResponse,
            ),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
        }


def _answer(
    model: str, version: str, request_id: str, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    try:
        return grpc_tensors.answer(model, version, request_id, outputs)
    except TypeError as exc:
        raise RuntimeError(str(exc)) from None


def _guarded(handler: Handler, table: ServingTable) -> Handler:
    """``handler`` behind the bearer-token check of the config (read at each call)."""

    async def guarded(req: Any, ctx: aio.ServicerContext) -> Any:
        tokens = grpc_tokens(table.config)
        if tokens:
            given = grpc_tensors.bearer_token(ctx.invocation_metadata() or ())
            if not grpc_tensors.token_accepted(given, tokens):
                await ctx.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this port asks for 'authorization: Bearer <token>' metadata with a token "
                    "it accepts" + ("" if given is None else "; the one given is not"),
                )
        return await handler(req, ctx)

    return guarded


# Open without a token, as REST's /v2/health/live and /ready are: an orchestrator's probes
# need no secret.
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})


def generic_handler(table: ServingTable) -> grpc.GenericRpcHandler:
    """The service's method handlers over ``table``, all but the health ones behind the token
    check."""
    servicer = InferenceServicer(table)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            method: grpc.unary_unary_rpc_method_handler(
                fn if method in OPEN_METHODS else _guarded(fn, table),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for method, (fn, request, response) in servicer.handlers().items()
        },
    )


class GrpcServer:
    """The gRPC inference server on one address, as an async context manager: entering binds
    and starts it (raises OSError when the address cannot be bound or the TLS files cannot be
    read); leaving stops taking calls and gives those in flight up to ``drain_s``."""

    def __init__(
        self, *, table: ServingTable, host: str, port: int, tls: GrpcTls | None = None
    ) -> None:
        self.table = table
        self.host = host
        self.port = port  # the bound port once started (0 asks for a free one)
        self.tls = tls
        self._server: aio.Server | None = None

    async def __aenter__(self) -> GrpcServer:
        cfg = self.table.config
        server = aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", -1),
                # gRPC sets SO_REUSEPORT by default: a second agent on the same port would
                # share it silently instead of failing to start.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=cfg.max_connections,
        )
        server.add_generic_rpc_handlers((generic_handler(self.table),))
        host = self.host.strip("[]")  # an IPv6 address, bracketed or not
        address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        try:
            if self.tls is not None:
                creds = await asyncio.to_thread(self.tls.credentials)
                bound = server.add_secure_port(address, creds)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc's word for "could not bind"
            raise OSError(f"gRPC could not listen on {address}: {exc}") from None
        if not bound:
            raise OSError(f"gRPC could not listen on {address}")
        await server.start()
        self._server = server
        self.port = bound
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.stop(grace=self.table.config.drain_s)
            self._server = None
