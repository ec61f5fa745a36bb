"""Loading an installed version: verified again, its variant loaded, its smoke test passed.

What is on disk is not trusted for having been verified when it was fetched: the manifest's
signatures are checked again, and every file the chosen variant needs is laid out in the
version's directory and verified there, where the runtime reads it (in a worker thread). The
load is refused first when the memory plan says the host cannot hold it beside the versions
loaded now (agent/update/memory.py). The bundle's smoke test must pass before it may serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.exceptions import UpdateError
from agent.keyring import KeyRing
from agent.serving.execution import plan_execution
from agent.serving.runtime import LoadedModel, available_providers, load_model, run_smoke_test
from agent.storage.blobs import LocalStore
from agent.telemetry import OFF, Telemetry
from agent.update.memory import memory_refusal, parse_meminfo, weight_bytes
from agent.update.variants import choose_variant, providers_for
from protocol.desired import DesiredModel
from protocol.dsse import parse_envelope
from protocol.exceptions import ProtocolError
from protocol.manifest import Manifest, parse_manifest


def available_memory() -> int | None:
    """The host's available memory in bytes (Linux), None when unknown."""
    try:
        return parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        return None


class Loader:
    """Loads installed versions into runtimes."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: LocalStore,
        keyring: KeyRing,
        facts: dict[str, Any],
        executor: Executor,
        held: Callable[[], set[str]] = set,
        telemetry: Telemetry = OFF,
    ) -> None:
        self.telemetry = telemetry  # verify and load spans, children of the activation's
        self.config = config  # allow_cuda, memory_limit_bytes: a reload replaces it
        self.store = store
        self.facts = facts
        self.executor = executor
        self._keyring = keyring
        self._held = held  # manifest digests loaded now (the serving table's)

    def reconfigure(self, config: AgentConfig) -> None:
        self.config = config

    async def load(self, m: DesiredModel) -> LoadedModel:
        """Load an installed version after verifying it again; raises UpdateError."""
        envelope = await asyncio.to_thread(self.store.load_manifest, m.manifest_digest)
        if envelope is None:
            raise UpdateError(f"{m.name} {m.version} is not installed")
        with self.telemetry.span("update.verify"):
            manifest = self._keyring.verified_manifest(envelope, m)
        variant = choose_variant(manifest, self.facts)
        loop = asyncio.get_running_loop()
        overrides = self.config.model_execution
        plan = plan_execution(
            manifest.execution,
            [overrides.get("*"), overrides.get(m.name)],
            inputs=manifest.inputs,
            default_providers=providers_for(variant, self.facts, self.config.allow_cuda),
            available_providers=await asyncio.to_thread(available_providers),
            allow_cuda=self.config.allow_cuda,
        )
        # Each instance is a session of its own, with its own copy of the weights.
        await self._check_memory(m, weight_bytes(manifest, variant) * plan.instances)
        try:
            directory = await asyncio.to_thread(
                self.store.lay_out, m.manifest_digest, manifest.files_for(variant)
            )
        except ValueError as exc:
            raise UpdateError(str(exc)) from None
        # From the version's directory, so ONNX Runtime finds external data beside the model.
        path = directory / variant.path
        with self.telemetry.span(
            "update.load", attributes={"modelfleet.variant": variant.variant or "default"}
        ):
            runtime = await loop.run_in_executor(
                self.executor, load_model, manifest.runtime, path, plan
            )
            await self._smoke_test(manifest, runtime, directory)
        # Report the providers the sessions really got (ORT drops one that fails to start).
        plan = replace(plan, providers=getattr(runtime, "providers", ()))
        return LoadedModel(
            m.name,
            m.version,
            m.manifest_digest,
            runtime,
            variant=variant.variant or "default",
            runtime_name=manifest.runtime,
            plan=plan,
            aux_files=tuple(f for f in manifest.files if f.role == "aux"),
            directory=directory,
        )

    async def _check_memory(self, m: DesiredModel, needed: int) -> None:
        """Refuse (UpdateError) a version the host cannot hold beside those loaded now."""
        held = self._held() - {m.manifest_digest}
        loaded = await asyncio.to_thread(lambda: [self._weights_of(d) for d in held])
        reason = memory_refusal(
            what=f"{m.name} {m.version}",
            needed=needed,
            loaded=loaded,
            limit=self.config.memory_limit_bytes,
            available=await asyncio.to_thread(available_memory),
        )
        if reason is not None:
            raise UpdateError(reason)

    def _weights_of(self, manifest_digest: str) -> int:
        """The weights of a loaded version, from its stored manifest (0 when unreadable)."""
        envelope = self.store.load_manifest(manifest_digest)
        if envelope is None:
            return 0
        try:
            manifest = parse_manifest(parse_envelope(envelope).payload)
            return weight_bytes(manifest, choose_variant(manifest, self.facts))
        except (ProtocolError, UpdateError):
            return 0

    async def _smoke_test(self, manifest: Manifest, runtime: Any, directory: Path) -> None:
        st = manifest.smoke_test
        if st is None:
            return
        inp, out = await asyncio.to_thread(
            lambda: (
                (directory / st.input_path).read_bytes(),
                (directory / st.output_path).read_bytes(),
            )
        )
        await asyncio.get_running_loop().run_in_executor(
            self.executor, run_smoke_test, runtime, inp, out, st.atol, st.rtol
        )
