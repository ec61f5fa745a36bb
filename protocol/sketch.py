"""A DDSketch: a mergeable quantile sketch with a stated relative accuracy.

Percentiles cannot be averaged, so agents send sketches and the control plane merges them.
Every quantile this sketch returns is within ``relative_accuracy`` of a true sample value at that
rank (Masson, Rim and Lee, VLDB 2019). Written here rather than taken from the ``ddsketch``
package because that one serialises through protobuf and this one must travel as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from protocol.exceptions import InvalidMessage
from protocol.fields import INT64_MAX, get_int, get_number, require_object

DEFAULT_RELATIVE_ACCURACY = 0.01
MAX_BINS = 4096
# The latencies (ms) a sketch holds: at or below MIN_VALUE counts as zero, above MAX_VALUE (31
# years) is recorded as MAX_VALUE. The range bounds the bin keys a sketch on the wire may carry.
MIN_VALUE = 1e-9
MAX_VALUE = 1e12


def _key(value: float, log_gamma: float) -> int:
    return math.ceil(math.log(value) / log_gamma)


_DEFAULT_GAMMA = (1 + DEFAULT_RELATIVE_ACCURACY) / (1 - DEFAULT_RELATIVE_ACCURACY)
# Bin keys of the control plane's accuracy for values in (MIN_VALUE, MAX_VALUE]: -1036..1382.
MIN_KEY = _key(MIN_VALUE, math.log(_DEFAULT_GAMMA))
MAX_KEY = _key(MAX_VALUE, math.log(_DEFAULT_GAMMA))
# gamma**k stays a finite float for |k| * log(gamma) below this.
_MAX_EXPONENT = 700.0


@dataclass
class DDSketch:
    """Log-bucketed counts; mergeable with any sketch of the same accuracy."""

    relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY
    bins: dict[int, int] = field(default_factory=dict)
    zero_count: int = 0
    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def __post_init__(self) -> None:
        if not 0 < self.relative_accuracy < 1:
            raise ValueError("relative_accuracy must be in (0, 1)")
        self._gamma = (1 + self.relative_accuracy) / (1 - self.relative_accuracy)
        self._log_gamma = math.log(self._gamma)

    def add(self, value: float, n: int = 1) -> None:
        """Record ``value`` (non-negative; above MAX_VALUE counts as MAX_VALUE) ``n`` times."""
        if value < 0 or not math.isfinite(value):
            raise ValueError("sketch values must be finite and non-negative")
        value = min(value, MAX_VALUE)
        if value <= MIN_VALUE:
            self.zero_count += n
        else:
            i = _key(value, self._log_gamma)
            self.bins[i] = self.bins.get(i, 0) + n
        self.count += n
        self.sum += value * n
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def merge(self, other: DDSketch) -> None:
        """Add ``other``'s counts into this sketch; raises ValueError if accuracies differ."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError("cannot merge sketches of different relative accuracy")
        for i, c in other.bins.items():
            self.bins[i] = self.bins.get(i, 0) + c
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0 <= q <= 1), or None for an empty sketch; raises ValueError for q.

        Never overflows, even for bins outside the range ``from_json`` allows (rows stored by
        older versions): the bin's value is computed with its exponent clamped.
        """
        if self.count == 0:
            return None
        if not 0 <= q <= 1:
            raise ValueError("q must be in [0, 1]")
        rank = q * (self.count - 1)
        seen = self.zero_count
        if rank < seen:
            return 0.0
        for i in sorted(self.bins):
            seen += self.bins[i]
            if seen > rank:
                limit = int(_MAX_EXPONENT / self._log_gamma)
                value = 2 * self._gamma ** max(-limit, min(limit, i)) / (self._gamma + 1)
                return min(max(value, self.min), self.max)
        return self.max

    def to_json(self) -> dict[str, Any]:
        """JSON form; bins as parallel arrays of keys and counts, sorted."""
        keys = sorted(self.bins)
        return {
            "relativeAccuracy": self.relative_accuracy,
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else 0.0,
            "max": self.max if self.count else 0.0,
            "zeroCount": self.zero_count,
            "binKeys": keys,
            "binCounts": [self.bins[k] for k in keys],
        }

    @classmethod
    def from_json(cls, doc: object, prefix: str = "") -> DDSketch:
        """Parse the JSON form; raises InvalidMessage naming the bad field.

        Only a sketch the control plane can merge is accepted: the default relative accuracy,
        bin keys in [MIN_KEY, MAX_KEY], counts (and their total) within signed 64 bits, and
        sum, min and max finite and consistent with the range of values a sketch holds.
        """
        d = require_object(doc, prefix.rstrip(".") or "sketch")
        acc = get_number(d, "relativeAccuracy", prefix, default=DEFAULT_RELATIVE_ACCURACY)
        if acc != DEFAULT_RELATIVE_ACCURACY:
            raise InvalidMessage(
                f"{prefix}relativeAccuracy must be {DEFAULT_RELATIVE_ACCURACY}, the accuracy "
                "the control plane merges",
                f"{prefix}relativeAccuracy",
            )
        keys, counts = d.get("binKeys", []), d.get("binCounts", [])
        if not isinstance(keys, list) or not isinstance(counts, list) or len(keys) != len(counts):
            raise InvalidMessage(
                f"{prefix}binKeys and binCounts must be lists of equal length", f"{prefix}binKeys"
            )
        if len(keys) > MAX_BINS:
            raise InvalidMessage(
                f"{prefix}binKeys holds more than {MAX_BINS} bins", f"{prefix}binKeys"
            )
        bins: dict[int, int] = {}
        for j, (k, c) in enumerate(zip(keys, counts, strict=True)):
            if isinstance(k, bool) or not isinstance(k, int) or not MIN_KEY <= k <= MAX_KEY:
                raise InvalidMessage(
                    f"{prefix}binKeys[{j}] must be an integer in [{MIN_KEY}, {MAX_KEY}]",
                    f"{prefix}binKeys[{j}]",
                )
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= INT64_MAX:
                raise InvalidMessage(
                    f"{prefix}binCounts[{j}] must be an integer in [0, 2**63-1]",
                    f"{prefix}binCounts[{j}]",
                )
            bins[k] = bins.get(k, 0) + c
        sk = cls(bins=bins)
        sk.zero_count = get_int(d, "zeroCount", prefix, default=0)
        sk.count = get_int(d, "count", prefix)
        total = sk.zero_count + sum(bins.values())
        if sk.count != total:
            raise InvalidMessage(f"{prefix}count does not equal the bins' sum", f"{prefix}count")
        # Every count is within 64 bits, and so is their total: count equals it.
        sk.sum = get_number(d, "sum", prefix, default=0.0, maximum=sk.count * MAX_VALUE)
        if sk.count:
            sk.min = get_number(d, "min", prefix, maximum=MAX_VALUE)
            sk.max = get_number(d, "max", prefix, minimum=sk.min, maximum=MAX_VALUE)
        return sk
