"""Everything a run needs before its first step, as one `Run`: settings checked, data and
tokenizer, model, optimizer, data order, held-out windows, and (when resuming) the state a
checkpoint left. Nothing is written here: bad input fails before the output folder is touched.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from matformer.data import text as D
from matformer.data import token_files
from matformer.data.tokenizer_files import special_ids
from matformer.io.outputs import check_output_folder
from matformer.io.swap import check_save_target
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM
from matformer.models.memory import TRAIN_BYTES_PER_PARAMETER, check_fits
from matformer.models.registry import family_of_config, parameter_counts
from matformer.training import distributed, execution, sharded, state, warmstart
from matformer.training.batches import Batches
from matformer.training.distill import Distillation, Teacher
from matformer.training.distributed import Dist
from matformer.training.evaluation import heldout
from matformer.training.objective import Objective
from matformer.training.optimizer import NestedAdamW, build_optimizer, nested_dims
from matformer.training.points import (
    Key,
    all_trained_points,
    heads_in_play,
    tier_of_key,
    validate_heads,
)
from matformer.training.precision import LossScaler
from matformer.training.report import Reporter
from matformer.training.settings import (
    SHAPE_KEYS,
    TrainConfig,
    inputs_of,
    model_config,
    resolve_defaults,
    runtime_tiers,
    validate,
)
from matformer.training.state import History, TrainingState


class RunPaths:
    """What both trainers' runs (Run, training.vision.VisionRun) read the same way."""

    cfg: TrainConfig
    model_cfg: Any

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def base(self) -> int:
        return self.model_cfg.base


@dataclass
class Run(RunPaths):
    cfg: TrainConfig
    dist: Dist
    report: Reporter
    tok: Any
    model_cfg: MatFormerConfig
    model: MatFormerLM
    objective: nn.Module
    """What each rank runs: Objective(model), DDP-wrapped under torchrun (with --fsdp the model
    itself is sharded and the objective is not wrapped)."""
    opt: NestedAdamW
    sampler: D.WindowSampler
    val_windows: torch.Tensor
    trained: list[Key]
    """Every tier (with heads in play: every (tier, heads) Point) some rank trains (what
    evaluation scores)."""
    teacher: Teacher | None = None
    """--distill: the frozen teacher (outside the DDP-wrapped objective)."""
    start: int = 0
    tokens_seen: int = 0
    history: History = field(default_factory=list)
    batches: Batches | None = None
    """This rank's micro-batches, read ahead (training.batches)."""
    scaler: LossScaler = field(default_factory=lambda: LossScaler(False))

    def batch(self) -> torch.Tensor:
        """This rank's share of the next global batch (every rank reads the same stream)."""
        if self.batches is None:
            workers = self.cfg.data_workers
            if workers is None:
                workers = 2 if self.dist.device.type == "cuda" else 0
            self.batches = Batches(self.sampler, self.dist.rank, self.dist.world,
                                   self.cfg.batch_size, self.dist.device, workers)
        return self.batches.next()

    def training_state(self, step: int, lr: float) -> TrainingState:
        position = self.batches.position if self.batches is not None else self.sampler.state()
        return TrainingState(step=step, data_position=position,
                             tokens_seen=self.tokens_seen, world_size=self.dist.world, lr=lr,
                             history=self.history)


def prepare(cfg: TrainConfig, dist: Dist) -> Run:
    cfg, notes = resolve_defaults(cfg)  # lr, warm-up, alpha: from scratch or fine-tuning
    validate(cfg, world=dist.world)
    if cfg.data is not None and cfg.data not in D.PACKAGED_CORPORA:  # recorded absolute:
        # evaluation may run from another folder (a packaged corpus is a name, not a path)
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).absolute()))
    check_output_folder(cfg.out, protect=inputs_of(cfg), what="--out folder")
    report = Reporter(Path(cfg.out), dist.main, cfg.quiet)
    for note in notes:
        report.say(note)
    if dist.main:  # a save that would fail (or a mount point: per-file saves) known before step 1
        check_save_target(cfg.out)
    ckpt = state.resume_checkpoint(cfg)
    init = warmstart.init_source(cfg.init_from) if cfg.init_from else None
    tok, train_tokens, val_tokens = _load_data(cfg, dist, ckpt, report, init)
    mcfg = (warmstart.init_model_config(init, tok.get_vocab_size(), cfg.seq_len) if init
            else model_config(cfg, tok.get_vocab_size(), special_ids(tok)))
    validate(cfg, base=mcfg.base, world=dist.world)
    check_fits(parameter_counts(mcfg)["total"], TRAIN_BYTES_PER_PARAMETER, dist.device,
               f"the model ({_origin(cfg)})", "use a smaller --preset or shape flags")
    validate_heads(cfg, mcfg.base_kv_heads, dist.world)
    trained = all_trained_points(cfg, mcfg.base, mcfg.base_kv_heads, dist.world)
    resumed = None
    if ckpt is not None:
        tensors, resumed = _read_resume(ckpt)
        state.check_resume(cfg, ckpt, mcfg, resumed)

    model = family_of_config(mcfg).model_class()(mcfg)  # --init-from: SRC's family
    model.reset_parameters(seed=cfg.seed)
    if ckpt is not None:
        state.load_weights(model, ckpt)
    elif init is not None:
        state.load_weights(model, init.folder)
    model.to(dist.device)
    objective = parallelize(cfg, model, dist, Objective(model, _distillation(cfg)), len(trained))
    narrowest = max(map(tier_of_key, trained))
    opt = build_optimizer(model, cfg, narrowest)  # after sharding: FSDP2 replaces the parameters
    sampler = D.WindowSampler(train_tokens, cfg.seq_len, cfg.seed)
    val_windows, val_desc = heldout(val_tokens, cfg.seq_len, cfg.eval_windows, dist.device)
    run = Run(cfg=cfg, dist=dist, report=report, tok=tok, model_cfg=mcfg, model=model,
              objective=objective, opt=opt,
              sampler=sampler, val_windows=val_windows,
              trained=trained,
              teacher=_teacher(cfg, tok, model, dist))
    run.scaler = LossScaler(cfg.dtype == "float16")
    if ckpt is not None and resumed is not None:
        if tensors is None:  # sharded (--fsdp) state
            sharded.load_state(ckpt, model, opt)
            sampler.load_state(resumed.data_position)
        else:
            state.restore(tensors, ckpt, opt, sampler, resumed, dist.device)
        run.scaler.load_state(resumed.extra.get("loss_scale", {}))
        run.start, run.tokens_seen, run.history = resumed.step, resumed.tokens_seen, resumed.history
        report.say(f"resumed from {ckpt} at step {run.start}"
                   + state.resume_note(resumed, cfg, dist.world))
    else:
        torch.manual_seed(cfg.seed)
    _describe(run, val_desc)
    return run


def _read_resume(ckpt: Path) -> tuple[dict[str, torch.Tensor] | None, TrainingState]:
    """The training state a checkpoint holds: tensors + state (single-file), or None + state
    (sharded, loaded into the model and optimizer later by every rank)."""
    if sharded.is_sharded(ckpt):
        return None, TrainingState.from_meta(sharded.read_meta(ckpt),
                                             f"{ckpt / sharded.META_FILE} (training state)")
    return state.read_state(ckpt)


def parallelize(cfg: TrainConfig, model: MatFormerLM, dist: Dist, objective: Objective,
                widths: int) -> nn.Module:
    """Activation checkpointing, torch.compile, then FSDP2 sharding or the DDP wrapper."""
    if cfg.activation_checkpointing:
        execution.checkpoint_layers(model)
    if cfg.compile:
        execution.compile_model(model, cfg.compile, widths, per_layer=cfg.fsdp)
    if cfg.fsdp:
        distributed.shard(model, dist, nested_dims(heads_in_play(cfg)))
        return objective
    return distributed.wrap(objective, dist)


def _distillation(cfg: TrainConfig) -> Distillation | None:
    return Distillation(cfg.distill_alpha, cfg.distill_temperature) if cfg.distill else None


def _teacher(cfg: TrainConfig, tok: Any, model: MatFormerLM, dist: Dist) -> Teacher | None:
    """--distill: the teacher, loaded once, checked against the student."""
    if not cfg.distill:
        return None
    teacher = Teacher(cfg.distill, dist.device)
    teacher.check_student(model, tok.to_str(), cfg.seq_len)
    return teacher


def _load_data(cfg: TrainConfig, dist: Dist, ckpt: Path | None, report: Reporter,
               init: Any = None) -> tuple[Any, np.ndarray, np.ndarray]:
    """The tokenizer (the checkpoint's, or trained on rank 0 and broadcast) and the train and
    held-out token streams."""
    t0 = time.time()
    if token_files.is_prepared(cfg.data):  # matformer prepare-data: memory-mapped, no tokenizing
        tok, train_tokens, val_tokens, meta = token_files.load(cfg.data)
        # the model's tokenizer (resumed or --init-from) must be the one the folder was made with
        if ckpt is not None:
            tok = D.load_tokenizer(ckpt)
            token_files.load_for(cfg.data, tok, ckpt / "tokenizer.json")
        elif init is not None:
            tok = warmstart.init_tokenizer(init)
            token_files.load_for(cfg.data, tok, init.tokenizer_path or f"--init-from {cfg.init_from}")
        report.say(f"data: {cfg.data} (prepared): {meta['train_tokens']:,} / "
                   f"{meta['val_tokens']:,} train / held-out tokens, vocab {tok.get_vocab_size()}")
        return tok, train_tokens, val_tokens
    texts = D.load_texts(cfg.data, max_bytes=cfg.max_corpus_bytes)
    train_texts, val_texts = D.split_texts(texts, cfg.val_fraction, cfg.split_seed)
    if ckpt is not None:
        tok = D.load_tokenizer(ckpt)
    elif init is not None:
        tok = warmstart.init_tokenizer(init)
    else:
        tok_json = D.train_tokenizer(train_texts, cfg.vocab_size).to_str() if dist.main else None
        tok = Tokenizer.from_str(distributed.broadcast_str(tok_json, dist))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else D.default_cache_dir()
    train_tokens = D.tokenize(tok, train_texts, cache_dir)
    val_tokens = D.tokenize(tok, val_texts, cache_dir)
    report.say(f"data: {cfg.data or 'default corpus (Python standard library)'}: "
               f"{len(train_texts)} train / {len(val_texts)} held-out documents, "
               f"{len(train_tokens):,} / {len(val_tokens):,} tokens, vocab {tok.get_vocab_size()} "
               f"({time.time() - t0:.1f}s)")
    return tok, train_tokens, val_tokens


def _origin(cfg: TrainConfig) -> str:
    """The flags that sized the model, for messages."""
    flags = " ".join(f"--{f.replace('_', '-')} {getattr(cfg, f)}" for f in SHAPE_KEYS
                     if getattr(cfg, f) is not None)
    base = f"--init-from {cfg.init_from}" if cfg.init_from else f"--preset {cfg.preset}"
    return f"{base} {flags}".strip()


def _describe(run: Run, val_desc: str) -> None:
    cfg, mcfg = run.cfg, run.model_cfg
    counts = parameter_counts(mcfg)
    rts = runtime_tiers(cfg, run.dist.world)
    origin = f"--init-from {cfg.init_from}" if cfg.init_from else f"preset {cfg.preset}"
    run.report.say(
        f"model: {origin}, {mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, "
        f"FFN base {mcfg.base}; {counts['non_embedding']:,} non-embedding + "
        f"{counts['embedding']:,} embedding parameters; objective {cfg.objective}, tiers "
        f"{run.trained}" + (f", runtime tier(s) {rts}" if any(rts) else "")
        + f", {run.dist.world} process(es)")
    run.report.say(f"held-out evaluation: {val_desc}")
    if run.teacher is not None:
        d = _distillation(cfg)
        assert d is not None
        run.report.say(run.teacher.describe(d))
