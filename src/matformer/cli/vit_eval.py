"""`matformer eval CKPT` when CKPT is a MatViT (config.json `model_type: "vit"`).

Every width the checkpoint can run (default: its tiers and the least-slope Mix'n'Match points
between them; --tiers, --tier, --widths, --no-mix and --kv-heads choose) on the held-out images
its training used (its train_config.json: digits, or --data FOLDER for an image folder),
normalised as in training (its preprocessor_config.json): top-1, agreement with the full
width's predictions, elastic retrieval (leave-one-out 1-NN, cosine, of each width's embeddings
against the full width's embeddings of the same images) and images/s. --json / --json-out
write the report, --plot FILE.png draws it. Flags that only mean something for text
(--compare, --layer-kv-heads, --seq-len, --max-tokens, --compile, --dtype) are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from matformer.cli.flags import check_report_paths, write_plot, write_report
from matformer.errors import ConfigError
from matformer.io.source import resolve_source
from matformer.models.lm.shapes import format_count
from matformer.models.vit.config import MatViTConfig
from matformer.tiers import parse_int_list

_TEXT_ONLY = {"compare": None, "layer_kv_heads": None, "layer_tiers": None, "seq_len": None, "max_tokens": None,
              "compile": False, "dtype": None}


def is_vit(ckpt: str, revision: str | None = None, tier: int | None = None) -> bool:
    """Whether CKPT's config.json describes a MatViT (no tensor is read, torch not imported)."""
    return isinstance(resolve_source(ckpt, tier=tier, revision=revision).config, MatViTConfig)


def run_vit(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from matformer.evaluation.vision import (
        evaluate_checkpoint,  # torch: imported only when a command runs
    )

    out = out or sys.stdout
    for key, unset in _TEXT_ONLY.items():
        if getattr(args, key, unset) != unset:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to a MatViT checkpoint")
    source = resolve_source(args.ckpt, tier=args.tier, revision=args.revision, companions=True)
    protect = [*source.inputs(), args.data]
    check_report_paths(None if args.json else args.json_out, args.plot, protect)
    tiers = parse_int_list(args.tiers, "--tiers") if args.tiers else None
    if tiers is None and args.tier is not None:
        tiers = [args.tier]
    print(f"evaluating {args.ckpt} (MatViT) ...", file=sys.stderr)
    report = evaluate_checkpoint(
        source,
        data=args.data, uniform_tiers=tiers,
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
        _plot(report, args.plot, args.ckpt, protect)
    return 0


def format_vit_report(report: Any) -> str:
    d = report.to_dict() if hasattr(report, "to_dict") else report
    lines = [f"{d['source']}: MatViT, {d['num_images']} held-out images ({d['data']}), "
             f"{d['num_classes']} classes; reference (agreement, retrieval gallery): "
             f"{d['reference']}, {d['threads']} threads",
             "",
             "| width | heads | non-emb params | top-1 | agreement with full | retrieval vs full "
             "gallery | images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        heads = r["kv_heads"]
        h = str(heads[0]) if len(set(heads)) == 1 else ",".join(map(str, heads))
        lines.append(f"| {r['name']} | {h} | {format_count(r['non_embedding_params'])} | "
                     f"{r['top1']:.2%} | {r['agreement']:.2%} | {r['retrieval']:.2%} | "
                     f"{r['images_per_s']:,.0f} |")
    return "\n".join(lines)


def _plot(report: Any, path: str, name: str, protect: list[Any]) -> None:
    from matformer.evaluation.vision_plot import plot_vit_report  # matplotlib: optional

    write_plot(plot_vit_report, report, path, f"MatViT evaluation: {name}", protect)
