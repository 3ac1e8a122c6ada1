"""Train a MatFormer: every nested width at once (sample / joint), or one width (single).

With no --data it trains on the embedded default corpus (the Python standard library's own
source files), offline. Checkpoints go to OUT/checkpoints/step-*/ and the final model to OUT.
Under `torchrun --nproc-per-node N` the same command trains data-parallel (gloo on CPU, NCCL
on GPU); --rank-tiers gives each process its own runtime tier.

examples:
  matformer train --out runs/demo                       # the demo: tiny preset, default corpus
  matformer train --preset debug --steps 50 --objective joint --out runs/joint
  matformer train --tier 2 --out runs/t2                 # runtime tier 2: first B/4 neurons only
  matformer train --out runs/demo --resume               # continue from the newest checkpoint
  torchrun --nproc-per-node 2 -m matformer.cli train --rank-tiers 0,1 --out runs/ddp
"""

from __future__ import annotations

import argparse

# The demo's settings (TrainConfig's defaults; a test keeps them equal): ~2-3 minutes on 2 cores.
_DEFAULTS = dict(preset="tiny", steps=240, batch_size=16, seq_len=128, lr=6e-3, vocab_size=2048,
                 eval_every=40, save_every=80, seed=0, warmup_steps=20, weight_decay=0.1,
                 grad_clip=1.0, eval_windows=32, val_fraction=0.05)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--data", default=None,
                   help="text file, folder of text files (.jsonl: one {\"text\": ...} per line), "
                        "or a datasets folder saved with save_to_disk (default: the Python "
                        "standard library's source, offline)")
    p.add_argument("--out", default="runs/matformer", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps (default: %(default)s)")
    p.add_argument("--preset", default=d["preset"],
                   help="model size: debug, tiny, small, base, 850m (default: %(default)s); the "
                        "vocabulary size comes from the trained tokenizer")
    p.add_argument("--objective", choices=("sample", "joint", "single"), default="sample",
                   help="sample: one granularity per step; joint: all granularities on the same "
                        "batch, one step; single: one width (baselines) (default: %(default)s)")
    p.add_argument("--tier", type=int, default=None,
                   help="runtime tier T: a full-width model, only the first B>>T FFN neurons are "
                        "used and updated (with --objective single: the tier trained)")
    p.add_argument("--rank-tiers", default=None, metavar="T0,T1,...",
                   help="one runtime tier per torchrun process (heterogeneous participants)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest complete checkpoint")
    p.add_argument("--granularity-probs", default=None, metavar="P0,P1,...",
                   help="sample: probability of each granularity (tiers 0,1,2,3), summing to 1 "
                        "(default: uniform)")
    p.add_argument("--granularities", default=None, metavar="T,...",
                   help="tiers the objectives train (default: 0,1,2,3)")
    p.add_argument("--joint-weights", default=None, metavar="W0,W1,...",
                   help="joint: loss weight of each granularity (default: 1 each)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="sequences per process per step (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sequence (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], help="(default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="(default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"],
                   help="max gradient norm, 0 = off (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="steps between validations of every width (default: %(default)s)")
    p.add_argument("--eval-windows", type=int, default=d["eval_windows"],
                   help="held-out sequences per validation (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=d["save_every"],
                   help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"],
                   help="BPE vocabulary size to train (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"],
                   help="held-out fraction of the documents (default: %(default)s)")
    p.add_argument("--max-corpus-bytes", type=int, default=None,
                   help="cap on the default corpus (default: 3 MB of source)")
    p.add_argument("--cache-dir", default=None,
                   help="token cache (default: $MATFORMER_CACHE or ~/.cache/matformer)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=1, help="steps between log lines (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from ..tiers import parse_int_list
    from ..train import TrainConfig, train

    def floats(text: str | None, what: str) -> list[float] | None:
        if text is None:
            return None
        try:
            return [float(x) for x in text.replace(" ", "").split(",") if x]
        except ValueError:
            from ..errors import ConfigError

            raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None

    cfg = TrainConfig(
        out=args.out, data=args.data, preset=args.preset, steps=args.steps,
        objective=args.objective, tier=args.tier,
        rank_tiers=parse_int_list(args.rank_tiers, "--rank-tiers") if args.rank_tiers else None,
        granularities=parse_int_list(args.granularities, "--granularities") if args.granularities else None,
        granularity_probs=floats(args.granularity_probs, "--granularity-probs"),
        joint_weights=floats(args.joint_weights, "--joint-weights"),
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_every=args.eval_every, eval_windows=args.eval_windows, save_every=args.save_every,
        seed=args.seed, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
        max_corpus_bytes=args.max_corpus_bytes, cache_dir=args.cache_dir, resume=args.resume,
        device=args.device, log_every=args.log_every, quiet=args.quiet,
    )
    train(cfg)
    return 0
