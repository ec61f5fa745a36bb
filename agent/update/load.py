"""Loading an installed version: verified again, its variant loaded, its smoke test passed.

What is on disk is not trusted for having been verified when it was fetched: the manifest's
signatures and every file the chosen variant needs are checked again before the runtime loads
it (in a worker thread), and the bundle's smoke test must pass before it may serve.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

from agent.config import AgentConfig
from agent.exceptions import UpdateError
from agent.keyring import KeyRing
from agent.serving.runtime import LoadedModel, load_model, run_smoke_test
from agent.storage.blobs import LocalStore
from agent.update.variants import choose_variant, providers_for
from protocol.desired import DesiredModel
from protocol.manifest import Manifest


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
    ) -> None:
        self.config = config  # allow_cuda: a reload replaces it (reconfigure)
        self.store = store
        self.facts = facts
        self.executor = executor
        self._keyring = keyring

    def reconfigure(self, config: AgentConfig) -> None:
        self.config = config

    async def load(self, m: DesiredModel) -> LoadedModel:
        """Load an installed version after verifying it again; raises UpdateError."""
        envelope = await asyncio.to_thread(self.store.load_manifest, m.manifest_digest)
        if envelope is None:
            raise UpdateError(f"{m.name} {m.version} is not installed")
        manifest = self._keyring.verified_manifest(envelope, m)
        variant = choose_variant(manifest, self.facts)
        for f in manifest.files:
            if f.role == "model" and f is not variant:
                continue
            if not await asyncio.to_thread(self.store.verify_blob, f.digest, f.size):
                raise UpdateError(f"stored file {f.path!r} is missing or corrupt")
        loop = asyncio.get_running_loop()
        providers = providers_for(variant, self.facts, self.config.allow_cuda)
        path = self.store.blob_path(variant.digest)
        runtime = await loop.run_in_executor(
            self.executor, load_model, manifest.runtime, path, providers
        )
        await self._smoke_test(manifest, runtime)
        return LoadedModel(
            m.name,
            m.version,
            m.manifest_digest,
            runtime,
            variant=variant.variant or "default",
            runtime_name=manifest.runtime,
        )

    async def _smoke_test(self, manifest: Manifest, runtime: Any) -> None:
        st = manifest.smoke_test
        if st is None:
            return
        inp, out = await asyncio.to_thread(
            lambda: (
                self.store.blob_path(manifest.file(st.input_path).digest).read_bytes(),
                self.store.blob_path(manifest.file(st.output_path).digest).read_bytes(),
            )
        )
        await asyncio.get_running_loop().run_in_executor(
            self.executor, run_smoke_test, runtime, inp, out, st.atol, st.rtol
        )
