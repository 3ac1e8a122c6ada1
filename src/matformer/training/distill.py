"""Distillation from a frozen teacher: `matformer train --distill SRC`.

Loss of one trained tier (what `Objective` backpropagates when distilling):

    loss = alpha * KD + (1 - alpha) * LM
    KD   = T^2 * mean over every position of KL(softmax(z_teacher / T) || softmax(z_student / T))
    LM   = the usual shifted next-token cross-entropy (`model.lm_loss`)

with alpha = `distill_alpha` (default 0.5) and T = `distill_temperature` (default 1). The T^2
factor keeps the gradient of the soft targets at the LM loss's scale when T changes (Hinton et
al., 2015). KL runs from the teacher to the student (forward KL, as Minitron's logit
distillation), over all B x T positions of the window (the last one included: the teacher's
distribution there is as good a target as any other). The logged per-tier losses stay the LM
loss, so they compare with held-out losses and with runs that do not distill.

The teacher is loaded once per run (memory-mapped, float32), put in eval mode with every
parameter frozen, and runs under `torch.no_grad()` once per step; every tier of a `joint` step
learns from the same teacher logits. It lives outside the DDP-wrapped objective, so its weights
are never broadcast or all-reduced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from matformer.data import text as D
from matformer.data.vocabulary import difference
from matformer.errors import ConfigError
from matformer.io.checkpoint import load_model
from matformer.io.source import resolve_source
from matformer.models.lm.model import MatFormerLM


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over positions (nats)."""
    T = float(temperature)
    V = student_logits.shape[-1]
    s, t = student_logits.float().reshape(-1, V), teacher_logits.float().reshape(-1, V)
    if T != 1.0:  # x / 1.0 is x: no (B*T, V) copies at the default temperature
        s, t = s / T, t / T
    s, t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


@dataclass(frozen=True)
class Distillation:
    """How the distillation loss mixes with the LM loss."""

    alpha: float = 0.5
    temperature: float = 1.0

    def mix(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            lm: torch.Tensor) -> torch.Tensor:
        """alpha * KD + (1 - alpha) * LM (alpha 1: KD alone, `lm` not in the graph)."""
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        if self.alpha == 1.0:
            return kd
        return self.alpha * kd + (1.0 - self.alpha) * lm

    @property
    def pure(self) -> bool:
        """alpha 1: the LM loss is only logged (computed without a graph)."""
        return self.alpha == 1.0


class Teacher:
    """A frozen model whose logits the student learns from: `teacher(input_ids) -> logits`."""

    def __init__(self, src: str | os.PathLike, device: torch.device | str) -> None:
        self.source = resolve_source(src, companions=True)
        if not self.source.family.text:
            raise ConfigError(f"--distill {self.source.describe()}: a {self.source.family.name} "
                              f"checkpoint ({self.source.family.task}); the teacher must be a "
                              f"language model")
        self.model: MatFormerLM = load_model(self.source, dtype=torch.float32, device=device)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def check_student(self, student: MatFormerLM, tokenizer_json: str | None, seq_len: int) -> None:
        """The teacher must read the same tokens the student does and predict over the same
        vocabulary; a ConfigError naming both otherwise."""
        src = self.source.describe()
        tv, sv = self.model.config.vocab_size, student.config.vocab_size
        if tv != sv:
            raise ConfigError(f"--distill {src}: the teacher's vocab_size is {tv}, the student's "
                              f"{sv}; distillation needs the same vocabulary (convert the teacher "
                              f"with matformer convert and --init-from its output)")
        if tokenizer_json is not None:
            if self.source.tokenizer_path is None:
                raise ConfigError(f"--distill {src}: has no tokenizer.json, so nothing shows it "
                                  f"reads the student's tokens; add the tokenizer it was trained "
                                  f"with to the teacher's folder")
            why = difference(D.load_tokenizer(self.source.folder),
                             Tokenizer.from_str(tokenizer_json))
            if why is not None:
                raise ConfigError(f"--distill {src}: its tokenizer differs from the run's "
                                  f"({why}); teacher and student must tokenize alike")
        if seq_len > self.model.config.max_position_embeddings:
            raise ConfigError(f"--distill {src}: seq_len={seq_len} exceeds the teacher's "
                              f"max_position_embeddings={self.model.config.max_position_embeddings}")

    def describe(self, d: Distillation) -> str:
        return (f"distilling from {self.source.describe()} (frozen): loss = {d.alpha:g} * "
                f"T^2 KL(teacher || student, T={d.temperature:g}) + {1 - d.alpha:g} * LM; logged "
                f"losses are the LM part")
