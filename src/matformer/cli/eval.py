"""Evaluate every width of a checkpoint: loss, perplexity, consistency, speed, speculative decoding.

CKPT is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]) or a
multi-tier repo written by `matformer slice --tiers` (with --tier). Default widths: every tier
the checkpoint can run, plus least-slope Mix'n'Match mixes between neighbouring tiers (--no-mix
to skip) and any --widths lists; --tier T evaluates tier T alone (and the stored reference).
Default data: the held-out windows the checkpoint's training evaluated (its train_config.json;
the default corpus otherwise), tokenized with its tokenizer. --data names another corpus (text
files, builtin:kjv, or a `matformer prepare-data` folder whose tokenizer is the checkpoint's): its
held-out part is scored, split as training splits it (--split all: the whole of it); the line
"data: ..." (stderr, and the report's data/split) says which. Consistency is measured against
the stored (full) width: greedy-token match and KL(P_full || P_width) in nats per position.
The width flags are every verb's (--tier, --layer-tiers, --widths, --kv-heads,
--layer-kv-heads): each names one more point (--tier T or --layer-tiers: that point alone, plus
the stored reference; --widths and --layer-kv-heads may be repeated). The sets have their own
names: --tiers T1,T2,... and --kv-heads-list G1,G2,... (each tier also at every KV head count
in it; `--kv-heads G1,G2,...` is the old spelling of the same). Default heads: every head
granularity G, G/2, ..., 1 the checkpoint holds, when its heads nest, with the KV-cache bytes
per token of each point.
--json prints one JSON object instead of the table; --plot FILE.png draws loss against
non-embedding parameters (the elastic curve). Progress goes to stderr.
--compare B,C scores CKPT, B and C tier by tier on the same windows (loss only), e.g. a dense
source (naive truncation), its `matformer convert` output (importance order) and the distilled
model: `matformer eval runs/dense --compare runs/mat,runs/distilled`.
A MatViT checkpoint (config.json model_type "vit") is evaluated on images instead: every width
it can run (--tiers, --tier, --widths, --no-mix, --kv-heads choose) on the held-out images its
training used (its train_config.json: digits, or --data FOLDER for an image folder), normalised as
in training (its preprocessor_config.json): top-1, agreement with the full width's predictions,
elastic retrieval (leave-one-out 1-NN, cosine, of each width's embeddings against the full
width's) and images/s. Flags that only mean something for text (--compare, --layer-kv-heads,
--seq-len, --max-tokens, --compile, --dtype) are refused for it.
Of a multi-tier repo, the folder evaluated is the one holding --tier (else the widest of --tiers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from matformer.cli.flags import (
    add_checkpoint_argument,
    add_width_flags,
    check_device,
    check_report_paths,
    draft_tokens_arg,
    int_list,
    set_threads,
    write_plot,
    write_report,
)
from matformer.errors import ConfigError
from matformer.evaluation.report import format_comparison, format_eval_report, format_vit_report
from matformer.io.source import Source, resolve_source
from matformer.models.registry import CAUSAL_LM, IMAGE_CLASSIFICATION, check_loadable
from matformer.tiers import WidthRequest, parse_int_list

if TYPE_CHECKING:
    from matformer.evaluation.lm import EvalReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    add_width_flags(parser, several=True, what="evaluate")
    parser.add_argument("--data", default=None,
                        help="corpus to evaluate on: a text file or folder, builtin:kjv, or a "
                        "`matformer prepare-data` token folder (same tokenizer); its held-out "
                        "part is scored (see --split) (default: the held-out split the "
                        "checkpoint's training evaluated)")
    parser.add_argument("--split", default="held-out", choices=("held-out", "all"),
                        help="the part of the data scored: held-out (the documents training and "
                        "convert's calibration never read, split as the checkpoint's training "
                        "split them, else 5%% seed 0) or all of it (text kept apart by hand) "
                        "(default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object instead of the table")
    parser.add_argument("--json-out", default=None, metavar="FILE.json",
                        help="also write the JSON report to FILE (the table is still printed)")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="draw validation loss against non-embedding parameters")
    parser.add_argument("--tiers", default=None, help="comma-separated tiers (default: all runnable)")
    parser.add_argument("--no-mix", action="store_true", help="skip the Mix'n'Match points")
    parser.add_argument("--kv-heads-list", default=None, metavar="G1,G2,...",
                        help="KV head counts every tier is also evaluated at (default: every "
                        "head granularity the checkpoint holds when its heads nest)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per evaluation window (default: as the checkpoint's training)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="evaluate on at most this many tokens (default: as the training)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--no-speculative", action="store_true", help="skip the speculative decoding report")
    parser.add_argument("--no-decode", action="store_true", help="skip per-width decoding speed")
    parser.add_argument("--draft-tokens", type=draft_tokens_arg, default="auto",
                        help="tokens drafted per verification, 'adaptive', or 'auto' (default: "
                        "chosen from the draft and verify costs measured here)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through the compiled static-cache step (CUDA graphs on a GPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--compare", default=None, metavar="CKPT,...",
                        help="also score these checkpoints (same tokenizer) on the same windows "
                        "and print one loss column per checkpoint and a row per tier (e.g. a "
                        "dense source, its convert output and the distilled model); loss only")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is steadier on a busy machine)")


def run_eval(ckpt: str | Source, *, json_out: str | None = None, plot: str | None = None,
             out: TextIO | None = None, revision: str | None = None, **kwargs: Any) -> EvalReport:
    """Evaluate a checkpoint (`matformer.evaluate` with `kwargs`), print the table (or JSON with
    `json_out="-"`, or also write JSON to the file `json_out`), draw the elastic curve to `plot`."""
    from matformer.evaluation.lm import evaluate  # torch: imported only when a command runs

    out = out or sys.stdout
    request = WidthRequest(tier=kwargs.get("tier"), layer_tiers=kwargs.get("layer_tiers"))
    source = resolve_source(ckpt, request=request, revision=revision, companions=True)
    protect = [*source.read_files(), kwargs.get("data")]
    check_report_paths(json_out, plot, protect)
    report = evaluate(source, **kwargs)  # a given Source is used as it is
    data, nonfinite = _strict_json(report.to_dict())
    if nonfinite:
        print(f"warning: {nonfinite} value(s) of the report are not finite (NaN/inf weights or "
              f"overflow); they are null in the JSON", file=sys.stderr)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    if json_out == "-":
        out.write(text)
    else:
        out.write(format_eval_report(report) + "\n")
        if json_out is not None:
            write_report(json_out, text, protect)
    if plot is not None:
        _plot(report, plot, Path(source.spec).name, protect)
    return report


def _strict_json(obj: Any) -> tuple[Any, int]:
    """`obj` with every NaN/inf replaced by None (strict JSON has no such numbers), and how many."""
    if isinstance(obj, float):
        return (obj, 0) if math.isfinite(obj) else (None, 1)
    if isinstance(obj, dict):
        pairs = [(k, _strict_json(v)) for k, v in obj.items()]
        return {k: v for k, (v, _) in pairs}, sum(n for _, (_, n) in pairs)
    if isinstance(obj, (list, tuple)):
        items = [_strict_json(v) for v in obj]
        return [v for v, _ in items], sum(n for _, n in items)
    return obj, 0


def _plot(report: EvalReport, path: str, name: str, protect: list[Any]) -> None:
    from matformer.evaluation.plot import plot_elastic_curve  # matplotlib: optional

    write_plot(plot_elastic_curve, report, path, f"MatFormer evaluation: {name}", protect)


def run_compare(args: argparse.Namespace, source: Source | None = None,
                out: TextIO | None = None) -> None:
    """`--compare`: CKPT and the listed checkpoints, tier by tier (matformer.evaluation.compare)."""
    from matformer.evaluation.compare import compare  # torch: imported only when a command runs

    out = out or sys.stdout
    others = [c for c in args.compare.split(",") if c]
    protect = [c for c in [args.ckpt, *others] if os.path.lexists(c)] + [args.data]
    check_report_paths(args.json_out, None, protect)
    result = compare([source or args.ckpt, *others], revision=args.revision,
                     tiers=parse_int_list(args.tiers, "--tiers") if args.tiers else None,
                     data=args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                     batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                     split=args.split, progress=lambda msg: print(msg, file=sys.stderr))
    text = json.dumps(result.to_dict(), indent=2) + "\n"
    out.write(text if args.json else format_comparison(result) + "\n")
    if args.json_out:
        write_report(args.json_out, text, protect)


def head_counts(args: argparse.Namespace) -> list[int] | None:
    """The KV head counts every tier is also evaluated at: --kv-heads G (one), its old spelling
    --kv-heads G1,G2,... and --kv-heads-list G1,G2,...; None when none was given."""
    counts = (int_list(args.kv_heads, "--kv-heads") or []) + (
        int_list(args.kv_heads_list, "--kv-heads-list") or [])
    return counts or None


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    check_device(args.device)
    counts = head_counts(args)
    args.kv_heads, args.kv_heads_list = (",".join(map(str, counts)) if counts else None), None
    tiers = parse_int_list(args.tiers, "--tiers") if args.tiers else None
    layer_tiers = int_list(args.layer_tiers, "--layer-tiers")
    # SRC resolved once; of a multi-tier repo, the folder holding the widest tier asked for.
    pick = (WidthRequest(tier=min(tiers)) if tiers and args.tier is None and layer_tiers is None
            else WidthRequest(tier=args.tier, layer_tiers=layer_tiers))
    source = resolve_source(args.ckpt, request=pick, revision=args.revision, companions=True)
    check_loadable(source.family, source.describe())
    by_task = {CAUSAL_LM: _run_text, IMAGE_CLASSIFICATION: run_vit}
    if source.family.task not in by_task:
        raise ConfigError(f"{source.describe()}: matformer cannot evaluate a "
                          f"{source.family.task} model")
    return by_task[source.family.task](args, source)


def _run_text(args: argparse.Namespace, source: Source) -> int:
    if args.compare:
        run_compare(args, source)
        return 0
    if args.compile:
        from matformer.inference.compile_cache import compile_cache_dir, compile_stats

        print(f"--compile: the decode steps compile on their first use at each width (kernels "
              f"kept in {compile_cache_dir()} for later runs)", file=sys.stderr)
        before = compile_stats()
    run_eval(
        source, json_out="-" if args.json else args.json_out, plot=args.plot,
        revision=args.revision, tier=args.tier, data=args.data, split=args.split,
        layer_tiers=int_list(args.layer_tiers, "--layer-tiers"),
        uniform_tiers=parse_int_list(args.tiers, "--tiers") if args.tiers else None,
        plans=[parse_int_list(w, "--widths") for w in args.widths or []],
        mix_n_match=not args.no_mix, seq_len=args.seq_len, max_tokens=args.max_tokens,
        kv_heads=int_list(args.kv_heads, "--kv-heads"),  # every count (run joined them)
        layer_kv_heads=[parse_int_list(h, "--layer-kv-heads") for h in args.layer_kv_heads or []]
        or None,
        batch_size=args.batch_size, decode=not args.no_decode,
        speculative=not args.no_speculative, draft_tokens=args.draft_tokens, compile=args.compile,
        device=args.device, dtype=args.dtype,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    if args.compile:
        print(f"--compile: {compile_stats().since(before).describe()}", file=sys.stderr)
    return 0


# Flags that only mean something for text, and their unset values.
_TEXT_ONLY = {"compare": None, "split": "held-out", "layer_kv_heads": None, "layer_tiers": None, "seq_len": None,
              "max_tokens": None, "compile": False, "dtype": None}


def run_vit(args: argparse.Namespace, source: Source, out: TextIO | None = None) -> int:
    """`matformer eval` of an image classifier (MatViT): top-1, agreement, retrieval, speed."""
    from matformer.evaluation.vision import (
        evaluate_checkpoint,  # torch: imported only when a command runs
    )

    out = out or sys.stdout
    for key, unset in _TEXT_ONLY.items():
        if getattr(args, key, unset) != unset:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to a MatViT checkpoint")
    protect = [*source.read_files(), args.data]
    check_report_paths(None if args.json else args.json_out, args.plot, protect)
    tiers = parse_int_list(args.tiers, "--tiers") if args.tiers else None
    if tiers is None and args.tier is not None:
        tiers = [args.tier]
    print(f"evaluating {args.ckpt} (MatViT) ...", file=sys.stderr)
    report = evaluate_checkpoint(
        source, data=args.data, uniform_tiers=tiers,
        plans=[parse_int_list(w, "--widths") for w in args.widths or []],
        kv_heads=parse_int_list(args.kv_heads, "--kv-heads") if args.kv_heads else None,
        mix_n_match=not args.no_mix, device=args.device)
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    if args.json:
        out.write(text)
    else:
        out.write(format_vit_report(report) + "\n")
        if args.json_out is not None:
            write_report(args.json_out, text, protect)
    if args.plot is not None:
        from matformer.evaluation.plot import plot_vit_report  # matplotlib: optional

        write_plot(plot_vit_report, report, args.plot, f"MatViT evaluation: {args.ckpt}", protect)
    return 0
