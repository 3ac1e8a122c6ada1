"""Training every width of a MatFormer at once: `train(TrainConfig(...)) -> TrainResult`.

Objectives (per optimizer step, on one batch):
- `sample`: one granularity (tier) drawn with `granularity_probs` (default uniform over 0..3);
- `joint`: every granularity on the same batch, loss = sum_i w_i * loss_i, one backward;
- `single`: one fixed tier (independently trained baselines).

Runtime tiers (`tier=T`, or `rank_tiers` for one tier per process): the full-width model is in
memory and only the first B>>T FFN neurons are used and updated. `NestedAdamW` updates just the
prefix of each FFN that some rank used this step, so the rest (the "tail") keeps its weights and
its Adam moments bit for bit: no decoupled weight decay and no momentum drift on steps that did
not use it. A neuron's bias correction counts only the steps that used it. (torch's AdamW would
keep moving an unused neuron by its stale momentum and shrink it by weight decay.)

Distributed: the same code under `torchrun --nproc-per-node N`; the environment decides
(RANK/WORLD_SIZE/LOCAL_RANK). DDP (gloo on CPU, NCCL on GPU) averages the per-rank losses'
gradients; every rank computes the same update extent from the shared step plan, so parameters
stay identical. Logging and saving happen on rank 0.

Checkpoints: `out/checkpoints/step-NNNNNNN/` (written atomically through `save_model`) hold the
weights, tokenizer, `train_config.json` and `training_state.safetensors` (optimizer moments,
per-neuron step counts, RNG state; the step, data position and history as JSON metadata).
`resume=True` continues from the newest one; on CPU the result is bit-identical to a run that was
never interrupted. The final model is also written to `out/` itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as D
from .config import MatFormerConfig, perplexity
from .errors import CheckpointError, ConfigError, TierError
from .model import MatFormerLM, parameter_counts
from .tiers import max_tier

OBJECTIVES = ("sample", "joint", "single")
STATE_FILE = "training_state.safetensors"
CONFIG_FILE = "train_config.json"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


@dataclass
class TrainConfig:
    """Settings of a training run (saved as train_config.json in every checkpoint)."""

    out: str = "runs/matformer"
    """Output folder: checkpoints/step-*/ during training, the final model in the folder itself."""
    data: str | None = None
    """Text file, folder of text files, or datasets folder; None: the default corpus (stdlib)."""
    preset: str = "tiny"
    """Model size (matformer.config.PRESETS); its vocab_size is replaced by the tokenizer's."""
    steps: int = 240
    objective: str = "sample"
    """sample | joint | single."""
    tier: int | None = None
    """Runtime tier: only the first B>>tier FFN neurons are used and updated (single: the tier)."""
    rank_tiers: list[int] | None = None
    """One runtime tier per process under torchrun (overrides `tier`)."""
    granularities: list[int] | None = None
    """Tiers the objectives train; default 0..3 (fewer if the base can't be divided)."""
    granularity_probs: list[float] | None = None
    """`sample`: one probability per granularity, summing to 1 (default uniform)."""
    joint_weights: list[float] | None = None
    """`joint`: one loss weight per granularity (default 1 each: the plain sum)."""
    batch_size: int = 16
    """Sequences per process per step."""
    seq_len: int = 128
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    eval_every: int = 40
    eval_windows: int = 32
    """Held-out windows (of seq_len tokens) per evaluation."""
    save_every: int = 80
    keep_checkpoints: int = 2
    seed: int = 0
    vocab_size: int = 2048
    val_fraction: float = D.DEFAULT_VAL_FRACTION
    split_seed: int = D.DEFAULT_SPLIT_SEED
    max_corpus_bytes: int | None = None
    """Cap on the default corpus (None: data.DEFAULT_MAX_BYTES); user data is not capped."""
    cache_dir: str | None = None
    """Token cache (default: $MATFORMER_CACHE or ~/.cache/matformer)."""
    resume: bool = False
    device: str = "auto"
    log_every: int = 1
    quiet: bool = False

    # Settings that may change between a run and its resumption (they don't change the math).
    _RESUMABLE = ("out", "steps", "eval_every", "eval_windows", "save_every", "keep_checkpoints",
                  "cache_dir", "resume", "device", "log_every", "quiet")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_val_loss: dict[int, float]
    """Validation loss of every trained tier at the end (rank 0; empty on other ranks)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per evaluation: {"step", "val_loss": {tier: loss}}."""
    train_tokens: int = 0
    tokens_per_second: float = 0.0
    elapsed_s: float = 0.0
    table: str = ""


# ---- validation of settings ------------------------------------------------------------------


def model_config(cfg: TrainConfig, vocab_size: int) -> MatFormerConfig:
    mc = MatFormerConfig.from_preset(cfg.preset, vocab_size=vocab_size, bos_token_id=D.BOS_ID,
                                     eos_token_id=D.EOS_ID, pad_token_id=D.PAD_ID)
    if cfg.seq_len > mc.max_position_embeddings:
        raise ConfigError(f"seq_len={cfg.seq_len} exceeds the {cfg.preset!r} preset's "
                          f"max_position_embeddings={mc.max_position_embeddings}")
    return mc


def _granularities(cfg: TrainConfig, base: int) -> list[int]:
    if cfg.granularities is not None:
        gs = list(cfg.granularities)
        if not gs or len(set(gs)) != len(gs):
            raise ConfigError(f"granularities must be distinct tiers, got {gs}")
        for t in gs:
            _check_tier(base, t, "granularities")
        return gs
    return list(range(min(3, max_tier(base)) + 1))


def _check_tier(base: int, t: int, what: str) -> int:
    try:
        from .tiers import width_of

        return width_of(base, t)
    except TierError as e:
        raise TierError(f"{what}: {e} (the model's FFN base width is {base})") from None


def runtime_tiers(cfg: TrainConfig, world: int) -> list[int]:
    """The runtime tier of every rank."""
    if cfg.rank_tiers is not None:
        if len(cfg.rank_tiers) != world:
            raise ConfigError(f"rank_tiers has {len(cfg.rank_tiers)} entries ({cfg.rank_tiers}) "
                              f"but {world} process(es) are running; give one tier per rank")
        return list(cfg.rank_tiers)
    return [cfg.tier if cfg.tier is not None else 0] * world


def rank_choices(cfg: TrainConfig, base: int, rt: int) -> tuple[list[int], list[float]]:
    """The granularities a rank at runtime tier `rt` trains, with their probabilities (sample)
    or weights (joint)."""
    if cfg.objective == "single":
        return [rt], [1.0]
    gs = _granularities(cfg, base)
    if cfg.objective == "sample":
        probs = cfg.granularity_probs or [1.0 / len(gs)] * len(gs)
    else:
        probs = cfg.joint_weights or [1.0] * len(gs)
    allowed = [(g, p) for g, p in zip(gs, probs, strict=False) if g >= rt]
    if not allowed:
        raise ConfigError(f"runtime tier {rt} leaves none of the granularities {gs} to train "
                          f"(a tier-{rt} participant can only train tiers >= {rt})")
    tiers, ps = [g for g, _ in allowed], [p for _, p in allowed]
    if cfg.objective == "sample":
        total = sum(ps)
        if total <= 0:
            raise ConfigError(f"granularity_probs give probability 0 to every tier a runtime "
                              f"tier-{rt} rank can train ({tiers})")
        ps = [p / total for p in ps]  # renormalised over what this rank can run
    return tiers, ps


def validate(cfg: TrainConfig, base: int | None = None, world: int = 1) -> None:
    """Raise a ConfigError/TierError naming the setting on bad input (before anything is written)."""
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {cfg.objective!r}")
    for key in ("steps", "batch_size", "seq_len", "eval_every", "save_every", "eval_windows",
                "keep_checkpoints", "log_every"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {v!r}")
    for key in ("lr", "eps"):
        if not getattr(cfg, key) > 0:
            raise ConfigError(f"{key} must be positive, got {getattr(cfg, key)!r}")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise ConfigError(f"beta1/beta2 must be in [0, 1), got {cfg.beta1}, {cfg.beta2}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or cfg.warmup_steps < 0:
        raise ConfigError("weight_decay, grad_clip and warmup_steps must be non-negative")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if base is None:  # from_preset raises the ConfigError listing the presets
        base = MatFormerConfig.from_preset(cfg.preset).base
    gs = _granularities(cfg, base)
    if cfg.granularity_probs is not None:
        ps = list(cfg.granularity_probs)
        if len(ps) != len(gs):
            raise ConfigError(f"granularity_probs has {len(ps)} values {ps} for {len(gs)} "
                              f"granularities (tiers {gs}); give one probability per tier")
        if any(p < 0 for p in ps) or abs(sum(ps) - 1.0) > 1e-6:
            raise ConfigError(f"granularity_probs {ps} must be non-negative and sum to 1 "
                              f"(they sum to {sum(ps):g})")
    if cfg.joint_weights is not None and len(cfg.joint_weights) != len(gs):
        raise ConfigError(f"joint_weights has {len(cfg.joint_weights)} values for {len(gs)} "
                          f"granularities (tiers {gs})")
    if cfg.tier is not None:
        _check_tier(base, cfg.tier, "tier")
    for t in cfg.rank_tiers or []:
        _check_tier(base, t, "rank_tiers")
    for rt in runtime_tiers(cfg, world):
        rank_choices(cfg, base, rt)


# ---- the step plan ---------------------------------------------------------------------------


def step_plan(cfg: TrainConfig, base: int, step: int, rank: int, world: int) -> list[tuple[int, float]]:
    """[(tier, loss weight)] that `rank` trains at `step`. Stateless (a function of the seed, step
    and rank), so every rank knows every other rank's plan and a resumed run draws the same."""
    rt = runtime_tiers(cfg, world)[rank]
    tiers, ps = rank_choices(cfg, base, rt)
    if cfg.objective == "sample":
        rng = np.random.default_rng([cfg.seed, step, rank, 0x5A3])
        return [(tiers[int(rng.choice(len(tiers), p=np.asarray(ps)))], 1.0)]
    return list(zip(tiers, ps, strict=False))


def update_extent(cfg: TrainConfig, base: int, step: int, world: int) -> int:
    """FFN prefix width that receives a (possibly) non-zero averaged gradient at `step`: the
    widest tier any rank trains."""
    return max(base >> t for r in range(world) for t, _ in step_plan(cfg, base, step, r, world))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over min(warmup_steps, steps // 10) steps, then cosine decay to min_lr_ratio * lr at `steps`."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)  # short runs still get their decay
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---- the optimizer ---------------------------------------------------------------------------

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


# ---- the objective as one module (one forward per step, for DDP) ----------------------------


class Objective(nn.Module):
    """forward(input_ids (B, T), plan [(tier, weight)]) -> (sum_i w_i * loss_i, losses (len(plan),))"""

    def __init__(self, model: MatFormerLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, plan: Sequence[tuple[int, float]]):
        total: torch.Tensor | None = None
        losses = []
        for tier, w in plan:
            with self.model.at_width(tier=tier):
                loss = self.model.loss(input_ids)  # shifted labels; the (B, T, V) logits not copied
            losses.append(loss.detach())
            total = loss * w if total is None else total + loss * w
        assert total is not None
        return total, torch.stack(losses)


def forward_backward(objective: nn.Module, input_ids: torch.Tensor,
                     plan: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Accumulate the gradient of sum_i w_i * loss_i into .grad; returns the per-granularity
    losses (len(plan),).

    One forward+backward per granularity rather than one backward through a graph holding all of
    them: the same gradient (up to float summation order), but each width's activations are
    freed before the next width runs, so `joint` costs no more than its single-width steps. Under
    DDP every backward but the last runs in `no_sync()`, so each rank all-reduces once per step
    however many granularities its plan holds (ranks at different runtime tiers may hold
    different numbers)."""
    ddp = isinstance(objective, nn.parallel.DistributedDataParallel)
    losses = []
    for i, item in enumerate(plan):
        last = i == len(plan) - 1
        with objective.no_sync() if ddp and not last else contextlib.nullcontext():
            loss, per_tier = objective(input_ids, [item])
            loss.backward()
        losses.append(per_tier)
    return torch.cat(losses)


@torch.no_grad()
def evaluate_tiers(model: MatFormerLM, windows: torch.Tensor, tiers: Sequence[int],
                   batch_size: int) -> dict[int, float]:
    """Mean held-out loss of each tier over `windows` (N, T) (token-weighted: equal-length windows)."""
    out = {}
    for t in tiers:
        with model.at_width(tier=t):
            total = 0.0
            for i in range(0, len(windows), batch_size):
                chunk = windows[i:i + batch_size]
                total += float(model.loss(chunk)) * len(chunk)
        out[t] = total / len(windows)
    return out


# ---- distributed set-up ----------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_dist(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world,
                                             device_id=dev if dev.type == "cuda" else None)
    return _Dist(rank, world, local, dev)


def _broadcast_str(text: str | None, dist: _Dist) -> str:
    if dist.world == 1:
        assert text is not None
        return text
    obj = [text]
    torch.distributed.broadcast_object_list(obj, src=0)
    assert obj[0] is not None
    return obj[0]


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under out/checkpoints, oldest first. A folder is complete once it has
    its name (save_model writes into a temporary folder and renames it)."""
    root = Path(out) / "checkpoints"
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir() and (entry / STATE_FILE).is_file() and (entry / "config.json").is_file():
                found.append((int(m.group(1)), entry))
    return sorted(found)


def _state_bytes(opt: NestedAdamW, meta: dict[str, Any]) -> bytes:
    from safetensors.torch import save

    tensors = opt.state_tensors()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return save(tensors, metadata={"format": "pt", "matformer_training": json.dumps(meta)})


def _read_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = ckpt / STATE_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("matformer_training", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: cannot read the training state ({e})") from None
    if not isinstance(meta, dict) or not {"step", "data_position"} <= meta.keys():
        raise CheckpointError(f"{path}: no training metadata (not written by matformer train?)")
    return tensors, meta


def _check_resume(cfg: TrainConfig, ckpt: Path, model_cfg_now: dict[str, Any] | None,
                  world: int, meta: dict[str, Any]) -> None:
    try:
        saved = json.loads((ckpt / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / CONFIG_FILE}: cannot read ({e})") from None
    now = cfg.to_dict()
    diff = [k for k in now if k not in TrainConfig._RESUMABLE and saved.get(k) != now[k]]
    if diff:
        desc = ", ".join(f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in diff[:4])
        raise CheckpointError(f"{ckpt}: this run's settings differ from the checkpoint's ({desc}); "
                              f"resume with the same settings, or train into a new --out")
    if int(meta["step"]) > cfg.steps:
        # Resuming would write the weights of a longer run as this run's final model.
        raise CheckpointError(f"{ckpt}: the checkpoint is at step {meta['step']}, past --steps "
                              f"{cfg.steps}; resume with --steps {meta['step']} or more")
    if meta.get("world_size", 1) != world:
        raise CheckpointError(f"{ckpt}: saved by {meta.get('world_size')} process(es), resumed "
                              f"with {world}; resume with the same number of processes")
    if model_cfg_now is not None:
        saved_model = MatFormerConfig.from_json_file(ckpt / "config.json").to_dict()
        mdiff = [k for k in model_cfg_now if saved_model.get(k) != model_cfg_now[k]
                 and k not in ("dtype", "torch_dtype")]
        if mdiff:
            desc = ", ".join(f"{k}: saved {saved_model.get(k)!r}, now {model_cfg_now[k]!r}"
                             for k in mdiff[:4])
            raise CheckpointError(f"{ckpt}: holds another model ({desc}); resume with the same "
                                  f"--preset, or train into a new --out")


# ---- the run ---------------------------------------------------------------------------------


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _table(model_cfg: MatFormerConfig, losses: dict[int, float]) -> str:
    rows = ["tier  width  non-emb params  val loss  perplexity"]
    for t in sorted(losses):
        w = model_cfg.base >> t
        ne = parameter_counts(model_cfg, [w] * model_cfg.num_hidden_layers)["non_embedding"]
        rows.append(f"{t:>4}  {w:>5}  {ne:>14,}  {losses[t]:>8.4f}  {perplexity(losses[t]):>10.2f}")
    return "\n".join(rows)


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) a MatFormer as `cfg` says; returns the final per-tier validation losses."""
    dist = _setup_dist(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        if dist.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: _Dist) -> TrainResult:
    out = Path(cfg.out)

    def log(msg: str) -> None:
        if dist.main and not cfg.quiet:
            print(msg, flush=True)

    validate(cfg, world=dist.world)
    if cfg.data is not None:  # recorded absolute: evaluation may run from another folder
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).absolute()))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else D.default_cache_dir()

    # -- where we start: fresh (empty out) or the newest complete checkpoint ------------------
    resume_from: Path | None = None
    if cfg.resume:
        found = checkpoints(out)
        if not found:
            raise CheckpointError(f"{out}: no complete checkpoint to resume from "
                                  f"(expected {out}/checkpoints/step-*/); run without --resume")
        resume_from = found[-1][1]
    elif checkpoints(out) or (out / "config.json").exists():
        raise CheckpointError(f"{out}: already holds a training run; pass --resume to continue it, "
                              f"or choose another --out (nothing was changed)")

    # -- data and tokenizer ----------------------------------------------------------------------
    t0 = time.time()
    texts = D.load_texts(cfg.data, max_bytes=cfg.max_corpus_bytes)
    train_texts, val_texts = D.split_texts(texts, cfg.val_fraction, cfg.split_seed)
    if resume_from is not None:
        tok = D.load_tokenizer(resume_from)
    else:
        tok_json = D.train_tokenizer(train_texts, cfg.vocab_size).to_str() if dist.main else None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(_broadcast_str(tok_json, dist))
    train_tokens = D.tokenize(tok, train_texts, cache_dir)
    val_tokens = D.tokenize(tok, val_texts, cache_dir)
    log(f"data: {cfg.data or 'default corpus (Python standard library)'}: {len(train_texts)} train "
        f"/ {len(val_texts)} held-out documents, {len(train_tokens):,} / {len(val_tokens):,} tokens, "
        f"vocab {tok.get_vocab_size()} ({time.time() - t0:.1f}s)")

    mcfg = model_config(cfg, tok.get_vocab_size())
    base = mcfg.base
    validate(cfg, base=base, world=dist.world)

    meta: dict[str, Any] = {}
    state_tensors: dict[str, torch.Tensor] = {}
    if resume_from is not None:
        state_tensors, meta = _read_state(resume_from)
        _check_resume(cfg, resume_from, mcfg.to_dict(), dist.world, meta)

    # -- model, optimizer, data order ----------------------------------------------------------
    model = MatFormerLM(mcfg)
    model.reset_parameters(seed=cfg.seed)
    if resume_from is not None:
        from .io.checkpoint import load_state_dict

        sd = load_state_dict(resume_from)
        model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=not mcfg.tie_word_embeddings)
        del sd
    model.to(dist.device)
    opt = NestedAdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
    sampler = D.WindowSampler(train_tokens, cfg.seq_len, cfg.seed)
    start = 0
    history: list[dict[str, Any]] = []
    tokens_seen = 0
    if resume_from is not None:
        opt.load_state_tensors(state_tensors, str(resume_from / STATE_FILE))
        sampler.load_state(meta["data_position"])
        torch.set_rng_state(state_tensors["rng.torch"])
        if "rng.cuda" in state_tensors and dist.device.type == "cuda":
            torch.cuda.set_rng_state(state_tensors["rng.cuda"])
        start = int(meta["step"])
        history = [{"step": h["step"], "val_loss": {int(k): v for k, v in h["val_loss"].items()}}
                   for h in meta.get("history", [])]
        tokens_seen = int(meta.get("tokens_seen", 0))
        log(f"resumed from {resume_from} at step {start}")
    else:
        torch.manual_seed(cfg.seed)

    objective: nn.Module = Objective(model)
    if dist.world > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    rts = runtime_tiers(cfg, dist.world)
    trained = sorted({t for r in range(dist.world) for t in rank_choices(cfg, base, rts[r])[0]})
    val_windows = torch.from_numpy(D.eval_windows(val_tokens, cfg.seq_len, cfg.eval_windows)).to(dist.device)
    counts = parameter_counts(mcfg)
    log(f"model: preset {cfg.preset}, {mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, "
        f"FFN base {base}; {counts['non_embedding']:,} non-embedding + {counts['embedding']:,} "
        f"embedding parameters; objective {cfg.objective}, tiers {trained}"
        + (f", runtime tier(s) {rts}" if any(rts) else "") + f", {dist.world} process(es)")

    def save(step: int) -> None:
        if not dist.main:
            return
        state_meta = {"step": step, "data_position": sampler.state(), "tokens_seen": tokens_seen,
                      "world_size": dist.world, "lr": lr_at(cfg, max(step - 1, 0)),
                      "history": [{"step": h["step"], "val_loss": {str(k): v for k, v in h["val_loss"].items()}}
                                  for h in history]}
        extra = {**D.tokenizer_files(tok, cfg.seq_len),
                 CONFIG_FILE: (json.dumps(cfg.to_dict(), indent=2) + "\n").encode(),
                 STATE_FILE: _state_bytes(opt, state_meta)}
        from .io.checkpoint import save_model

        path = save_model(model, out / "checkpoints" / f"step-{step:07d}", extra_files=extra)
        for _, old in checkpoints(out)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log(f"saved {path}")

    def run_eval(step: int) -> None:
        if not dist.main:
            return
        model.eval()
        losses = evaluate_tiers(model, val_windows, trained, cfg.batch_size)
        model.train()
        history.append({"step": step, "val_loss": losses})
        log(f"eval step {step}: val loss " + "  ".join(f"t{t} {v:.4f}" for t, v in losses.items()))
        _append_log(out, {"step": step, "val_loss": {str(k): v for k, v in losses.items()}})

    if dist.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"{out}: cannot create the output folder ({e.strerror or e}); "
                                  f"choose another --out") from None
        _trim_log(out, start)  # a killed run may have logged steps past its last checkpoint
    tokens_per_step = dist.world * cfg.batch_size * cfg.seq_len
    run_t0 = time.time()
    run_tokens = 0
    model.train()
    for step in range(start, cfg.steps):
        windows = sampler.next(dist.world * cfg.batch_size)  # (world*B, T), same on every rank
        x = torch.from_numpy(windows[dist.rank * cfg.batch_size:(dist.rank + 1) * cfg.batch_size])
        x = x.to(dist.device, non_blocking=True)
        plan = step_plan(cfg, base, step, dist.rank, dist.world)
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        per_tier = forward_backward(objective, x, plan)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step(update_extent(cfg, base, step, dist.world))
        opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        run_tokens += tokens_per_step

        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logged = _gather_losses(plan, per_tier, trained, dist)
            if dist.main:
                el = time.time() - run_t0
                tps = run_tokens / max(el, 1e-9)
                eta = el / (step + 1 - start) * (cfg.steps - step - 1)
                log(f"step {step + 1:>{len(str(cfg.steps))}}/{cfg.steps} | loss "
                    + " ".join(f"t{t} {v:.4f}" for t, v in logged.items())
                    + f" | lr {lr:.2e} | {tps:,.0f} tok/s | ETA {_fmt_time(eta)}")
                _append_log(out, {"step": step + 1, "loss": {str(k): v for k, v in logged.items()},
                                  "lr": lr, "tokens_per_s": tps})
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            run_eval(done)
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(done)
    elapsed = time.time() - run_t0

    final = history[-1]["val_loss"] if history and history[-1]["step"] == cfg.steps else {}
    if dist.main and not final:  # resumed at the very end: evaluate once for the table
        model.eval()
        final = evaluate_tiers(model, val_windows, trained, cfg.batch_size)
    table = _table(mcfg, final) if dist.main else ""
    if dist.main:
        from .io.checkpoint import save_model

        summary = {"steps": cfg.steps, "final_val_loss": {str(k): v for k, v in final.items()},
                   "history": [{"step": h["step"], "val_loss": {str(k): v for k, v in h["val_loss"].items()}}
                               for h in history],
                   "train_tokens": tokens_seen, "tokens_per_second": run_tokens / max(elapsed, 1e-9)}
        save_model(model, out, extra_files={
            **D.tokenizer_files(tok, cfg.seq_len),
            CONFIG_FILE: (json.dumps(cfg.to_dict(), indent=2) + "\n").encode(),
            "train_summary.json": (json.dumps(summary, indent=2) + "\n").encode()})
        log(f"\nfinal model: {out}  ({tokens_seen:,} training tokens, "
            f"{run_tokens / max(elapsed, 1e-9):,.0f} tok/s this session)\n{table}")
        if 0 not in trained:
            # The checkpoint stores full width (config says tier 0, the truth about the tensors),
            # but the neurons past the widest trained tier were never trained: say how to get a
            # checkpoint that runs the trained width by default.
            t = min(trained)
            log(f"note: only tiers {trained} were trained; the stored full width holds untrained "
                f"neurons past width {base >> t}. Load with tier={t}, or cut a tier-{t} checkpoint: "
                f"matformer slice {out} -o {out}-tier{t} --tier {t}")
    if dist.world > 1:
        torch.distributed.barrier()
    return TrainResult(out=out, steps=cfg.steps, final_val_loss=final, history=history,
                       train_tokens=tokens_seen, tokens_per_second=run_tokens / max(elapsed, 1e-9),
                       elapsed_s=elapsed, table=table)


def _gather_losses(plan, per_tier: torch.Tensor, trained: list[int], dist: _Dist) -> dict[int, float]:
    """This step's loss of each tier trained by any rank (mean over the ranks that trained it)."""
    acc = torch.zeros(2, len(trained), dtype=torch.float64)  # (sum, count) per tier
    for (t, _), v in zip(plan, per_tier.tolist(), strict=False):
        acc[0, trained.index(t)] += v
        acc[1, trained.index(t)] += 1
    if dist.world > 1:
        acc = acc.to(dist.device)
        torch.distributed.all_reduce(acc)
        acc = acc.cpu()
    return {t: float(acc[0, i] / acc[1, i]) for i, t in enumerate(trained) if acc[1, i] > 0}


def _append_log(out: Path, record: dict[str, Any]) -> None:
    try:
        with open(out / "train_log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        print(f"warning: cannot write {out / 'train_log.jsonl'} ({e})", file=sys.stderr)


def _trim_log(out: Path, step: int) -> None:
    """Keep the log records of steps <= `step` (all of them gone for a fresh run)."""
    path = out / "train_log.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
