"""One optimizer step: `train_step(run, step)`.

Per step and process: `grad_accum` micro-batches, each running the step's plan (one forward +
backward per tier, activations freed in between) under autocast, with the loss scaled by the
float16 loss scale and divided by `grad_accum`; gradients are synchronised once, on the last
backward (DDP: `no_sync` before; FSDP2: `set_requires_gradient_sync(False)` before); then
unscale, the global gradient norm (clipping), and `NestedAdamW.step(extent)`.

FSDP2 issues collectives in every forward and backward (all-gather, reduce-scatter), so every
rank must run as many passes as every other. Ranks at different runtime tiers can hold plans of
different lengths (`joint`: a tier-2 rank trains fewer tiers than a tier-0 one); under FSDP2
the shorter plans are padded with weight-0 passes at the rank's narrowest tier (zero gradient,
the cheapest width; DDP needs no padding: it synchronises only in the last backward).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from matformer.training.distributed import clip_grads, grad_norm, shard_dim
from matformer.training.divergence import guard
from matformer.training.objective import Plan, step_plan, update_extent, update_extents
from matformer.training.points import heads_in_play
from matformer.training.precision import autocast


def passes(cfg: Any, base: int, step: int, rank: int, world: int, fsdp: bool, *,
           kv_base: int | None = None) -> Plan:
    """This rank's passes at `step`: its plan, padded under FSDP2 to the longest plan of any rank.
    `kv_base`: the model's KV heads (points carry heads when the run nests or limits them)."""
    plan = step_plan(cfg, base, step, rank, world, kv_base=kv_base)
    if not fsdp:
        return plan
    longest = max(len(step_plan(cfg, base, step, r, world, kv_base=kv_base)) for r in range(world))
    return plan + [(max(t for t, _ in plan), 0.0)] * (longest - len(plan))


def train_step(run: Any, step: int) -> tuple[Plan, torch.Tensor, torch.Tensor | None]:
    """Run `step`; returns (plan, per-tier losses (len(plan),) averaged over micro-batches,
    global gradient norm or None when neither clipping nor loss scaling needed it)."""
    cfg, dist = run.cfg, run.dist
    kv_base = run.model_cfg.base_kv_heads if heads_in_play(cfg) else None
    plan = step_plan(cfg, run.base, step, dist.rank, dist.world, kv_base=kv_base)
    items = passes(cfg, run.base, step, dist.rank, dist.world, cfg.fsdp, kv_base=kv_base)
    scale = run.scaler.scale / cfg.grad_accum
    total = torch.zeros(len(plan), device=dist.device)  # read on the host only when logged
    for micro in range(cfg.grad_accum):
        x = run.batch()
        teacher = getattr(run, "teacher", None)
        extra = (teacher(x),) if teacher is not None else ()
        for i, item in enumerate(items):
            last = micro == cfg.grad_accum - 1 and i == len(items) - 1
            with _sync(run, last):
                with autocast(cfg.dtype, dist.device):
                    loss, per_tier = run.objective(x, [item], *extra)
                (loss * scale).backward()
            if i < len(plan):
                total[i] += per_tier.detach().float()[0]
    norm = _finish_grads(run)
    ok = run.scaler.update(float(norm)) if run.scaler.enabled else True
    finite = guard(run, step, total / cfg.grad_accum, norm)  # a non-finite loss: stop or skip
    if ok and finite:
        run.opt.step(update_extents(cfg, run.model_cfg, step, dist.world) if kv_base
                     else update_extent(cfg, run.base, step, dist.world))
    run.opt.zero_grad(set_to_none=True)
    return plan, total / cfg.grad_accum, norm


def _sync(run: Any, last: bool) -> contextlib.AbstractContextManager:
    """Gradient synchronisation only in the step's last backward."""
    if run.cfg.fsdp:
        run.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if isinstance(run.objective, nn.parallel.DistributedDataParallel) and not last:
        return run.objective.no_sync()
    return contextlib.nullcontext()


def _finish_grads(run: Any) -> torch.Tensor | None:
    """Unscale, then the global gradient norm (clipping to `grad_clip` if set). The norm is
    `distributed.grad_norm`'s, the same number under DDP and FSDP2 on as many processes."""
    params = [p for p in run.model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    run.scaler.unscale_(grads)
    if run.cfg.grad_clip <= 0 and not run.scaler.enabled:
        return None
    dims = [shard_dim(p.ndim, run.opt.nest_dim.get(p)) for p in params]
    norm = grad_norm(grads, dims, run.dist)
    if run.cfg.grad_clip > 0:
        clip_grads(grads, norm, run.cfg.grad_clip)
    return norm
