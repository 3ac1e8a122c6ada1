"""`train --init-from` picks fine-tuning defaults (and says so) when --lr, --warmup-steps and
--distill-alpha are not given; from scratch the defaults are unchanged; given values are kept."""

from __future__ import annotations

from matformer.training.settings import (
    FINETUNE_ALPHA,
    FINETUNE_LR,
    FINETUNE_WARMUP,
    TrainConfig,
    resolve_defaults,
)


def test_scratch_defaults_are_the_presets() -> None:
    cfg, notes = resolve_defaults(TrainConfig())
    assert (cfg.lr, cfg.warmup_steps, cfg.distill_alpha) == (6e-3, 20, 0.5) and notes == []


def test_a_pretrained_start_gets_fine_tuning_defaults_and_is_told() -> None:
    cfg, notes = resolve_defaults(TrainConfig(init_from="runs/mat", distill="runs/dense"))
    assert (cfg.lr, cfg.warmup_steps, cfg.distill_alpha) == (FINETUNE_LR, FINETUNE_WARMUP,
                                                             FINETUNE_ALPHA)
    assert FINETUNE_LR <= 3e-4 and len(notes) == 1 and "--lr 0.0003" in notes[0]
    assert resolve_defaults(cfg) == (cfg, [])  # idempotent: a resolved config stays as it is
    # what the user gave is kept, and only the rest is announced
    given, notes = resolve_defaults(TrainConfig(init_from="runs/mat", lr=1e-3))
    assert given.lr == 1e-3 and "--lr" not in notes[0] and "--warmup-steps 10" in notes[0]
    # no teacher: alpha is not announced
    assert "--distill-alpha" not in resolve_defaults(TrainConfig(init_from="runs/mat"))[1][0]
