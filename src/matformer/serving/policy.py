"""Which width `auto` runs at: the widest whose measured step cost keeps the per-token latency
under the target (`--slo-ms`).

Every row of a step waits for the whole step (every width group's forward and the prefill chunk
the step carries), so a row's per-token latency is the step's time, plus what the scheduler and
the HTTP side take between steps: the measured ratio of the real interval between steps to the
estimated compute scales every estimate (`overhead`: not its mean but a high quantile, `TAIL`, of
the last `WINDOW` steps' ratios, since the target is on the slow requests' latency, and a step
cost's own noise on a loaded machine is as large as the margin a target leaves over the full
width's typical step). Before each step the engine
asks `choose` for the auto rows' width: the widest candidate (uniform tiers, widest first) for
which the estimated step time -- the pinned groups' costs, the prefill chunk's, and the auto
group's at that width and batch size -- stays under the target. With no candidate under it, the
narrowest. Without a target, the full width.

Narrowing has a floor: when even the narrowest width at the current batch misses the target,
the engine admits no more rows than `max_rows` allows (the narrowest width's step at that batch
fits the target); the rest wait in the queue. Under overload the target then costs time to the
first token, not per-token latency (a step that also carries a prompt chunk may still exceed
it: one chunk per step, so a request's mean per-token latency carries a share of the chunks of
those admitted while it runs).

The costs are measured on this machine: `calibrate` times each candidate at batch sizes 1, 2,
4, ... up to `--max-batch` when the server starts, and `observe` folds every real step into an
exponential moving average, so the table follows the machine's load.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

EMA = 0.2
"""Weight of a new measurement in a cost's moving average."""

MAX_OVERHEAD = 10.0
"""The largest interval/estimate ratio folded in (a pause of the whole process is no cost)."""

WINDOW = 64
"""Steps whose interval/estimate ratios `overhead` is taken over."""

TAIL = 0.9
"""The quantile of those ratios that scales the estimates: with the mean, about half the steps
of a width chosen near the target run over it, and the slow requests' latency with them."""


@dataclass
class CostTable:
    """Seconds per step, per (setting key, batch size), as moving averages."""

    costs: dict[Hashable, dict[int, float]] = field(default_factory=dict)

    def observe(self, key: Hashable, batch: int, seconds: float) -> None:
        by_batch = self.costs.setdefault(key, {})
        old = by_batch.get(batch)
        by_batch[batch] = seconds if old is None else (1 - EMA) * old + EMA * seconds

    def estimate(self, key: Hashable, batch: int) -> float | None:
        """The cost at `batch`: measured, else interpolated linearly between the nearest
        measured sizes (extrapolated from the largest one in proportion); None if unmeasured."""
        by_batch = self.costs.get(key)
        if not by_batch:
            return None
        if batch in by_batch:
            return by_batch[batch]
        sizes = sorted(by_batch)
        i = bisect.bisect_left(sizes, batch)
        if i == 0:
            return by_batch[sizes[0]]
        if i == len(sizes):
            top = sizes[-1]
            return by_batch[top] * batch / top
        lo, hi = sizes[i - 1], sizes[i]
        f = (batch - lo) / (hi - lo)
        return (1 - f) * by_batch[lo] + f * by_batch[hi]


class LoadPolicy:
    """Chooses the auto rows' width per step from a `CostTable` and the target."""

    def __init__(self, candidates: Sequence[Hashable], slo_s: float | None,
                 table: CostTable) -> None:
        if not candidates:
            raise ValueError("the policy needs at least one candidate width")
        self.candidates = list(candidates)  # widest first
        self.slo_s = slo_s
        self.table = table
        self.overhead = 1.0
        """Measured time between a row's tokens over the step's estimated compute (the `TAIL`
        quantile of the last `WINDOW` steps, at least 1): the scheduler's own work, the HTTP
        side's share of the CPU, and the step's own noise."""
        self.ratios: deque[float] = deque(maxlen=WINDOW)

    def observe_interval(self, estimate: float, interval: float) -> None:
        """Fold one step's real interval (start to next start) into `overhead`."""
        if estimate > 0 and interval > 0:
            self.ratios.append(min(max(interval / estimate, 1.0), MAX_OVERHEAD))
            ranked = sorted(self.ratios)
            self.overhead = ranked[min(len(ranked) - 1, int(TAIL * len(ranked)))]

    def choose(self, auto_rows: int, other_seconds: float) -> Hashable:
        """The widest candidate whose step, with `other_seconds` of other work in it, is
        estimated under the target; the narrowest when none is; the widest without a target."""
        if self.slo_s is None or auto_rows == 0:
            return self.candidates[0]
        for key in self.candidates:
            cost = self.table.estimate(key, auto_rows)
            if cost is not None and (other_seconds + cost) * self.overhead <= self.slo_s:
                return key
        return self.candidates[-1]

    def max_rows(self, limit: int, pinned_seconds: float = 0.0, per_row: float = 0.0) -> int:
        """How many decoding rows a step may hold under the target: the most rows (up to
        `limit`) whose step at the narrowest candidate, with `pinned_seconds` of other rows'
        work and `per_row` seconds more for each row (its share of the prompt chunks that the
        rows replacing finished ones bring), is estimated under it; at least 1. Without a
        target, or before the narrowest width is measured, `limit`.

        When even the narrowest width cannot keep every row under the target, more rows would
        only make every row slower: a request waits in the queue instead (its time to first
        token grows; the per-token latency of the running ones holds)."""
        if self.slo_s is None:
            return limit
        narrowest = self.candidates[-1]
        if self.table.estimate(narrowest, 1) is None:
            return limit
        rows = 1
        for n in range(2, limit + 1):
            cost = self.table.estimate(narrowest, n)
            if cost is None or (pinned_seconds + cost + n * per_row) * self.overhead > self.slo_s:
                break
            rows = n
        return rows

    def other_cost(self, groups: Sequence[tuple[Hashable, int]]) -> float:
        """Estimated seconds of the pinned groups ((key, rows) each) in one step (unmeasured
        ones count 0 until their first step measures them)."""
        return sum(self.table.estimate(key, n) or 0.0 for key, n in groups)


def calibration_sizes(max_batch: int) -> list[int]:
    """Batch sizes timed at start: 1, 2, 4, ... and `max_batch`."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]
