"""The serving table: which version of each model answers, its health window, its shadow.

It owns the loaded models and everything a request touches: ``infer`` (the one entry point
that every protocol front end calls, REST and gRPC alike) runs on the serving version,
through the model's dynamic batcher when its manifest or the agent's config asks for one
(with the shadow scoring a sample of requests), counts each request in the metrics recorder,
the per-model serving statistics and the health window, and rolls a failing new version back
at once. What the rest of the agent must do about a roll back (state file, status, no retry)
it hears through the ``on_rolled_back`` event. Readers (the OIP apps, /metrics, the status
report) take snapshots.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.config import AgentConfig
from agent.exceptions import ModelNotLoaded
from agent.report.metrics import MetricsRecorder
from agent.serving.batching import Batcher, BatchRunError, RunFn, run_alone
from agent.serving.health import Verdict, health_verdict, rollback_reason
from agent.serving.runtime import LoadedModel, check_feeds
from agent.serving.shadow import score_with_shadow
from agent.serving.stats import ServingStats
from agent.telemetry import OFF, Telemetry

log = logging.getLogger("modelfleet.agent")


@dataclass
class Probation:
    """A version that just took traffic, with the one it replaced kept loaded to fall back to."""

    new: LoadedModel
    previous: LoadedModel | None
    until: float  # monotonic
    requests: int = 0
    errors: int = 0


@dataclass(frozen=True)
class RolledBack:
    """The event of a roll back: ``new`` failed its health window; ``previous`` serves again
    (None: nothing serves that model now)."""

    new: LoadedModel
    previous: LoadedModel | None
    reason: str


@dataclass(frozen=True)
class Inference:
    """One answered request: the version that answered, its outputs, and what the request
    cost (seconds queued for a batch or a worker, seconds of the runtime call it was part of,
    rows of that call: 1 or its own rows when it ran alone)."""

    model: LoadedModel
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int


def _batcher_key(lm: LoadedModel) -> str:
    # A version under another configuration (agent/update/config.py) runs another way: its
    # own batcher, with its own run function and policy.
    return f"{lm.manifest_digest}+{lm.config_digest or ''}"


def _delayed(run: Any, delay_s: float, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    time.sleep(delay_s)  # in the worker thread, like a slower machine would be
    return run(feeds)


class ServingTable:
    """The models serving now, their health windows and shadows."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        executor: Executor,
        metrics: MetricsRecorder,
        on_rolled_back: Callable[[RolledBack], None],
        telemetry: Telemetry = OFF,
    ) -> None:
        self.config = config  # read at each request: a reload replaces it (reconfigure)
        self.telemetry = telemetry
        # The fraction of requests traced: 0 unless telemetry is on and asks for it, and then
        # the only thing a request not sampled pays is this comparison.
        self.trace_sample = config.telemetry.inference_sample if telemetry.enabled else 0.0
        self.executor = executor
        self.metrics = metrics
        self._on_rolled_back = on_rolled_back
        self.models: dict[str, LoadedModel] = {}
        self._probation: dict[str, Probation] = {}
        self._shadows: dict[str, tuple[LoadedModel, float]] = {}  # name -> (old version, sample)
        self._wanted: frozenset[str] = frozenset()
        self.stats = ServingStats()
        # Manifest digest -> the batcher of that version; a batcher has a task only while
        # requests are queued, and those of versions that stopped serving are closed here.
        self._batchers: dict[str, Batcher] = {}
        self._retired: list[Batcher] = []

    async def __aenter__(self) -> ServingTable:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every batcher (requests still queued fail)."""
        batchers = [*self._batchers.values(), *self._retired]
        self._batchers.clear()
        self._retired.clear()
        for b in batchers:
            await b.aclose()

    def reconfigure(self, config: AgentConfig) -> None:
        self.config = config
        if self.telemetry.enabled and config.telemetry is not None:
            self.trace_sample = config.telemetry.inference_sample

    # ------------------------------------------------------------------------ snapshots

    def get(self, name: str) -> LoadedModel | None:
        return self.models.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def snapshot(self) -> tuple[LoadedModel, ...]:
        """The serving versions, by model name."""
        return tuple(sorted(self.models.values(), key=lambda x: x.name))

    def running(self) -> dict[str, str]:
        """Model name -> manifest digest of the serving version."""
        return {n: m.manifest_digest for n, m in self.models.items()}

    def held_digests(self) -> set[str]:
        """Every version loaded now: serving, or kept to fall back to (not to be pruned)."""
        held = {lm.manifest_digest for lm in self.models.values()}
        held |= {p.previous.manifest_digest for p in self._probation.values() if p.previous}
        return held

    def want(self, names: Iterable[str]) -> None:
        """The models the desired state names (what readiness waits for)."""
        self._wanted = frozenset(names)

    def ready(self) -> bool:
        """Every desired model has a version serving."""
        return all(name in self.models for name in self._wanted)

    # ------------------------------------------------------------------------ changes

    def restore(self, lm: LoadedModel) -> None:
        """Serve a version that was active before a restart (no health window)."""
        self.models[lm.name] = lm
        self._retire_batchers()

    def activate(self, lm: LoadedModel) -> None:
        """Swap ``lm`` in and watch it through the health window, the one it replaces kept."""
        previous = self.models.get(lm.name)
        # The swap: one assignment, so a request sees the old or the new version, never neither.
        self.models[lm.name] = lm
        self._probation[lm.name] = Probation(
            lm, previous, time.monotonic() + self.config.health_window_s
        )

    def unload(self, name: str) -> None:
        self.models.pop(name, None)
        self._probation.pop(name, None)
        self._retire_batchers()

    def end_passed_windows(self, now: float) -> None:
        """Let go of the previous versions whose health window is over."""
        for name in [n for n, p in self._probation.items() if now > p.until]:
            del self._probation[name]
        self._retire_batchers()

    def shadowed(self) -> dict[str, str]:
        """Model name -> manifest digest of the version scoring in its shadow."""
        return {name: lm.manifest_digest for name, (lm, _) in self._shadows.items()}

    def set_shadow(self, name: str, old: LoadedModel, sample: float) -> None:
        self._shadows[name] = (old, sample)

    def drop_shadow(self, name: str) -> None:
        self._shadows.pop(name, None)
        self._retire_batchers()

    # ------------------------------------------------------------------------ requests

    def serving(self, name: str, version: str | None = None) -> LoadedModel:
        """The version of ``name`` serving now; raises ModelNotLoaded when there is none, or
        when ``version`` is given and is not the one serving."""
        lm = self.models.get(name)
        if lm is None:
            raise ModelNotLoaded(f"model {name!r} is not loaded on this agent")
        if version is not None and version != lm.version:
            raise ModelNotLoaded(
                f"version {version!r} of model {name!r} is not loaded on this agent "
                f"(it serves {lm.version!r})"
            )
        return lm

    async def infer(
        self,
        name: str,
        feeds: dict[str, np.ndarray],
        *,
        version: str | None = None,
        traceparent: str | None = None,
    ) -> Inference:
        """Run one request on the serving version of ``name`` (``version``: only if it is the
        one serving); ``feeds`` maps input names to decoded arrays.

        This is the one entry point of every protocol (REST, gRPC): the request is checked
        against the model's signature, joins the model's dynamic batch when it has one, and is
        counted; a sample of requests (``trace_sample``) is traced, as a child of the caller's
        ``traceparent`` when it sent a well-formed one. Raises ModelNotLoaded for a model or
        version not serving, InferenceInputError for input that does not fit the model, and
        the runtime's error when inference fails (a KeyError from the runtime included: it is
        not the model's absence).
        """
        if self.trace_sample and random.random() < self.trace_sample:
            return await self._traced(name, feeds, version, traceparent)
        return await self._infer(name, feeds, version)

    async def _traced(
        self,
        name: str,
        feeds: dict[str, np.ndarray],
        version: str | None,
        traceparent: str | None,
    ) -> Inference:
        with self.telemetry.span(
            "inference",
            parent=traceparent,
            root=True,
            attributes={"modelfleet.model": name},
        ) as span:
            done = await self._infer(name, feeds, version)
            span.set("modelfleet.version", done.model.version)
            span.set("modelfleet.queue_s", done.queue_s)
            span.set("modelfleet.compute_s", done.compute_s)
            span.set("modelfleet.batch_size", done.batch_size)
            return done

    async def _infer(
        self, name: str, feeds: dict[str, np.ndarray], version: str | None
    ) -> Inference:
        lm = self.serving(name, version)
        check_feeds(lm.runtime, feeds)
        shadow = self._shadows.get(name)
        if shadow is not None and random.random() < shadow[1]:
            return await self._infer_with_shadow(lm, shadow[0], feeds)
        submitted = time.perf_counter()
        try:
            if lm.batching is not None:
                result = await self._batcher(lm).submit(feeds)
            else:
                result = await run_alone(self.executor, self._run_fn(lm), feeds, submitted)
        except BatchRunError as exc:
            self._count(lm, exc.queue_s + exc.compute_s, error=True)
            raise exc.error from None
        self._count(lm, result.queue_s + result.compute_s, error=False)
        self.stats.record(lm.name, lm.version, result.queue_s, result.compute_s, result.batch_size)
        return Inference(lm, result.outputs, result.queue_s, result.compute_s, result.batch_size)

    def _run_fn(self, lm: LoadedModel) -> RunFn:
        run: RunFn = lm.runtime.run
        if self.config.added_latency_s:
            run = functools.partial(_delayed, run, self.config.added_latency_s)
        return run

    def _batcher(self, lm: LoadedModel) -> Batcher:
        b = self._batchers.get(_batcher_key(lm))
        if b is None:
            assert lm.batching is not None
            b = Batcher(
                run=self._run_fn(lm),
                policy=lm.batching,
                executor=self.executor,
                concurrency=lm.instances,
            )
            self._batchers[_batcher_key(lm)] = b
        return b

    def _retire_batchers(self) -> None:
        """Batchers of versions no longer held stop taking requests once their queue is done."""
        loaded = [*self.models.values(), *(lm for lm, _ in self._shadows.values())]
        loaded += [p.previous for p in self._probation.values() if p.previous is not None]
        held = {_batcher_key(lm) for lm in loaded}
        for key in [k for k in self._batchers if k not in held]:
            self._retired.append(self._batchers.pop(key))
        self._retired = [b for b in self._retired if b.busy()]

    async def _infer_with_shadow(
        self, lm: LoadedModel, old: LoadedModel, feeds: dict[str, np.ndarray]
    ) -> Inference:
        """Answer with the live version; score the same input with the old one for drift."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            out, shadow_s, drift, agree = await loop.run_in_executor(
                self.executor, score_with_shadow, lm.runtime, old.runtime, feeds
            )
        except Exception:
            self._count(lm, time.perf_counter() - t0, error=True)
            raise
        # The shadow's own time is not the live version's latency.
        compute_s = time.perf_counter() - t0 - shadow_s
        self._count(lm, compute_s, error=False)
        self.stats.record(lm.name, lm.version, 0.0, compute_s, 1)
        if drift is not None:
            self.metrics.record_shadow(lm.name, lm.version, drift, agree)
        return Inference(lm, out, 0.0, compute_s, 1)

    def _count(self, lm: LoadedModel, latency_s: float, error: bool) -> None:
        self.metrics.record(lm.name, lm.version, latency_s, error)
        p = self._probation.get(lm.name)
        if p is None or p.new is not lm:
            return
        cfg = self.config
        verdict = health_verdict(
            now=time.monotonic(),
            until=p.until,
            requests=p.requests + 1,
            errors=p.errors + error,
            min_requests=cfg.health_min_requests,
            max_error_rate=cfg.health_max_error_rate,
        )
        if verdict is Verdict.PASSED:
            del self._probation[lm.name]  # passed: let the previous version go
            return
        p.requests += 1
        p.errors += error
        if verdict is Verdict.FAILING:
            self._roll_back(p)

    def _roll_back(self, p: Probation) -> None:
        """The new version fails its requests: the previous one serves again at once."""
        new = p.new
        reason = rollback_reason(
            requests=p.requests,
            errors=p.errors,
            window_s=self.config.health_window_s,
            max_error_rate=self.config.health_max_error_rate,
        )
        del self._probation[new.name]
        if p.previous is not None:
            self.models[new.name] = p.previous
        else:
            self.models.pop(new.name, None)
        self._retire_batchers()
        self._on_rolled_back(RolledBack(new, p.previous, reason))
