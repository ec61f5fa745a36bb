"""Dynamic batching: requests of one model that arrive close together run as one call.

A request waits in its model's queue for at most ``max_queue_delay_s``; requests whose inputs
agree on everything but the first (batch) dimension are joined along it, run once, and the
answer is split back by rows. When the joined call fails (one request's bad rows can fail the
whole call), or its answer cannot be split by rows, each request is run again on its own, so
each keeps its own answer or its own error.

``plan_batch`` is the decision (pure); ``Batcher`` is the queue and the worker task around it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Feeds = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]
RunFn = Callable[[Feeds], Outputs]


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's requests are joined: at most ``max_batch_size`` rows per call, a
    request waits at most ``max_queue_delay_s`` for others, and a batch of one of
    ``preferred_sizes`` rows goes at once."""

    max_batch_size: int
    max_queue_delay_s: float = 0.0
    preferred_sizes: tuple[int, ...] = ()


def plan_batch(rows: Sequence[int], *, policy: BatchPolicy, expired: bool) -> int:
    """How many of the queued compatible requests (their row counts, oldest first) to run
    now as one batch; 0 to wait for more. ``expired``: the oldest has waited its delay.

    A batch never holds more than ``max_batch_size`` rows, except a single request that is
    larger by itself (it runs alone). Before the delay is up, a batch goes as soon as it is
    full or the queued requests make up the largest preferred size they can; after it, the
    largest batch that fits goes.
    """
    if not rows:
        return 0
    fit, total, sums = 0, 0, []
    for r in rows:
        if total + r > policy.max_batch_size:
            break
        total += r
        fit += 1
        sums.append(total)
    if fit == 0:
        return 1  # one request larger than a batch: alone
    if sums[-1] == policy.max_batch_size or expired:
        return fit
    preferred = set(policy.preferred_sizes)
    for k in range(fit, 0, -1):
        if sums[k - 1] in preferred:
            return k
    return 0


def batch_key(feeds: Feeds) -> tuple[Any, ...] | None:
    """What requests must share to be joined (names, dtypes, shapes past the first
    dimension), or None when the request cannot be batched (a scalar input, or inputs that
    disagree on their number of rows)."""
    key = []
    rows = None
    for name in sorted(feeds):
        arr = feeds[name]
        if arr.ndim == 0 or (rows is not None and arr.shape[0] != rows):
            return None
        rows = arr.shape[0]
        key.append((name, arr.dtype.str, arr.shape[1:]))
    return tuple(key)


def rows_of(feeds: Feeds) -> int:
    """The request's rows (first dimension of its inputs; ``batch_key`` said they agree)."""
    return int(next(iter(feeds.values())).shape[0])


def join(requests: Sequence[Feeds]) -> dict[str, np.ndarray]:
    """The requests' inputs joined along the first dimension."""
    return {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}


def split(outputs: Outputs, rows: Sequence[int]) -> list[Outputs] | None:
    """A joined answer cut back into one per request, or None when an output does not have
    one row per input row (the model's outputs are not batch-major)."""
    total = sum(rows)
    if any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
        return None
    bounds = np.cumsum(rows)[:-1]
    parts = {n: np.split(a, bounds) for n, a in outputs.items()}
    return [{n: parts[n][i] for n in outputs} for i in range(len(rows))]


@dataclass(frozen=True)
class RunResult:
    """One request's answer and what it cost: seconds waiting (queue and worker), seconds of
    the runtime call it was part of, and the rows of that call."""

    outputs: Outputs
    queue_s: float
    compute_s: float
    batch_size: int


class BatchRunError(Exception):
    """A request's own failure, with what it cost (the runtime's error is its cause)."""

    def __init__(self, error: BaseException, queue_s: float, compute_s: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.queue_s = queue_s
        self.compute_s = compute_s


def timed_run(run: RunFn, feeds: Feeds, submitted: float) -> tuple[Outputs, float, float]:
    """Run in a worker thread: (outputs, seconds since ``submitted``, seconds running)."""
    start = time.perf_counter()
    out = run(feeds)
    return out, start - submitted, time.perf_counter() - start


async def run_alone(executor: Executor, run: RunFn, feeds: Feeds, submitted: float) -> RunResult:
    """Run one request by itself in ``executor``; raises BatchRunError around the runtime's
    error."""
    loop = asyncio.get_running_loop()
    try:
        out, queue_s, compute_s = await loop.run_in_executor(
            executor, timed_run, run, feeds, submitted
        )
    except Exception as exc:  # the runtime's own errors: handed back with their cost
        raise BatchRunError(exc, time.perf_counter() - submitted, 0.0) from exc
    return RunResult(out, queue_s, compute_s, rows_of(feeds) if batch_key(feeds) else 1)


@dataclass
class _Pending:
    feeds: Feeds
    key: tuple[Any, ...]
    rows: int
    submitted: float  # perf_counter
    future: asyncio.Future[RunResult] = field(repr=False)


class Batcher:
    """One model version's queue and the task that forms its batches.

    The task runs while requests are queued and ends when the queue is empty. At most
    ``concurrency`` batches run at once (one per session of the model): while they all run,
    arriving requests queue and join the next batch. ``aclose`` cancels the tasks and fails
    what is still queued.
    """

    def __init__(
        self, *, run: RunFn, policy: BatchPolicy, executor: Executor, concurrency: int = 1
    ) -> None:
        self.run = run
        self.policy = policy
        self.executor = executor
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    async def submit(self, feeds: Feeds) -> RunResult:
        """Queue one request and wait for its answer; raises BatchRunError with the
        runtime's error as ``error`` when it fails, RuntimeError when the batcher closed."""
        key = batch_key(feeds)
        if key is None:
            return await run_alone(self.executor, self.run, feeds, time.perf_counter())
        if self._closed:
            raise RuntimeError("the model was unloaded")
        fut: asyncio.Future[RunResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(feeds, key, rows_of(feeds), time.perf_counter(), fut))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._work(), name="modelfleet-batcher")
        return await fut

    async def aclose(self) -> None:
        """Stop forming and running batches; requests still queued fail (RuntimeError)."""
        self._closed = True
        tasks = [t for t in (self._task, *self._running) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(RuntimeError("the model was unloaded"))

    def busy(self) -> bool:
        """Requests are queued or running."""
        return bool(self._queue or self._running or (self._task and not self._task.done()))

    async def __aenter__(self) -> Batcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _compatible(self) -> list[_Pending]:
        """The queued requests that can join the oldest one (given-up ones dropped)."""
        if any(p.future.done() for p in self._queue):
            self._queue = deque(p for p in self._queue if not p.future.done())
        if not self._queue:
            return []
        key = self._queue[0].key
        return [p for p in self._queue if p.key == key]

    async def _work(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                group = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            if not group:
                self._slots.release()
                return
            for p in group:
                self._queue.remove(p)
            task = asyncio.create_task(self._run_batch(group), name="modelfleet-batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending]:
        """Wait until the policy says go; the requests to run (none: the queue is empty)."""
        while True:
            group = self._compatible()
            if not group:
                return []
            deadline = group[0].submitted + self.policy.max_queue_delay_s
            now = time.perf_counter()
            take = plan_batch([p.rows for p in group], policy=self.policy, expired=now >= deadline)
            if take:
                return group[:take]
            self._arrived.clear()
            try:
                async with asyncio.timeout(deadline - now):
                    await self._arrived.wait()
            except TimeoutError:
                pass

    async def _run_batch(self, batch: list[_Pending]) -> None:
        try:
            if len(batch) == 1:
                await self._settle_alone(batch[0])
            else:
                await self._run_joined(batch)
        finally:
            self._slots.release()

    async def _run_joined(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        rows = [p.rows for p in batch]
        started = time.perf_counter()
        parts: list[Outputs] | None = None
        try:
            joined = join([p.feeds for p in batch])
            out, wait_s, compute_s = await loop.run_in_executor(
                self.executor, timed_run, self.run, joined, started
            )
            parts = split(out, rows)
        except Exception:
            # One request's rows may have failed the joined call: each runs again alone, so
            # the others get their answers and it gets its own error.
            parts = None
        if parts is None:
            await asyncio.gather(*(self._settle_alone(p) for p in batch))
            return
        for p, part in zip(batch, parts, strict=True):
            if not p.future.done():
                queue_s = started - p.submitted + wait_s
                p.future.set_result(RunResult(part, queue_s, compute_s, sum(rows)))

    async def _settle_alone(self, p: _Pending) -> None:
        try:
            result = await run_alone(self.executor, self.run, p.feeds, p.submitted)
        except BatchRunError as exc:
            if not p.future.done():
                p.future.set_exception(exc)
            return
        if not p.future.done():
            p.future.set_result(result)
