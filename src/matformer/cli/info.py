"""Show what a checkpoint stores: widths, heads, tier, files, parameters, dtype.

Printed: stored and base FFN widths, the tier, runnable tiers, stored and base KV heads, files,
parameters and dtype.

SRC is a checkpoint folder, a .safetensors file, a Hub repo id (org/name[@revision]), or a
multi-tier repo written by `matformer slice --tiers`: the repo and every tier it stores (widths,
heads, parameters, files), or with --tier T the folder holding tier T. A Hugging Face Gemma 3n
checkpoint: its layers, per-layer FFN widths, attention types, KV sharing and parameters.
Only config.json and the safetensors headers are read; no tensor data, no torch import.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from matformer.io.checkpoint import checkpoint_info, repo_info
from matformer.io.source import TierRepo, resolve_any
from matformer.models.registry import GEMMA3N
from matformer.slicing.gemma3n.info import format_info as format_gemma3n_info
from matformer.slicing.gemma3n.info import gemma3n_info


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
    found = resolve_any(args.src, tier=args.tier, revision=args.revision)  # SRC resolved once
    if isinstance(found, TierRepo):
        info = repo_info(found)
        print(json.dumps(info, indent=2) if args.json else format_repo(info))
        return 0
    if found.family is GEMMA3N:
        info = gemma3n_info(found)
        print(json.dumps(info, indent=2) if args.json else format_gemma3n_info(info))
        return 0
    info = checkpoint_info(found)
    print(json.dumps(info, indent=2) if args.json else format_checkpoint(info))
    return 0


def format_checkpoint(info: dict[str, Any]) -> str:
    """The text `matformer info` prints for one checkpoint (`checkpoint_info`)."""
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
        f"layers x hidden  {info['num_hidden_layers']} x {info['hidden_size']}, {info['summary']}"
        + (", tied embeddings" if info["tie_word_embeddings"] else ""),
        f"parameters       {n['total']:,} ({n['embedding']:,} embedding, "
        f"{n['non_embedding']:,} non-embedding)",
        f"dtype            {info['dtype']}",
        f"files            {len(info['files'])}, {_size(sum(f['size'] for f in info['files']))}",
    ]
    lines += [f"  {f['name']:<40} {_size(f['size']):>10}" for f in info["files"]]
    return "\n".join(lines)


def format_repo(info: dict[str, Any]) -> str:
    """The text `matformer info` prints for a multi-tier repo (`repo_info`): the repo, a table of
    its tiers, then each tier as one checkpoint."""
    tiers = info["tiers"]
    lines = [
        f"multi-tier repo  {info['folder']} ({info['manifest']})",
        f"base width       {info['matformer_base_intermediate_size']}",
        f"tiers            {len(tiers)}: " + ", ".join(str(t) for t in info["stored_tiers"]),
        "",
        "| tier | folder | width | KV heads | non-emb params | params | files | size |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for t in tiers:
        kv = t["num_key_value_heads"]
        n = t["num_parameters"]
        lines.append(f"| {t['manifest_tier']} | {t['folder'].rsplit('/', 1)[-1]}/ | "
                     f"{_widths(t['stored_widths'])} | {kv if isinstance(kv, int) else kv} | "
                     f"{n['non_embedding']:,} | {n['total']:,} | {len(t['files'])} | "
                     f"{_size(sum(f['size'] for f in t['files']))} |")
    for t in tiers:
        lines += ["", format_checkpoint(t)]
    return "\n".join(lines)


def _widths(widths: list[int]) -> str:
    return str(widths[0]) if len(set(widths)) == 1 else ",".join(map(str, widths))
