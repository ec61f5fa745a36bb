"""Prometheus text exposition of the agent's own metrics, on the serve port at /metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.report.metrics import LATENCY_BUCKETS_S
from agent.serving.stats import Histogram

if TYPE_CHECKING:
    from agent.serving.table import ServingTable


@dataclass(frozen=True)
class Gauges:
    """A snapshot of the agent's own counters (beside the serving table's), for /metrics."""

    generation: int
    downloads: float
    download_bytes: float
    last_sync: float
    pending_batches: float
    dropped_batches: float


def _labels(**kv: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in kv.items()
    )
    return "{" + inner + "}"


def _family(name: str, kind: str, help_: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]


def _histogram(name: str, labels: dict[str, str], h: Histogram) -> list[str]:
    out = []
    cumulative = 0
    for bound, count in zip((*h.bounds, float("inf")), h.counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        out.append(f"{name}_bucket{_labels(**labels, le=le)} {cumulative}")
    out.append(f"{name}_sum{_labels(**labels)} {h.total}")
    out.append(f"{name}_count{_labels(**labels)} {h.count}")
    return out


def _serving_stats(table: ServingTable) -> list[str]:
    """Queue time, compute time and batch size per model version (answered requests)."""
    stats = table.stats.snapshot()
    lines: list[str] = []
    for metric, help_, pick in (
        (
            "modelfleet_inference_queue_seconds",
            "Seconds a request waited for its batch or a worker.",
            lambda s: s.queue_s,
        ),
        (
            "modelfleet_inference_compute_seconds",
            "Seconds of the runtime call a request was part of.",
            lambda s: s.compute_s,
        ),
        (
            "modelfleet_inference_batch_size",
            "Rows of the runtime call a request was part of.",
            lambda s: s.batch_size,
        ),
    ):
        samples: list[str] = []
        for (m, v), s in stats:
            samples += _histogram(metric, {"model": m, "version": v}, pick(s))
        lines += _family(metric, "histogram", help_, samples)
    return lines


def render(table: ServingTable, gauges: Gauges) -> str:
    """The whole exposition."""
    totals = sorted(table.metrics.totals.items())
    lines: list[str] = []
    lines += _family(
        "modelfleet_inference_requests_total",
        "counter",
        "Inference requests served.",
        (
            f"modelfleet_inference_requests_total{_labels(model=m, version=v)} {t.requests}"
            for (m, v), t in totals
        ),
    )
    lines += _family(
        "modelfleet_inference_errors_total",
        "counter",
        "Inference requests that failed.",
        (
            f"modelfleet_inference_errors_total{_labels(model=m, version=v)} {t.errors}"
            for (m, v), t in totals
        ),
    )
    hist: list[str] = []
    for (m, v), t in totals:
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS_S, float("inf")), t.buckets, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            hist.append(
                f"modelfleet_inference_latency_seconds_bucket"
                f"{_labels(model=m, version=v, le=le)} {cumulative}"
            )
        hist.append(
            f"modelfleet_inference_latency_seconds_sum{_labels(model=m, version=v)} "
            f"{t.latency_sum_s}"
        )
        hist.append(
            f"modelfleet_inference_latency_seconds_count{_labels(model=m, version=v)} {t.requests}"
        )
    lines += _family(
        "modelfleet_inference_latency_seconds", "histogram", "Inference latency.", hist
    )
    lines += _serving_stats(table)
    active = table.snapshot()
    lines += _family(
        "modelfleet_model_active",
        "gauge",
        "1 for each model version serving.",
        (
            "modelfleet_model_active"
            f"{_labels(model=m.name, version=m.version, variant=m.variant)} 1"
            for m in active
        ),
    )
    scalars = [
        (
            "modelfleet_desired_generation",
            "gauge",
            "Highest desired-state generation accepted.",
            gauges.generation,
        ),
        (
            "modelfleet_downloads_total",
            "counter",
            "Blobs downloaded and verified.",
            gauges.downloads,
        ),
        (
            "modelfleet_download_bytes_total",
            "counter",
            "Bytes received for blobs.",
            gauges.download_bytes,
        ),
        (
            "modelfleet_last_sync_timestamp_seconds",
            "gauge",
            "Unix time of the last answer from the control plane.",
            gauges.last_sync,
        ),
        (
            "modelfleet_metrics_batches_pending",
            "gauge",
            "Metric batches waiting to be sent.",
            gauges.pending_batches,
        ),
        (
            "modelfleet_metrics_batches_dropped_total",
            "counter",
            "Metric batches dropped because the buffer was full.",
            gauges.dropped_batches,
        ),
    ]
    for name, kind, help_, value in scalars:
        lines += _family(name, kind, help_, [f"{name} {value}"])
    return "\n".join(lines) + "\n"
