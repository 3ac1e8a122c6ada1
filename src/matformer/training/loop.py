"""The training loop: `train(TrainConfig(...)) -> TrainResult`.

`prepare` builds the run (or restores it from a checkpoint); each step (`step.train_step`) runs
this rank's micro-batches through the step's plan, clips, and lets `NestedAdamW` update the
prefix some rank used; every `log_every` / `eval_every` / `save_every` steps it logs (losses,
tokens/s, MFU, peak memory), evaluates the held-out windows (rank 0; every rank under FSDP2,
whose forward is collective) and writes a checkpoint. The final model goes to `out/`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matformer.errors import ConfigError
from matformer.models.registry import CAUSAL_LM, IMAGE_CLASSIFICATION, family
from matformer.training import distributed, divergence, sharded, state
from matformer.training.evaluation import evaluate_tiers, loss_table
from matformer.training.metrics import TensorBoard, Throughput
from matformer.training.optimizer import lr_at, set_lr
from matformer.training.points import tier_of_key
from matformer.training.prepare import Run, prepare
from matformer.training.report import step_losses
from matformer.training.settings import TrainConfig
from matformer.training.step import train_step
from matformer.training.vision import VisionTrainResult, train_vit
from matformer.training.weights import write_model


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


def train(cfg: TrainConfig) -> TrainResult | VisionTrainResult:
    """Train (or resume) a MatFormer as `cfg` says; returns the final per-tier validation losses.
    The loop is the one for the task of the family `cfg.arch` names (models.registry): a text
    decoder here, an image classifier (MatViT) in training.vision."""
    task = family(cfg.arch).task
    if task not in _LOOPS:
        raise ConfigError(f"arch {cfg.arch!r}: matformer cannot train a {task} model")
    return _LOOPS[task](cfg)


def _train_lm(cfg: TrainConfig) -> TrainResult:
    return distributed.run_in_group(cfg.device, lambda dist: _loop(prepare(cfg, dist)))


_LOOPS: dict[str, Callable[[TrainConfig], Any]] = {CAUSAL_LM: _train_lm,
                                                   IMAGE_CLASSIFICATION: train_vit}
"""The training loop of each model task."""


def _loop(run: Run) -> TrainResult:
    cfg, dist = run.cfg, run.dist
    run.report.start(run.start)
    tokens_per_step = dist.world * cfg.batch_size * cfg.seq_len * cfg.grad_accum
    speed = Throughput(run.model_cfg, cfg, dist)
    tb = TensorBoard(run.out, cfg.tensorboard and dist.main)
    t0, run_tokens, lr = time.time(), 0, lr_at(cfg, max(run.start - 1, 0))
    run.model.train()
    for step in range(run.start, cfg.steps):
        lr = set_lr(run.opt, lr_at(cfg, step))
        plan, per_tier, _ = train_step(run, step)
        run.tokens_seen += tokens_per_step
        run_tokens += tokens_per_step
        speed.add(step)

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            losses = step_losses(plan, per_tier, run.trained, dist)  # a collective: every rank
            elapsed = time.time() - t0
            extra = speed.summary(elapsed)
            run.report.step(done, cfg.steps, losses, lr, run_tokens / max(elapsed, 1e-9),
                            elapsed / (done - run.start) * (cfg.steps - done), extra)
            tb.scalars(done, {**{f"loss/tier{t}": v for t, v in losses.items()}, "lr": lr,
                              "tokens_per_s": run_tokens / max(elapsed, 1e-9), **extra})
        if done % cfg.eval_every == 0 or done == cfg.steps:
            _evaluate(run, done)
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save(run, done, lr)
    tb.close()
    if run.batches is not None:
        run.batches.close()
    return _finish(run, run_tokens, time.time() - t0)


def _evaluate(run: Run, step: int) -> None:
    if run.dist.main or run.cfg.fsdp:  # FSDP2: every rank joins the forward's all-gathers
        losses = evaluate_tiers(run.model, run.val_windows, run.trained, run.cfg.batch_size)
        run.history.append({"step": step, "val_loss": losses})  # every evaluating rank: _finish
        run.report.eval(step, losses)  # rank 0 prints


def _save(run: Run, step: int, lr: float) -> None:
    cfg, dist = run.cfg, run.dist
    divergence.check_weights(run, step)  # NaN weights are never saved, nothing is rotated out
    meta = run.training_state(step, lr)
    meta.extra["loss_scale"] = run.scaler.state()
    files = state.run_files(cfg, run.tok, run.model_cfg.max_position_embeddings)
    dtype = cfg.save_dtype or cfg.dtype
    if cfg.fsdp:  # every rank: its shards of the state, and its part of the model's gathers
        folder = state.step_folder(run.out, step)
        tmp = sharded.save_state(folder.parent, folder.name, run.model, run.opt, dist)
        write_model(run.model, folder, files, dtype, dist, sharded=True)
        if dist.main:
            sharded.finish(tmp, folder, meta.to_meta())
            state.rotate(run.out, cfg.keep_checkpoints)
        distributed.barrier(dist)
        path = folder
    elif dist.main:
        blob = state.state_bytes(run.opt, meta, run.model if dtype != "float32" else None)
        path = state.save_checkpoint(run.out, run.model, files, blob, step, cfg.keep_checkpoints,
                                     dtype)
    else:
        return
    run.report.say(f"saved {path}")


def _finish(run: Run, run_tokens: int, elapsed: float) -> TrainResult:
    """Rank 0 writes the final model (with train_summary.json) to out/ and prints the table."""
    cfg, dist = run.cfg, run.dist
    tps = run_tokens / max(elapsed, 1e-9)
    final: dict[int, float] = {}
    table = ""
    divergence.check_weights(run, cfg.steps)
    if dist.main or cfg.fsdp:  # under FSDP2 the forward and the model's gathers are collective
        last = run.history[-1] if run.history else None
        final = last["val_loss"] if last and last["step"] == cfg.steps else \
            evaluate_tiers(run.model, run.val_windows, run.trained, cfg.batch_size)
        summary = {"steps": cfg.steps, "final_val_loss": {str(k): v for k, v in final.items()},
                   "history": state.history_json(run.history), "train_tokens": run.tokens_seen,
                   "tokens_per_second": tps}
        files = state.run_files(cfg, run.tok, run.model_cfg.max_position_embeddings)
        state.save_final(run.out, run.model, files, summary,
                         cfg.save_dtype or cfg.dtype, dist, cfg.fsdp)
    if dist.main:
        table = loss_table(run.model_cfg, final)
        run.report.say(f"\nfinal model: {run.out}  ({run.tokens_seen:,} training tokens, "
                       f"{tps:,.0f} tok/s this session)\n{table}")
        _note_untrained_tail(run)
    distributed.barrier(dist)
    return TrainResult(out=run.out, steps=cfg.steps, final_val_loss=final, history=run.history,
                       train_tokens=run.tokens_seen, tokens_per_second=tps, elapsed_s=elapsed,
                       table=table)


def _note_untrained_tail(run: Run) -> None:
    """The checkpoint stores full width (config says tier 0, the truth about the tensors); if tier
    0 was never trained, the neurons past the widest trained tier are untrained: say how to get a
    checkpoint that runs the trained width by default."""
    tiers = sorted({tier_of_key(k) for k in run.trained})
    if 0 in tiers:
        return
    t, out = tiers[0], run.out
    run.report.say(f"note: only tiers {tiers} were trained; the stored full width holds "
                   f"untrained neurons past width {run.base >> t}. Load with tier={t}, or cut a "
                   f"tier-{t} checkpoint: matformer slice {out} -o {out}-tier{t} --tier {t}")
