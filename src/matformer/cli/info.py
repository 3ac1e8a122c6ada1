"""Show what a checkpoint stores: widths, heads, tier, files, parameters, dtype.

Printed: stored and base FFN widths, the tier, runnable tiers, stored and base KV heads, files,
parameters and dtype.

SRC is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]), or a
multi-tier repo written by `matformer slice --tiers` with --tier T (the folder holding tier T).
Only config.json and the safetensors headers are read; no tensor data, no torch import.
"""

from __future__ import annotations

import argparse
import json

from matformer.io.checkpoint import checkpoint_info
from matformer.io.source import source_family
from matformer.models.registry import GEMMA3N


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint folder, .safetensors file, org/name or multi-tier repo")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--tier", type=int, default=None, metavar="T",
                        help="of a multi-tier repo: show the folder that holds tier T")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _heads(info: dict) -> str:
    """'2 of base 4 (query heads 4, head_dim 16); runnable 2, 1' or per layer."""
    kv, q = info["num_key_value_heads"], info["num_attention_heads"]
    stored = f"{kv}" if isinstance(kv, int) else f"per layer {kv}"
    return (f"{stored} of base {info['matformer_base_num_key_value_heads']} (query heads {q}, "
            f"head_dim {info['head_dim']}); runtime kv_heads "
            + ", ".join(str(g) for g in info["runnable_kv_heads"]))


def run(args: argparse.Namespace) -> int:
    if source_family(args.src, revision=args.revision) == GEMMA3N:
        from matformer.cli.gemma3n import run_info

        return run_info(args)
    info = checkpoint_info(args.src, revision=args.revision, tier=args.tier)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    base = info["matformer_base_intermediate_size"]
    tier = info["matformer_tier"]
    widths = info["stored_widths"]
    stored = (f"tier {tier} (width {widths[0]})" if tier is not None
              else f"per layer {widths}" if len(set(widths)) > 1 else f"width {widths[0]} (no tier)")
    n = info["num_parameters"]
    lines = [
        f"checkpoint       {info['folder']}"
        + (f" (tier {info['manifest_tier']} of a multi-tier repo)"
           if info["manifest_tier"] is not None else ""),
        f"stored           {stored}",
        f"base width       {base}",
        "runtime tiers    " + ", ".join(f"{t} (width {w})" for t, w in
                                         zip(info["runnable_tiers"], info["runnable_widths"], strict=True)),
        f"KV heads         {_heads(info)}",
        f"layers x hidden  {info['num_hidden_layers']} x {info['hidden_size']}, "
        + (f"MatViT: {info['image_size']}px images, patch {info['patch_size']}, "
           f"{info['num_channels']} channel(s), {info['num_labels']} classes"
           if info.get("model_type") == "vit" else f"vocab {info['vocab_size']}")
        + (", tied embeddings" if info["tie_word_embeddings"] else ""),
        f"parameters       {n['total']:,} ({n['embedding']:,} embedding, "
        f"{n['non_embedding']:,} non-embedding)",
        f"dtype            {info['dtype']}",
        f"files            {len(info['files'])}, {_size(sum(f['size'] for f in info['files']))}",
    ]
    lines += [f"  {f['name']:<40} {_size(f['size']):>10}" for f in info["files"]]
    print("\n".join(lines))
    return 0
