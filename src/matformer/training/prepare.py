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

from .. import data as D
from ..config import MatFormerConfig
from ..io.swap import check_save_target
from ..model import MatFormerLM, parameter_counts
from . import distributed, state, warmstart
from .distill import Distillation, Teacher
from .distributed import Dist
from .evaluation import heldout
from .objective import Objective
from .optimizer import NestedAdamW, build_optimizer
from .report import Reporter
from .settings import TrainConfig, all_trained_tiers, model_config, runtime_tiers, validate
from .state import History, TrainingState


@dataclass
class Run:
    cfg: TrainConfig
    dist: Dist
    report: Reporter
    tok: Any
    model_cfg: MatFormerConfig
    model: MatFormerLM
    objective: nn.Module
    """What each rank runs: Objective(model), DDP-wrapped under torchrun."""
    opt: NestedAdamW
    sampler: D.WindowSampler
    val_windows: torch.Tensor
    trained: list[int]
    """Every tier some rank trains (what evaluation scores)."""
    teacher: Teacher | None = None
    """--distill: the frozen teacher (outside the DDP-wrapped objective)."""
    start: int = 0
    tokens_seen: int = 0
    history: History = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def base(self) -> int:
        return self.model_cfg.base

    def batch(self) -> torch.Tensor:
        """This rank's share of the next global batch (every rank reads the same stream)."""
        B, rank = self.cfg.batch_size, self.dist.rank
        windows = self.sampler.next(self.dist.world * B)
        return torch.from_numpy(windows[rank * B:(rank + 1) * B]).to(self.dist.device, non_blocking=True)

    def training_state(self, step: int, lr: float) -> TrainingState:
        return TrainingState(step=step, data_position=self.sampler.state(),
                             tokens_seen=self.tokens_seen, world_size=self.dist.world, lr=lr,
                             history=self.history)


def prepare(cfg: TrainConfig, dist: Dist) -> Run:
    validate(cfg, world=dist.world)
    if cfg.data is not None and cfg.data not in D.PACKAGED_CORPORA:  # recorded absolute:
        # evaluation may run from another folder (a packaged corpus is a name, not a path)
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).absolute()))
    report = Reporter(Path(cfg.out), dist.main, cfg.quiet)
    if dist.main:  # a save that would fail (or a mount point: per-file saves) known before step 1
        check_save_target(cfg.out)
    ckpt = state.resume_checkpoint(cfg)
    init = warmstart.init_source(cfg.init_from) if cfg.init_from else None
    tok, train_tokens, val_tokens = _load_data(cfg, dist, ckpt, report, init)
    mcfg = (warmstart.init_model_config(init, tok.get_vocab_size(), cfg.seq_len) if init
            else model_config(cfg, tok.get_vocab_size()))
    validate(cfg, base=mcfg.base, world=dist.world)
    resumed = None
    if ckpt is not None:
        tensors, resumed = state.read_state(ckpt)
        state.check_resume(cfg, ckpt, mcfg, dist.world, resumed)

    model = MatFormerLM(mcfg)
    model.reset_parameters(seed=cfg.seed)
    if ckpt is not None:
        state.load_weights(model, ckpt)
    elif init is not None:
        state.load_weights(model, init.folder)
    model.to(dist.device)
    opt = build_optimizer(model, cfg)
    sampler = D.WindowSampler(train_tokens, cfg.seq_len, cfg.seed)
    val_windows, val_desc = heldout(val_tokens, cfg.seq_len, cfg.eval_windows, dist.device)
    run = Run(cfg=cfg, dist=dist, report=report, tok=tok, model_cfg=mcfg, model=model,
              objective=distributed.wrap(Objective(model, _distillation(cfg)), dist), opt=opt,
              sampler=sampler, val_windows=val_windows,
              trained=all_trained_tiers(cfg, mcfg.base, dist.world),
              teacher=_teacher(cfg, tok, model, dist))
    if ckpt is not None and resumed is not None:
        state.restore(tensors, ckpt, opt, sampler, resumed, dist.device)
        run.start, run.tokens_seen, run.history = resumed.step, resumed.tokens_seen, resumed.history
        report.say(f"resumed from {ckpt} at step {run.start}")
    else:
        torch.manual_seed(cfg.seed)
    _describe(run, val_desc)
    return run


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


def _describe(run: Run, val_desc: str) -> None:
    cfg, mcfg = run.cfg, run.model_cfg
    counts = parameter_counts(mcfg)
    rts = runtime_tiers(cfg, run.dist.world)
    run.report.say(
        f"model: {'--init-from ' + cfg.init_from if cfg.init_from else 'preset ' + cfg.preset}, {mcfg.num_hidden_layers} layers, hidden {mcfg.hidden_size}, "
        f"FFN base {mcfg.base}; {counts['non_embedding']:,} non-embedding + "
        f"{counts['embedding']:,} embedding parameters; objective {cfg.objective}, tiers "
        f"{run.trained}" + (f", runtime tier(s) {rts}" if any(rts) else "")
        + f", {run.dist.world} process(es)")
    run.report.say(f"held-out evaluation: {val_desc}")
    if run.teacher is not None:
        d = _distillation(cfg)
        assert d is not None
        run.report.say(run.teacher.describe(d))
