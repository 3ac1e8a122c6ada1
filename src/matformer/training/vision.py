"""MatViT training: `matformer train --arch vit` (images and labels instead of token windows).

The same run as the language model's (`loop`), sharing its parts: the objectives and their step
plans (`sample` / `joint` / `single`, runtime `--tier`, `--trained-tiers`), `NestedAdamW` and the
lr schedule, DDP under torchrun, checkpoints in OUT/checkpoints/step-*/ with bit-exact resume,
and the final model in OUT. What differs:
- data: `--data digits` (default; scikit-learn's bundled 8x8 digits) or an image folder, split
  once by `--split-seed` into train / held-out (`--val-fraction`, default 0.2 for images),
  normalised with the training part's per-channel statistics, which travel with every saved
  folder as `preprocessor_config.json` (transformers' `ViTImageProcessor` keys);
- model: a ViT preset (`--preset debug|tiny|small|base`) or `--model-config` (a ViT
  config.json), with `--hidden-size`, `--intermediate-size`, `--num-layers`, `--num-heads`,
  `--head-dim` overrides; the labels are the data's classes;
- a step is `--batch-size` images; the held-out measure is the cross-entropy (`val_loss`, as for
  the LM) and the top-1 accuracy of each trained tier.
The step itself is the LM's `step.train_step` (gradient accumulation, `--dtype` autocast and
loss scaling, clipping, the non-finite guard). Settings that only exist for the language model
(distillation, warm start, FSDP2, compile, activation checkpointing, max positions, KV heads
other than the heads) are refused, and so is training nested heads (`--nest-heads`,
`--kv-heads`): a MatViT's heads nest at run time and in slices, but its training nests the FFN
only. The images live in memory, so `--data-workers` is unused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from matformer.data.images import (
    PREPROCESSOR_FILE,
    BatchSampler,
    ImageSplit,
    heldout_fraction,
    load_split,
    preprocessor_json,
)
from matformer.errors import ConfigError
from matformer.io.checkpoint import load_state_dict
from matformer.io.outputs import check_output_folder
from matformer.io.source import read_config_file
from matformer.io.swap import check_save_target
from matformer.models.vit.config import MatViTConfig, parameter_counts
from matformer.models.vit.model import MatViT
from matformer.training import distributed, divergence, state
from matformer.training.distributed import Dist
from matformer.training.optimizer import build_optimizer, lr_at, set_lr
from matformer.training.precision import LossScaler
from matformer.training.prepare import RunPaths
from matformer.training.report import Reporter, fmt_time, step_losses
from matformer.training.settings import (
    TrainConfig,
    all_trained_tiers,
    inputs_of,
    resolve_defaults,
    validate,
)
from matformer.training.step import train_step

ARCH = "vit"
# TrainConfig field -> MatViTConfig key.
SHAPE_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
              "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "head_dim": "head_dim"}
# Settings of the language model's run that a MatViT run does not have (value when unset).
_LM_ONLY = {"distill": None, "init_from": None, "fsdp": False, "compile": None,
            "activation_checkpointing": False, "max_positions": None,
            # MatViT heads nest at run time and in slices, but are not trained as granularities yet
            "nest_heads": False, "kv_heads": None, "rank_kv_heads": None}


# ---- settings ----------------------------------------------------------------------------------

def check_settings(cfg: TrainConfig) -> None:
    """ConfigErrors for settings a MatViT run cannot honour (before anything is read or written)."""
    for key, unset in _LM_ONLY.items():
        if getattr(cfg, key, unset) != unset:
            raise ConfigError(f"--{key.replace('_', '-')} is not supported with --arch vit")
    if cfg.num_kv_heads is not None and cfg.num_kv_heads != (cfg.num_heads or cfg.num_kv_heads):
        raise ConfigError("--num-kv-heads: ViT attention is multi-head (its KV heads are its "
                          "heads); use --num-heads")


def vit_model_config(cfg: TrainConfig, class_names: list[str] | None = None) -> MatViTConfig:
    """The model the settings describe (preset or --model-config, overrides applied), validated
    as a config.json is; its labels are `class_names` (the data's classes) when given."""
    if cfg.model_config is not None:
        d = read_config_file(cfg.model_config, MatViTConfig).to_dict()
        what = cfg.model_config
    else:
        d = MatViTConfig.from_preset(cfg.preset).to_dict()
        what = f"the ViT {cfg.preset!r} preset"
    overrides = {key: getattr(cfg, f) for f, key in SHAPE_KEYS.items() if getattr(cfg, f) is not None}
    if cfg.num_kv_heads is not None:
        overrides["num_attention_heads"] = cfg.num_kv_heads
    if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & overrides.keys():
        d.pop("head_dim", None)  # derived again from the new hidden size / heads
    if "intermediate_size" in overrides:
        d["matformer_base_intermediate_size"] = overrides["intermediate_size"]
    if "num_attention_heads" in overrides:
        d["matformer_base_num_key_value_heads"] = overrides["num_attention_heads"]
    d.update(overrides, torch_dtype="float32")
    if class_names is not None:
        d.pop("num_labels", None)
        d.pop("label2id", None)
        d["id2label"] = dict(enumerate(class_names))
    d.pop("matformer_tier", None)
    mc = MatViTConfig.from_dict(d, source=what)
    if mc.layer_widths != [mc.base] * mc.num_hidden_layers or \
            mc.layer_kv_heads != [mc.base_kv_heads] * mc.num_hidden_layers:
        raise ConfigError(f"{what}: stores narrower layers than its base; training builds the full "
                          f"model (drop the narrower sizes)")
    return mc


# ---- objective and evaluation --------------------------------------------------------------------

class VisionObjective(nn.Module):
    """forward((pixel_values, labels), plan [(tier, weight)]) -> (sum_i w_i * loss_i, losses)"""

    def __init__(self, model: MatViT) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor], plan, teacher_logits=None):
        x, y = batch
        total: torch.Tensor | None = None
        losses = []
        for tier, w in plan:
            with self.model.at_width(tier=tier):
                loss = self.model.loss(x, y)
            losses.append(loss.detach())
            total = loss * w if total is None else total + loss * w
        assert total is not None
        return total, torch.stack(losses)


@torch.no_grad()
def evaluate_tiers(model: MatViT, images: torch.Tensor, labels: torch.Tensor, tiers: list[int],
                   batch_size: int = 256) -> dict[int, dict[str, float]]:
    """Held-out cross-entropy ("loss") and top-1 ("top1") of each tier."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for t in tiers:
            with model.at_width(tier=t):
                logits = torch.cat([model(images[i:i + batch_size]).float()
                                    for i in range(0, len(images), batch_size)])
            out[t] = {"loss": float(F.cross_entropy(logits, labels)),
                      "top1": float((logits.argmax(1) == labels).float().mean())}
    finally:
        model.train(was_training)
    return out


def accuracy_table(model_cfg: MatViTConfig, scores: dict[int, dict[str, float]]) -> str:
    rows = ["tier  width  non-emb params  val loss   top-1"]
    for t in sorted(scores):
        w = model_cfg.base >> t
        ne = parameter_counts(model_cfg, [w] * model_cfg.num_hidden_layers)["non_embedding"]
        rows.append(f"{t:>4}  {w:>5}  {ne:>14,}  {scores[t]['loss']:>8.4f}  {scores[t]['top1']:>6.2%}")
    return "\n".join(rows)


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class VisionTrainResult:
    out: Path
    steps: int
    final_val_loss: dict[int, float]
    """Held-out cross-entropy of every trained tier at the end (rank 0; empty on other ranks)."""
    final_top1: dict[int, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_images: int = 0
    images_per_second: float = 0.0
    elapsed_s: float = 0.0
    table: str = ""


@dataclass
class VisionRun(RunPaths):
    cfg: TrainConfig
    dist: Dist
    report: Reporter
    model_cfg: MatViTConfig
    model: MatViT
    objective: nn.Module
    opt: Any
    sampler: BatchSampler
    split: ImageSplit
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    trained: list[int]
    scaler: LossScaler = field(default_factory=lambda: LossScaler(False))
    start: int = 0
    images_seen: int = 0
    history: state.History = field(default_factory=list)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch (every rank draws the same order)."""
        B, rank = self.cfg.batch_size, self.dist.rank
        idx = torch.from_numpy(self.sampler.next(self.dist.world * B)[rank * B:(rank + 1) * B])
        return self.train_x[idx], self.train_y[idx]

    def training_state(self, step: int, lr: float) -> state.TrainingState:
        # tokens_seen counts images for a MatViT (the state file's one counter of data seen).
        return state.TrainingState(step=step, data_position=self.sampler.state(),
                                   tokens_seen=self.images_seen, world_size=self.dist.world, lr=lr,
                                   history=self.history)

    def files(self) -> dict[str, bytes]:
        """What every saved folder carries beside the weights: settings and preprocessing."""
        return {state.CONFIG_FILE: (json.dumps(self.cfg.to_dict(), indent=2) + "\n").encode(),
                PREPROCESSOR_FILE: preprocessor_json(self.model_cfg.image_size,
                                                     self.split.normalisation).encode()}


def prepare_vit(cfg: TrainConfig, dist: Dist) -> VisionRun:
    cfg = resolve_defaults(cfg)[0]  # lr and warm-up from scratch (a MatViT has no --init-from)
    check_settings(cfg)
    if cfg.data not in (None, "digits"):  # recorded absolute: evaluation may run elsewhere
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).absolute()))
    check_output_folder(cfg.out, protect=inputs_of(cfg), what="--out folder")
    report = Reporter(Path(cfg.out), dist.main, cfg.quiet)
    if dist.main:  # a save that would fail is known before step 1
        check_save_target(cfg.out)
    ckpt = state.resume_checkpoint(cfg)
    shape = vit_model_config(cfg)  # image size and channels to load the data at
    split = load_split(cfg.data, shape.image_size, shape.num_channels,
                       heldout_fraction=heldout_fraction(cfg.val_fraction), seed=cfg.split_seed)
    mcfg = vit_model_config(cfg, split.train.class_names)
    validate(cfg, base=mcfg.base, world=dist.world)
    model = MatViT(mcfg)
    model.reset_parameters(seed=cfg.seed)
    resumed = tensors = None
    if ckpt is not None:
        tensors, resumed = state.read_state(ckpt)
        state.check_resume(cfg, ckpt, mcfg, resumed)
        model.load_state_dict({k: v.clone() for k, v in load_state_dict(ckpt).items()})
    model.to(dist.device)
    dev = dist.device
    trained = all_trained_tiers(cfg, mcfg.base, dist.world)
    run = VisionRun(cfg=cfg, dist=dist, report=report, model_cfg=mcfg, model=model,
                    objective=distributed.wrap(VisionObjective(model), dist),
                    opt=build_optimizer(model, cfg, max(trained)),
                    sampler=BatchSampler(len(split.train), cfg.seed),
                    split=split,
                    train_x=torch.from_numpy(split.train.images).to(dev),
                    train_y=torch.from_numpy(split.train.labels).to(dev),
                    val_x=torch.from_numpy(split.heldout.images).to(dev),
                    val_y=torch.from_numpy(split.heldout.labels).to(dev),
                    trained=trained)
    run.scaler = LossScaler(cfg.dtype == "float16")
    if ckpt is not None and resumed is not None and tensors is not None:
        state.restore(tensors, ckpt, run.opt, run.sampler, resumed, dev)
        run.scaler.load_state(resumed.extra.get("loss_scale", {}))
        run.start, run.images_seen, run.history = resumed.step, resumed.tokens_seen, resumed.history
        report.say(f"resumed from {ckpt} at step {run.start}")
    else:
        torch.manual_seed(cfg.seed)
    _describe(run)
    return run


def _describe(run: VisionRun) -> None:
    cfg, mcfg, split = run.cfg, run.model_cfg, run.split
    counts = parameter_counts(mcfg)
    run.report.say(
        f"data: {cfg.data or 'digits'}: {len(split.train)} train / {len(split.heldout)} held-out "
        f"images, {len(split.train.class_names)} classes, {mcfg.num_channels}x{mcfg.image_size}x"
        f"{mcfg.image_size}")
    run.report.say(
        f"model: MatViT preset {cfg.preset if cfg.model_config is None else cfg.model_config}, "
        f"{mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, {mcfg.base_kv_heads} heads, "
        f"FFN base {mcfg.base}, patch {mcfg.patch_size}; {counts['non_embedding']:,} non-embedding "
        f"parameters; objective {cfg.objective}, tiers {run.trained}, {run.dist.world} process(es)")


def train_vit(cfg: TrainConfig) -> VisionTrainResult:
    """Train (or resume) a MatViT as `cfg` says; returns the final per-tier held-out scores."""
    return distributed.run_in_group(cfg.device, lambda dist: _loop(prepare_vit(cfg, dist)))


def _loop(run: VisionRun) -> VisionTrainResult:
    cfg, dist = run.cfg, run.dist
    run.report.start(run.start)
    per_step = dist.world * cfg.batch_size * cfg.grad_accum
    t0, seen, lr = time.time(), 0, lr_at(cfg, max(run.start - 1, 0))
    run.model.train()
    for step in range(run.start, cfg.steps):
        lr = set_lr(run.opt, lr_at(cfg, step))
        plan, per_tier, _ = train_step(run, step)  # the LM's step: plan, accumulation, guard
        run.images_seen += per_step
        seen += per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            losses = step_losses(plan, per_tier, run.trained, dist)  # a collective: every rank
            elapsed = time.time() - t0
            _log_step(run, done, losses, lr, seen / max(elapsed, 1e-9),
                      elapsed / (done - run.start) * (cfg.steps - done))
        if done % cfg.eval_every == 0 or done == cfg.steps:
            _evaluate(run, done)
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save(run, done, lr)
    return _finish(run, seen, time.time() - t0)


def _log_step(run: VisionRun, step: int, losses: dict[int, float], lr: float, images_per_s: float,
              eta_s: float) -> None:
    steps = run.cfg.steps
    run.report.say(f"step {step:>{len(str(steps))}}/{steps} | loss "
                   + " ".join(f"t{t} {v:.4f}" for t, v in losses.items())
                   + f" | lr {lr:.2e} | {images_per_s:,.0f} img/s | ETA {fmt_time(eta_s)}")
    run.report.record({"step": step, "loss": {str(k): v for k, v in losses.items()}, "lr": lr,
                       "images_per_s": images_per_s})


def _evaluate(run: VisionRun, step: int) -> dict[int, dict[str, float]] | None:
    if not run.dist.main:
        return None
    scores = evaluate_tiers(run.model, run.val_x, run.val_y, run.trained)
    run.history.append({"step": step, "val_loss": {t: s["loss"] for t, s in scores.items()}})
    run.report.say(f"eval step {step}: " + "  ".join(
        f"t{t} loss {s['loss']:.4f} top-1 {s['top1']:.2%}" for t, s in scores.items()))
    run.report.record({"step": step, "val_loss": {str(t): s["loss"] for t, s in scores.items()},
                       "val_top1": {str(t): s["top1"] for t, s in scores.items()}})
    return scores


def _save(run: VisionRun, step: int, lr: float) -> None:
    divergence.check_weights(run, step)  # NaN weights are never saved, nothing is rotated out
    if run.dist.main:
        meta = run.training_state(step, lr)
        meta.extra["loss_scale"] = run.scaler.state()
        dtype = run.cfg.save_dtype or run.cfg.dtype
        blob = state.state_bytes(run.opt, meta, run.model if dtype != "float32" else None)
        path = state.save_checkpoint(run.out, run.model, run.files(), blob, step,
                                     run.cfg.keep_checkpoints, dtype)
        run.report.say(f"saved {path}")


def _finish(run: VisionRun, seen: int, elapsed: float) -> VisionTrainResult:
    """Rank 0 writes the final model (with train_summary.json) to out/ and prints the table."""
    cfg, dist = run.cfg, run.dist
    ips = seen / max(elapsed, 1e-9)
    scores: dict[int, dict[str, float]] = {}
    table = ""
    divergence.check_weights(run, cfg.steps)
    if dist.main:
        scores = evaluate_tiers(run.model, run.val_x, run.val_y, run.trained)
        table = accuracy_table(run.model_cfg, scores)
        summary = {"steps": cfg.steps, "arch": ARCH,
                   "final_val_loss": {str(t): s["loss"] for t, s in scores.items()},
                   "final_top1": {str(t): s["top1"] for t, s in scores.items()},
                   "history": state.history_json(run.history), "train_images": run.images_seen,
                   "images_per_second": ips}
        state.save_final(run.out, run.model, run.files(), summary, cfg.save_dtype or cfg.dtype)
        run.report.say(f"\nfinal model: {run.out}  ({run.images_seen:,} training images, "
                       f"{ips:,.0f} images/s this session)\n{table}")
    distributed.barrier(dist)
    return VisionTrainResult(out=run.out, steps=cfg.steps,
                             final_val_loss={t: s["loss"] for t, s in scores.items()},
                             final_top1={t: s["top1"] for t, s in scores.items()},
                             history=run.history, train_images=run.images_seen,
                             images_per_second=ips, elapsed_s=elapsed, table=table)
