"""Gate evaluation over metric aggregates. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from control_plane.rollout.spec import Gates
from protocol.sketch import MIN_VALUE, DDSketch


@dataclass
class Aggregate:
    """Merged metrics of one version over a window and a set of agents."""

    requests: int = 0
    errors: int = 0
    latency_ms: DDSketch = field(default_factory=DDSketch)
    shadow_count: int = 0
    drift_sum: float = 0.0
    argmax_agree: int = 0

    @property
    def error_rate(self) -> float:
        """Errors over requests (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        """p95 latency from the merged sketch, None without data."""
        return self.latency_ms.quantile(0.95)

    @property
    def mean_abs_drift(self) -> float | None:
        """Mean absolute output difference against the shadow, None without shadow samples."""
        return self.drift_sum / self.shadow_count if self.shadow_count else None

    def summary(self) -> dict[str, Any]:
        """Figures for the timeline."""
        p95 = self.p95_ms
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p95_ms": round(p95, 4) if p95 is not None else None,
            "shadow_samples": self.shadow_count,
            "mean_abs_drift": self.mean_abs_drift,
            "argmax_agreement": (
                self.argmax_agree / self.shadow_count if self.shadow_count else None
            ),
        }


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome: its value against its threshold."""

    gate: str
    value: float | None
    threshold: float
    outcome: str  # "pass" | "fail" | "wait"
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        doc: dict[str, Any] = {
            "gate": self.gate,
            "value": self.value,
            "threshold": self.threshold,
            "outcome": self.outcome,
        }
        if self.note:
            doc["note"] = self.note
        return doc


def evaluate(
    gates: Gates, new: Aggregate, baseline: Aggregate, failed_agents: int, cohort: int
) -> tuple[str, tuple[GateResult, ...]]:
    """("pass" | "fail" | "wait", each gate's result)."""
    results: list[GateResult] = []

    def add(
        gate: str,
        value: float | None,
        threshold: float,
        bad: bool,
        note: str | None = None,
        wait: bool = False,
    ) -> None:
        outcome = "wait" if wait else ("fail" if bad else "pass")
        results.append(GateResult(gate, value, threshold, outcome, note))

    if gates.min_requests:
        short = new.requests < gates.min_requests
        add(
            "min_requests",
            new.requests,
            gates.min_requests,
            False,
            "waiting for traffic" if short else None,
            wait=short,
        )
    if gates.max_error_rate is not None:
        add(
            "max_error_rate",
            round(new.error_rate, 6),
            gates.max_error_rate,
            new.error_rate > gates.max_error_rate,
        )
    p95 = new.p95_ms
    if gates.max_p95_latency_ms is not None:
        if p95 is None:
            add("max_p95_latency_ms", None, gates.max_p95_latency_ms, False, "no requests yet")
        else:
            add(
                "max_p95_latency_ms",
                round(p95, 4),
                gates.max_p95_latency_ms,
                p95 > gates.max_p95_latency_ms,
            )
    if gates.max_p95_latency_ratio is not None:
        base = baseline.p95_ms
        # At or below MIN_VALUE the sketch counts a latency as zero: no ratio to take (a
        # baseline of 5e-324, which a sketch's min and max may say, made it infinity).
        if p95 is None or base is None or base <= MIN_VALUE:
            note = "no baseline traffic to compare with" if p95 is not None else "no requests yet"
            add("max_p95_latency_ratio", None, gates.max_p95_latency_ratio, False, note)
        else:
            ratio = p95 / base
            add(
                "max_p95_latency_ratio",
                round(ratio, 4),
                gates.max_p95_latency_ratio,
                ratio > gates.max_p95_latency_ratio,
                f"p95 {p95:.3f} ms against baseline {base:.3f} ms",
            )
    # Always in force: the operator's limit, or the default one (see spec.DEFAULT_FAILED_AGENTS).
    limit = gates.failed_agents_limit.limit(cohort)
    note = "the default limit" if gates.max_failed_agents is None else None
    add("max_failed_agents", failed_agents, limit, failed_agents > limit, note)
    if gates.max_mean_abs_output_drift is not None:
        drift = new.mean_abs_drift
        if drift is None:
            add(
                "max_mean_abs_output_drift",
                None,
                gates.max_mean_abs_output_drift,
                False,
                "waiting for shadow-scored requests",
                wait=True,
            )
        else:
            add(
                "max_mean_abs_output_drift",
                round(drift, 6),
                gates.max_mean_abs_output_drift,
                drift > gates.max_mean_abs_output_drift,
            )
    outcomes = {r.outcome for r in results}
    verdict = "fail" if "fail" in outcomes else ("wait" if "wait" in outcomes else "pass")
    return verdict, tuple(results)
