"""Divergence: a non-finite loss stops the run, or skips the step (`skip_nonfinite`).

`guard(run, step, per_tier, norm)` runs after the backward and before the optimizer update:
when any trained tier's loss (or the global gradient norm, unless float16 loss scaling owns
inf/nan gradients) is not finite on any rank, it raises `TrainingDiverged` (the CLI prints one
line and exits 2; nothing was updated or saved) or, with `skip_nonfinite`, tells the caller to
skip the update, up to `MAX_SKIPPED` steps in a row. `check_weights(run, step)` runs before
every save: non-finite weights are never written, so checkpoint rotation, which keeps the
newest checkpoints, can never delete the last one with finite weights in favour of NaN ones.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from matformer.errors import TrainingDiverged
from matformer.training.distributed import all_reduce_sum

MAX_SKIPPED = 20
"""Consecutive non-finite steps `skip_nonfinite` tolerates before the run is stopped anyway."""

_ADVICE = ("lower --lr, raise --warmup-steps or set --grad-clip; continue from the last "
           "checkpoint with --resume")


def _all_finite(flag: bool, run: Any) -> bool:
    """True when `flag` holds on every rank (a collective in multi-process runs)."""
    bad = torch.tensor([0.0 if flag else 1.0])
    return float(all_reduce_sum(bad, run.dist)[0]) == 0.0


def guard(run: Any, step: int, per_tier: torch.Tensor, norm: torch.Tensor | None) -> bool:
    """True: apply this step's update. False: skip it (`skip_nonfinite`). Else TrainingDiverged."""
    losses = [float(v) for v in per_tier.tolist()]
    scaler = getattr(run, "scaler", None)  # float16 loss scaling handles inf/nan gradients itself
    values = losses + ([] if norm is None or (scaler is not None and scaler.enabled)
                       else [float(norm)])
    if _all_finite(all(math.isfinite(v) for v in values), run):
        run.nonfinite_streak = 0
        return True
    what = "loss " + ", ".join(f"{v:g}" for v in losses)
    if norm is not None:
        what += f", gradient norm {float(norm):g}"
    streak = getattr(run, "nonfinite_streak", 0) + 1
    run.nonfinite_streak = streak
    if run.cfg.skip_nonfinite and streak <= MAX_SKIPPED:
        run.report.say(f"step {step + 1}: not finite ({what}); update skipped (--skip-nonfinite)")
        return False
    why = (f"{streak} steps in a row were not finite" if run.cfg.skip_nonfinite
           else f"the training diverged at step {step + 1} ({what})")
    raise TrainingDiverged(f"{why}; stopped without updating or saving (the last checkpoint is "
                           f"kept): {_ADVICE}, or pass --skip-nonfinite to skip such steps")


def weights_finite(model: torch.nn.Module) -> bool:
    for p in model.parameters():
        t = p.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return False
    return True


def check_weights(run: Any, step: int) -> None:
    """Before a save: the weights must be finite on every rank, else TrainingDiverged."""
    if not _all_finite(weights_finite(run.model), run):
        raise TrainingDiverged(f"step {step}: the weights are not finite; nothing was saved and "
                               f"no checkpoint was deleted: {_ADVICE}")
