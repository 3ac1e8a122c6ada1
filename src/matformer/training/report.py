"""What a run tells its user: log lines on rank 0 and `OUT/train_log.jsonl` records.

Each step's line holds the loss of every tier trained *in that step* (mean over the ranks that
trained it; never a running mean across tiers), the learning rate, tokens/s and the ETA.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from matformer.errors import CheckpointError
from matformer.io.atomic import atomic_write
from matformer.training.distributed import Dist, all_reduce_sum
from matformer.training.objective import Plan

LOG_FILE = "train_log.jsonl"


class Reporter:
    """Prints (rank 0, unless quiet) and appends JSON records to OUT/train_log.jsonl (rank 0)."""

    def __init__(self, out: Path, main: bool, quiet: bool) -> None:
        self.out, self.main, self.quiet = out, main, quiet

    def say(self, msg: str) -> None:
        if self.main and not self.quiet:
            print(msg, flush=True)

    def start(self, step: int) -> None:
        """Create OUT and drop log records past `step` (a killed run may have logged steps past
        its last checkpoint; a fresh run keeps none)."""
        if not self.main:
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{self.out}: cannot create the output folder "
                                  f"({e.strerror or e}); choose another --out") from None
        path = self.out / LOG_FILE
        if path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= step]  # type: ignore[operator]
            atomic_write(path, "".join(k + "\n" for k in kept))

    def record(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        try:
            with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            print(f"warning: cannot write {self.out / LOG_FILE} ({e})", file=sys.stderr)

    def step(self, step: int, steps: int, losses: dict[int, float], lr: float, tokens_per_s: float,
             eta_s: float, extra: dict[str, float] | None = None) -> None:
        """`extra`: measurements beside the loss (metrics.Throughput: mfu, peak_memory_gb)."""
        extra = extra or {}
        shown = (f" | MFU {extra['mfu']:.1%}" if "mfu" in extra else "") + \
            (f" | peak {extra['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in extra else "")
        self.say(f"step {step:>{len(str(steps))}}/{steps} | loss "
                 + " ".join(f"t{t} {v:.4f}" for t, v in losses.items())
                 + f" | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s{shown} | ETA {fmt_time(eta_s)}")
        self.record({"step": step, "loss": {str(k): v for k, v in losses.items()}, "lr": lr,
                     "tokens_per_s": tokens_per_s, **extra})

    def eval(self, step: int, losses: dict[int, float]) -> None:
        self.say(f"eval step {step}: val loss " + "  ".join(f"t{t} {v:.4f}" for t, v in losses.items()))
        self.record({"step": step, "val_loss": {str(k): v for k, v in losses.items()}})


def _step_of(line: str) -> int | None:
    """The step of a log line; None for a line that is not a record with an integer step
    (damaged, or `Infinity`/`NaN` where a number was expected)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_losses(plan: Plan, per_tier: torch.Tensor, trained: list[int], dist: Dist) -> dict[int, float]:
    """This step's loss of each tier trained by any rank (mean over the ranks that trained it).
    A collective: every rank calls it."""
    acc = torch.zeros(2, len(trained), dtype=torch.float64)  # (sum, count) per tier
    for (t, _), v in zip(plan, per_tier.tolist(), strict=False):
        acc[0, trained.index(t)] += v
        acc[1, trained.index(t)] += 1
    acc = all_reduce_sum(acc, dist)
    return {t: float(acc[0, i] / acc[1, i]) for i, t in enumerate(trained) if acc[1, i] > 0}
