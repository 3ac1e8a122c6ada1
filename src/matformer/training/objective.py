"""What one rank computes at one step: the step's plan and the loss it backpropagates.

Objectives (per optimizer step, on one batch):
- `sample`: one tier drawn from the rank's trained tiers with `tier_probs` (default uniform);
- `joint`: every trained tier on the same batch, loss = sum_i w_i * loss_i (`joint_weights`);
- `single`: one fixed tier (independently trained baselines).

A plan is [(tier, loss weight)] — with nested heads [(Point(tier, kv_heads), loss weight)], see
`training.points`; `step_plan` is a pure function of (seed, step, rank), so every rank knows
every other rank's plan (`update_extents`) and a resumed run draws the same tiers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM, lm_loss
from matformer.training.distill import Distillation
from matformer.training.points import Key, rank_points, runtime_kv_heads, setting_of, widest
from matformer.training.settings import TrainConfig, rank_choices, runtime_tiers

Plan = list[tuple[Key, float]]


def step_plan(cfg: TrainConfig, base: int, step: int, rank: int, world: int, *,
              kv_base: int | None = None) -> Plan:
    """[(tier, loss weight)] that `rank` trains at `step` ([(Point, weight)] with heads in play;
    `kv_base`: the model's KV heads G, needed then). Stateless (a function of the seed, step and
    rank), so every rank knows every other rank's plan and a resumed run draws the same."""
    rt = runtime_tiers(cfg, world)[rank]
    tiers, ps = rank_choices(cfg, base, rt)
    if kv_base is not None:
        tiers, ps = rank_points(cfg, tiers, ps, kv_base,  # type: ignore[assignment]
                                runtime_kv_heads(cfg, world, kv_base)[rank])
    if cfg.objective == "sample":
        rng = np.random.default_rng([cfg.seed, step, rank, 0x5A3])
        return [(tiers[int(rng.choice(len(tiers), p=np.asarray(ps)))], 1.0)]
    return list(zip(tiers, ps, strict=False))


def update_extent(cfg: TrainConfig, base: int, step: int, world: int) -> int:
    """FFN prefix width that receives a (possibly) non-zero averaged gradient at `step`: the
    widest tier any rank trains."""
    return max(base >> t for r in range(world) for t, _ in step_plan(cfg, base, step, r, world))


def update_extents(cfg: TrainConfig, model_cfg: MatFormerConfig, step: int,
                   world: int) -> dict[str, int]:
    """Per nested parameter (FFN and attention, by name) the prefix that receives a (possibly)
    non-zero averaged gradient at `step`: the widest FFN and the most KV heads any rank's plan
    uses (`NestedAdamW.step` updates only those rows / columns)."""
    keys = [k for r in range(world) for k, _ in step_plan(
        cfg, model_cfg.base, step, r, world, kv_base=model_cfg.base_kv_heads)]
    return widest(keys, model_cfg.base, model_cfg)


class Objective(nn.Module):
    """forward(input_ids (B, T), plan [(tier, weight)], teacher_logits=None) ->
    (sum_i w_i * loss_i, LM losses (len(plan),)). With `distill` and teacher logits, loss_i mixes
    the distillation loss in (matformer.training.distill); the LM losses are reported either way."""

    def __init__(self, model: MatFormerLM, distill: Distillation | None = None) -> None:
        super().__init__()
        self.model = model
        self.distill = distill

    def forward(self, input_ids: torch.Tensor, plan: Sequence[tuple[int, float]],
                teacher_logits: torch.Tensor | None = None):
        total: torch.Tensor | None = None
        losses = []
        for key, w in plan:
            with self.model.at_width(**setting_of(key)):
                logits = self.model(input_ids)
            distilling = self.distill is not None and teacher_logits is not None
            # alpha 1: the LM loss is logged only, so no backward runs through it
            with torch.no_grad() if distilling and self.distill.pure else contextlib.nullcontext():
                loss = lm_loss(logits, input_ids)  # shifted labels; the logits not copied
            losses.append(loss.detach())
            if distilling:
                loss = self.distill.mix(logits, teacher_logits, loss)
            total = loss * w if total is None else total + loss * w
        assert total is not None
        return total, torch.stack(losses)


def forward_backward(objective: nn.Module, input_ids: torch.Tensor,
                     plan: Sequence[tuple[int, float]],
                     teacher: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Accumulate the gradient of sum_i w_i * loss_i into .grad; returns the per-tier
    losses (len(plan),).

    One forward+backward per tier rather than one backward through a graph holding all of
    them: the same gradient (up to float summation order), but each width's activations are
    freed before the next width runs, so `joint` costs no more than its single-width steps. Under
    DDP every backward but the last runs in `no_sync()`, so each rank all-reduces once per step
    however many tiers its plan holds (ranks at different runtime tiers may hold
    different numbers). A `teacher` (distillation) runs once per step; every tier of the plan
    learns from the same logits."""
    ddp = isinstance(objective, nn.parallel.DistributedDataParallel)
    teacher_logits = teacher(input_ids) if teacher is not None else None
    losses = []
    for i, item in enumerate(plan):
        last = i == len(plan) - 1
        with objective.no_sync() if ddp and not last else contextlib.nullcontext():
            loss, per_tier = objective(input_ids, [item], teacher_logits)
            loss.backward()
        losses.append(per_tier)
    return torch.cat(losses)
