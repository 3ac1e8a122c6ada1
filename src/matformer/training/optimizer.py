"""The optimizer and its schedule: `NestedAdamW` (AdamW that updates only the used prefix of each
nested FFN) and `lr_at` (linear warm-up, cosine decay).

Why our own AdamW: a step that trains tier t leaves the FFN neurons past B >> t with an exactly
zero gradient, but torch.optim.AdamW would still move them (decoupled weight decay shrinks every
parameter, stale momentum keeps pushing). `NestedAdamW.step(extent)` touches only neurons
[:extent]: the rest keep weights, moments and step counts bit for bit, and every neuron's bias
correction counts only the steps that used it.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import CheckpointError
from .settings import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> NestedAdamW:
    return NestedAdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                       weight_decay=cfg.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> float:
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over min(warmup_steps, steps // 10) steps, then cosine decay to min_lr_ratio * lr at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)  # short runs still get their decay
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


_FFN_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")


class NestedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) that updates only the used prefix of
    each nested FFN.

    `step(extent)`: FFN neurons [:extent] (rows of gate/up, columns of down) get the AdamW update
    (decay, moments, parameter); neurons [extent:] are not touched at all — weights, moments and
    step counts stay bit-identical. Each neuron keeps its own step count for bias correction (a
    vector per FFN matrix). Counts are non-increasing along the neuron axis, so the update runs
    once per run of equal counts with scalar bias corrections, the same arithmetic as torch's
    single-tensor AdamW (with `extent` = full width it matches `torch.optim.AdamW(foreach=False)`).
    Non-FFN parameters get plain AdamW; weight decay applies to matrices and embeddings only."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        decay, no_decay = [], []
        self.names: dict[nn.Parameter, str] = {}
        self.nest_dim: dict[nn.Parameter, int] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            self.names[p] = name
            m = _FFN_PARAM.match(name)
            if m:
                self.nest_dim[p] = 1 if m.group(2) == "down_proj" else 0
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state[p]
        if not st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            n = p.shape[self.nest_dim[p]] if p in self.nest_dim else 1
            st["step"] = torch.zeros(n, dtype=torch.int64)  # on CPU: read by Python each step
        return st

    @torch.no_grad()
    def step(self, extent: int | None = None, closure=None):  # type: ignore[override]
        assert closure is None, "NestedAdamW does not take a closure"
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._init_state(p)
                if p not in self.nest_dim:
                    st["step"] += 1
                    _adamw_(p, p.grad, st["exp_avg"], st["exp_avg_sq"], int(st["step"][0]),
                            lr, wd, beta1, beta2, eps)
                    continue
                dim = self.nest_dim[p]
                m = p.shape[dim] if extent is None else min(extent, p.shape[dim])
                counts = st["step"]
                counts[:m] += 1
                # Runs of equal step counts inside [:m]: (value, length), value non-increasing.
                values, lengths = torch.unique_consecutive(counts[:m], return_counts=True)
                a = 0
                for c, n in zip(values.tolist(), lengths.tolist(), strict=False):
                    sl = (slice(a, a + n),) if dim == 0 else (slice(None), slice(a, a + n))
                    _adamw_(p[sl], p.grad[sl], st["exp_avg"][sl], st["exp_avg_sq"][sl], c,
                            lr, wd, beta1, beta2, eps)
                    a += n

    # Tensors-only state (safetensors), keyed by parameter name.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for p, name in self.names.items():
            st = self.state.get(p)
            if st:
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    out[f"optim.{name}.{k}"] = st[k].detach().cpu().contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        for p, name in self.names.items():
            keys = [f"optim.{name}.{k}" for k in ("exp_avg", "exp_avg_sq", "step")]
            if not any(k in tensors for k in keys):
                continue
            missing = [k for k in keys if k not in tensors]
            if missing:
                raise CheckpointError(f"{source}: optimizer state lacks {missing[0]}")
            st = self._init_state(p)
            for k, key in zip(("exp_avg", "exp_avg_sq", "step"), keys, strict=False):
                t = tensors[key]
                if tuple(t.shape) != tuple(st[k].shape):
                    raise CheckpointError(f"{source}: {key} has shape {tuple(t.shape)}, this model "
                                          f"needs {tuple(st[k].shape)} (another model?)")
                st[k].copy_(t)


def _adamw_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
            lr: float, wd: float, beta1: float, beta2: float, eps: float) -> None:
    """One AdamW update in place (views allowed), torch's single-tensor arithmetic."""
    if wd:
        p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    denom = (v.sqrt() / bc2_sqrt).add_(eps)
    p.addcdiv_(m, denom, value=-(lr / bc1))
