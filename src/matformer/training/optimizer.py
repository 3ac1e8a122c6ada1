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
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from matformer.errors import CheckpointError
from matformer.models.registry import nested_axis
from matformer.training.points import heads_in_play
from matformer.training.settings import ADAMW_IMPLS as IMPLS
from matformer.training.settings import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, narrowest_tier: int = 0) -> NestedAdamW:
    """`narrowest_tier`: the largest tier this run trains (its FFN prefix is where the tail that
    --tail-lr-scale scales begins)."""
    return NestedAdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                       weight_decay=cfg.weight_decay, nest_heads=heads_in_play(cfg),
                       impl=cfg.adamw_impl, tail_lr_scale=cfg.tail_lr_scale,
                       tail_tier=narrowest_tier)


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


def nested_dim(name: str) -> int | None:
    """The dimension along which a parameter's FFN neurons are nested (0: rows of gate/up, 1:
    columns of down, in the family's names; models.registry.nested_axis), None for a plain
    parameter."""
    axis = nested_axis(name)
    return axis[1] if axis is not None and axis[0] == "ffn" else None


def nested_head_dim(name: str) -> int | None:
    """Nested attention heads (issue 11): rows of q/k/v_proj (0), columns of o_proj (1)."""
    axis = nested_axis(name)
    return axis[1] if axis is not None and axis[0] == "heads" else None


def nested_dims(heads: bool) -> Callable[[str], int | None]:
    """`nested_dim`, plus the attention projections when `heads` are nested (FSDP2 sharding and
    NestedAdamW use the same rule)."""
    def dim(name: str) -> int | None:
        d = nested_dim(name)
        return nested_head_dim(name) if d is None and heads else d
    return dim


Extent = int | Mapping[str, int] | None
"""What `NestedAdamW.step` updates of each nested matrix: None (everything), an int (FFN neurons
[:extent]; attention whole), or {parameter name: prefix along its nested dim}
(`training.points.extents`: FFN and attention heads)."""


class NestedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) that updates only the used prefix of
    each nested FFN.

    `step(extent)`: FFN neurons [:extent] (rows of gate/up, columns of down) get the AdamW update
    (decay, moments, parameter); neurons [extent:] are not touched at all — weights, moments and
    step counts stay bit-identical. Each neuron keeps its own step count for bias correction (a
    vector per FFN matrix). Counts are non-increasing along the neuron axis, so the update runs
    once per run of equal counts with scalar bias corrections, the same arithmetic as torch's
    single-tensor AdamW (with `extent` = full width it matches `torch.optim.AdamW(foreach=False)`
    bit for bit). No Python loop per parameter does math: the views of every (group, step count)
    are updated by one list of `torch._foreach_*` ops. Under FSDP2 each rank updates its local
    shard (nested matrices are sharded along their non-nested dimension, so prefixes are local).
    Non-FFN parameters get plain AdamW; weight decay applies to matrices and embeddings only.

    `impl`: "foreach" (the arithmetic above, bit-identical to torch's single-tensor AdamW),
    "fused" (torch's fused AdamW kernel, `torch._fused_adamw_`, on every contiguous view — whole
    matrices, row prefixes — one kernel per (group, step count); column prefixes, which are
    strided, stay on foreach; same semantics, rounding may differ in the last bits), or "auto"
    (fused on CUDA, foreach elsewhere).

    `tail_lr_scale`: the learning rate (and so the decoupled decay) of each FFN matrix's tail,
    neurons [n >> tail_tier:], is multiplied by this: the neurons the narrowest trained width
    (tier `tail_tier`) does not use."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, nest_heads: bool = False,
                 impl: str = "foreach", tail_lr_scale: float = 1.0, tail_tier: int = 0) -> None:
        decay, no_decay = [], []
        self.names: dict[nn.Parameter, str] = {}
        self.nest_dim: dict[nn.Parameter, int] = {}
        dims = nested_dims(nest_heads)  # heads: q/k/v rows and o columns nest too (own counts)
        self.head_params = {p for name, p in model.named_parameters()
                            if nest_heads and nested_head_dim(name) is not None}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            self.names[p] = name
            dim = dims(name)
            if dim is not None:
                self.nest_dim[p] = dim
            (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        if tail_lr_scale <= 0 or tail_tier < 0:
            raise ValueError(f"tail_lr_scale must be > 0 and tail_tier >= 0, got "
                             f"{tail_lr_scale} and {tail_tier}")
        self.impl = impl
        self.tail_lr_scale, self.tail_tier = float(tail_lr_scale), tail_tier
        self._counters: list[tuple[int, int | None, torch.Tensor, list[nn.Parameter]]] | None = None

    def _init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state[p]
        if not st:
            # Moments like the parameter (a DTensor under FSDP2: sharded like it, so DCP can
            # reshard them); step counts are replicated CPU vectors (read by Python each step).
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            n = p.shape[self.nest_dim[p]] if p in self.nest_dim else 1
            st["step"] = torch.zeros(n, dtype=torch.int64)
            if isinstance(p, DTensor):
                for pl in p.placements:
                    if getattr(pl, "dim", None) == self.nest_dim.get(p):
                        raise ValueError(f"{self.names[p]} is sharded along its nested dimension; "
                                         f"shard it along the other one (distributed.wrap does)")
            self._counters = None
        return st

    def _counter_groups(self) -> list[tuple[int, int | None, torch.Tensor, list[nn.Parameter]]]:
        """Parameters whose per-neuron step counts are equal share one count vector:
        [(param group index, nested dim or None, counts, params)]. In a nested run every FFN
        matrix of a layer stack has the same counts, so the bookkeeping below runs once per
        distinct count vector, not once per parameter."""
        if self._counters is None:
            shared: dict[tuple, tuple[int, int | None, torch.Tensor, list[nn.Parameter]]] = {}
            for gi, group in enumerate(self.param_groups):
                for p in group["params"]:
                    st = self.state.get(p)
                    if not st:
                        continue
                    counts = st["step"]
                    key = (gi, self.nest_dim.get(p), len(counts), counts.numpy().tobytes())
                    if key not in shared:
                        shared[key] = (gi, self.nest_dim.get(p), counts, [])
                    st["step"] = shared[key][2]
                    shared[key][3].append(p)
            self._counters = list(shared.values())
        return self._counters

    @torch.no_grad()
    def step(self, extent: Extent = None, closure=None):  # type: ignore[override]
        """Update neurons [:extent] of every nested matrix (all of them with None; per parameter
        with a {name: prefix} mapping, see `Extent`) and every other parameter: one foreach update
        per (param group, step count), none per parameter."""
        assert closure is None, "NestedAdamW does not take a closure"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._init_state(p)
        buckets: dict[tuple[int, int], list[list[torch.Tensor]]] = {}
        for gi, dim, counts, params in list(self._counter_groups()):
            live = [p for p in params if p.grad is not None]
            if not live:
                continue
            for m, part_counts, part in self._by_extent(live, params, counts, dim, extent):
                part_counts[:m] += 1
                # Runs of equal step counts inside [:m]: (value, length), value non-increasing.
                values, lengths = torch.unique_consecutive(part_counts[:m], return_counts=True)
                runs = list(zip(values.tolist(), lengths.tolist(), strict=True))
                for p in part:
                    st = self.state[p]
                    tensors = [_local(t) for t in (p, p.grad, st["exp_avg"], st["exp_avg_sq"])]
                    for c, a, n, scale in self._pieces(p, runs):
                        lists = buckets.setdefault((gi, c, scale), [[], [], [], []])
                        for out, t in zip(lists, tensors, strict=True):
                            out.append(_prefix(t, dim, a, n))
        fused = self.impl == "fused" or (self.impl == "auto" and self._on_cuda())
        for (gi, c, scale), lists in buckets.items():
            group = self.param_groups[gi]
            args = (c, group["lr"] * scale, group["weight_decay"], *group["betas"], group["eps"])
            if fused:
                lists = _fused_adamw_(*lists, *args)  # what is left: strided views
            if lists[0]:
                _foreach_adamw_(*lists, *args)

    def _pieces(self, p: nn.Parameter, runs: list[tuple[int, int]]) -> list[tuple[int, int, int, float]]:
        """(step count, start, length, lr scale) of each piece of a parameter's update: its runs
        of equal counts, split where the tail that `tail_lr_scale` scales begins (FFN matrices
        only)."""
        tail = None
        if self.tail_lr_scale != 1.0 and p in self.nest_dim and p not in self.head_params:
            tail = len(self.state[p]["step"]) >> self.tail_tier
        out, a = [], 0
        for c, n in runs:
            if tail is not None and a < tail < a + n:
                out += [(c, a, tail - a, 1.0), (c, tail, a + n - tail, self.tail_lr_scale)]
            else:
                out.append((c, a, n, self.tail_lr_scale if tail is not None and a >= tail else 1.0))
            a += n
        return out

    def _on_cuda(self) -> bool:
        return any(p.is_cuda for g in self.param_groups for p in g["params"][:1])

    def _by_extent(self, live: list[nn.Parameter], params: list[nn.Parameter],
                   counts: torch.Tensor, dim: int | None,
                   extent: Extent) -> list[tuple[int, torch.Tensor, list[nn.Parameter]]]:
        """[(prefix m, count vector, params)]: the live params of one shared count vector split
        by the prefix each is updated over. A vector is unshared (cloned per part) when its
        params part ways: some have no gradient, or they are updated over different prefixes."""
        n = len(counts)

        def m_of(p: nn.Parameter) -> int:
            if dim is None or extent is None:
                return n
            if isinstance(extent, Mapping):
                return min(extent.get(self.names[p], n), n)
            return n if p in self.head_params else min(extent, n)

        parts: dict[int, list[nn.Parameter]] = {}
        for p in live:
            parts.setdefault(m_of(p), []).append(p)
        if len(parts) == 1 and len(live) == len(params):
            return [(m, counts, ps) for m, ps in parts.items()]
        out = []
        for m, ps in parts.items():  # the others keep their counts: stop sharing
            c = counts.clone()
            for p in ps:
                self.state[p]["step"] = c
            out.append((m, c, ps))
        self._counters = None
        return out

    # Sharded state for torch.distributed.checkpoint (training.sharded), keyed by parameter name.
    def state_for_dcp(self, for_load: bool) -> dict[str, torch.Tensor]:
        """Moments (DTensors under FSDP2) and step counts of every parameter. `for_load`: the
        tensors DCP loads into in place (state created if missing; counts unshared first)."""
        out = {}
        for p, name in self.names.items():
            st = self._init_state(p) if for_load else self.state.get(p)
            if not st:
                continue
            if for_load:
                st["step"] = st["step"].clone()
            out[f"{name}.exp_avg"], out[f"{name}.exp_avg_sq"] = st["exp_avg"], st["exp_avg_sq"]
            out[f"{name}.step"] = st["step"] if for_load else st["step"].clone()
        return out

    def loaded_from_dcp(self) -> None:
        self._counters = None  # counts read per parameter: group equal ones again

    # Tensors-only state (safetensors), keyed by parameter name.
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for p, name in self.names.items():
            st = self.state.get(p)
            if st:
                for k in ("exp_avg", "exp_avg_sq", "step"):
                    out[f"optim.{name}.{k}"] = st[k].detach().cpu().clone()  # counts are shared
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
                if k == "step":  # its own vector: counts may be shared (_counter_groups)
                    st[k] = t.to(torch.int64).clone()
                else:
                    st[k].copy_(t)
        self._counters = None


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2 shards), the tensor itself otherwise."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _prefix(t: torch.Tensor, dim: int | None, a: int, n: int) -> torch.Tensor:
    """Neurons [a, a+n) of a nested matrix (rows for dim 0, columns for dim 1) as a view."""
    if dim is None:
        return t
    return t[a:a + n] if dim == 0 else t[:, a:a + n]


def _fused_adamw_(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor],
                  vs: list[torch.Tensor], step: int, lr: float, wd: float, beta1: float,
                  beta2: float, eps: float) -> list[list[torch.Tensor]]:
    """torch's fused AdamW kernel on the contiguous views of one (group, step count) bucket;
    returns the other ones (strided column prefixes: the multi-tensor kernel is only used here
    on dense memory) for `_foreach_adamw_`."""
    dense = [i for i in range(len(ps))
             if all(t[i].is_contiguous() for t in (ps, gs, ms, vs))]
    if dense:
        by_device: dict[torch.device, list[int]] = {}
        for i in dense:
            by_device.setdefault(ps[i].device, []).append(i)
        for device, idx in by_device.items():
            steps = torch.full((), float(step), dtype=torch.float32, device=device)
            torch._fused_adamw_([ps[i] for i in idx], [gs[i] for i in idx], [ms[i] for i in idx],
                                [vs[i] for i in idx], [], [steps] * len(idx), lr=lr, beta1=beta1,
                                beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False,
                                maximize=False)
    kept = set(dense)
    rest = [i for i in range(len(ps)) if i not in kept]
    return [[t[i] for i in rest] for t in (ps, gs, ms, vs)]


def _foreach_adamw_(ps: list[torch.Tensor], gs: list[torch.Tensor], ms: list[torch.Tensor],
                    vs: list[torch.Tensor], step: int, lr: float, wd: float, beta1: float,
                    beta2: float, eps: float) -> None:
    """One AdamW update in place of tensors (views allowed) that share a step count: torch's
    single-tensor AdamW arithmetic, op for op, as foreach ops (bit-identical to it)."""
    if wd:
        torch._foreach_mul_(ps, 1 - lr * wd)
    torch._foreach_lerp_(ms, gs, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
    bc1 = 1 - beta1**step
    bc2_sqrt = (1 - beta2**step) ** 0.5
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(ps, ms, denom, value=-(lr / bc1))
