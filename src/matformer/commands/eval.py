"""Evaluate every width of a checkpoint: loss, perplexity, consistency, speed, speculative decoding.

Default widths: every tier the checkpoint can run, plus least-slope Mix'n'Match mixes between
neighbouring tiers (--no-mix to skip) and any --widths lists. Default data: the held-out split
of the corpus the checkpoint was trained on (the default corpus), tokenized with its tokenizer.
Consistency is measured against the stored (full) width: greedy-token match and
KL(P_full || P_width) in nats per position. --json prints one JSON object instead of the table;
--plot FILE.png draws loss against non-embedding parameters (the elastic curve). Progress goes
to stderr.
"""

from __future__ import annotations

import argparse

from . import draft_tokens_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint folder (with tokenizer.json) or org/name")
    parser.add_argument("--data", default=None,
                        help="text file or folder to evaluate on (default: the held-out split)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object instead of the table")
    parser.add_argument("--json-out", default=None, metavar="FILE.json",
                        help="also write the JSON report to FILE (the table is still printed)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw validation loss against non-embedding parameters")
    parser.add_argument("--tiers", default=None, help="comma-separated tiers (default: all runnable)")
    parser.add_argument("--widths", action="append", default=None, metavar="W1,W2,...",
                        help="an extra per-layer width list to evaluate (repeatable)")
    parser.add_argument("--no-mix", action="store_true", help="skip the Mix'n'Match points")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per evaluation window (default: the checkpoint's training "
                             "seq_len, else 128)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="evaluate on at most this many tokens (default: the windows the "
                             "checkpoint's training evaluated, else 64 windows)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--no-speculative", action="store_true", help="skip the speculative decoding report")
    parser.add_argument("--no-decode", action="store_true", help="skip per-width decoding speed")
    parser.add_argument("--draft-tokens", type=draft_tokens_arg, default=4,
                        help="tokens drafted per verification, or 'adaptive' (default 4)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is steadier on a busy machine)")


def run(args: argparse.Namespace) -> int:
    import sys

    from matformer.evaluation import run_eval
    from matformer.tiers import parse_int_list

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_eval(
        args.ckpt, json_out="-" if args.json else args.json_out, plot=args.plot, data=args.data,
        uniform_tiers=parse_int_list(args.tiers, "--tiers") if args.tiers else None,
        plans=[parse_int_list(w, "--widths") for w in args.widths or []],
        mix_n_match=not args.no_mix, seq_len=args.seq_len, max_tokens=args.max_tokens,
        batch_size=args.batch_size, decode=not args.no_decode,
        speculative=not args.no_speculative, draft_tokens=args.draft_tokens,
        device=args.device, dtype=args.dtype,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    return 0
