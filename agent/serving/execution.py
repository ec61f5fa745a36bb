"""What a model version runs with: the manifest's execution settings under the agent's
overrides, the providers this ONNX Runtime build has, batching only where the signature
allows it. Pure: the loader gathers the inputs and hands the plan to the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.serving.batching import BatchPolicy
from protocol.execution import Execution
from protocol.manifest import TensorSpec

CPU_PROVIDER = "CPUExecutionProvider"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# With one request per worker thread, one ONNX Runtime thread per session is what keeps
# requests from fighting over cores; a model that runs alone on a box raises them.
DEFAULT = Execution(
    instances=1, intra_op_threads=1, inter_op_threads=1, warmup_requests=0, litert_threads=1
)


@dataclass(frozen=True)
class ExecutionPlan:
    """Settled execution settings of one loaded version."""

    instances: int = 1
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = (CPU_PROVIDER,)
    warmup_requests: int = 0
    litert_threads: int = 1
    batching: BatchPolicy | None = None
    note: str | None = None  # why a setting asked for is not in force

    def facts(self, model: str) -> dict[str, Any]:
        """The plan as a status fact (protocol/facts.py: ``serving``)."""
        doc: dict[str, Any] = {
            "model": model,
            "instances": self.instances,
            "intraOpThreads": self.intra_op_threads,
            "interOpThreads": self.inter_op_threads,
            "providers": list(self.providers),
            "warmupRequests": self.warmup_requests,
            "litertThreads": self.litert_threads,
            "maxBatchSize": self.batching.max_batch_size if self.batching else 0,
        }
        if self.batching is not None:
            doc["maxQueueDelayMs"] = self.batching.max_queue_delay_s * 1000
        if self.note:
            doc["note"] = self.note[:256]
        return doc


def choose_providers(
    wanted: Sequence[str], available: Iterable[str], *, allow_cuda: bool
) -> tuple[str, ...]:
    """The wanted providers this build has, in the wanted order, GPU ones only when allowed,
    and the CPU provider last whatever was asked (every model must run somewhere)."""
    have = set(available)
    out = [
        p
        for p in wanted
        if p in have and p != CPU_PROVIDER and (allow_cuda or p not in GPU_PROVIDERS)
    ]
    return (*dict.fromkeys(out), CPU_PROVIDER)


def batchable(inputs: Sequence[TensorSpec]) -> str | None:
    """None when every input has a free first dimension to join requests along; else why not."""
    for t in inputs:
        if not t.shape or t.shape[0] != -1:
            return f"input {t.name!r} has no free first dimension: batching is off"
    return None


def plan_execution(
    manifest: Execution | None,
    overrides: Sequence[Execution | None],
    *,
    inputs: Sequence[TensorSpec],
    default_providers: Sequence[str],
    available_providers: Iterable[str],
    allow_cuda: bool,
) -> ExecutionPlan:
    """The settings a version runs with: ``overrides`` (lowest first: the agent's for every
    model, then its own for this one) over the manifest's over the defaults.
    ``default_providers``: the order for the chosen variant when nobody names one."""
    settled = manifest.over(DEFAULT) if manifest else DEFAULT
    for o in overrides:
        if o is not None:
            settled = o.over(settled)
    providers = choose_providers(
        settled.providers or default_providers, available_providers, allow_cuda=allow_cuda
    )
    batching = None
    note = None
    b = settled.batching
    if b is not None and b.max_batch_size > 1:
        note = batchable(inputs)
        if note is None:
            batching = BatchPolicy(
                max_batch_size=b.max_batch_size,
                max_queue_delay_s=b.max_queue_delay_ms / 1000,
                preferred_sizes=b.preferred_sizes,
            )
    assert settled.instances is not None and settled.intra_op_threads is not None
    assert settled.inter_op_threads is not None and settled.warmup_requests is not None
    assert settled.litert_threads is not None
    return ExecutionPlan(
        instances=settled.instances,
        intra_op_threads=settled.intra_op_threads,
        inter_op_threads=settled.inter_op_threads,
        providers=providers,
        warmup_requests=settled.warmup_requests,
        litert_threads=settled.litert_threads,
        batching=batching,
        note=note,
    )
