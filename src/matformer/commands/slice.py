"""Cut a tier or a Mix'n'Match submodel out of a checkpoint into a real, smaller checkpoint.

Choose the width with one of --tier, --widths, --layer-tiers or --budget (or --tiers for a
multi-tier repo with a manifest), and the attention heads with --kv-heads or --layer-kv-heads
(combinable with any of them; --budget searches both axes when the source's heads nest, unless
--kv-heads pins them). Tensors stream one at a time: memory stays about one tensor.
SRC may itself be a multi-tier repo: the tier folder that holds the widths asked for is used
(--budget needs a plain checkpoint or one tier folder, e.g. REPO/tier-1).

examples:
  matformer slice runs/full -o runs/tier2 --tier 2
  matformer slice runs/full -o runs/mix --layer-tiers 3,3,2,2,1,1
  matformer slice runs/full -o runs/120m --budget 120M --skip-layers 5
  matformer slice runs/full -o runs/repo --tiers 0,1,2,3
  matformer slice runs/full -o runs/t1-kv1 --tier 1 --kv-heads 1
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..families import GEMMA3N
from ..io.source import source_family
from ..slicing import slice_checkpoint
from ..tiers import parse_int_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="source checkpoint folder, .safetensors file, Hub repo id (org/name) "
                        "or multi-tier repo (the tier folder holding the widths asked for is used)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (must not be the source)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--tier", type=int, metavar="T",
                      help="uniform tier: FFN width B >> T in every layer (B = the source's base)")
    what.add_argument("--widths", metavar="W1,W2,...",
                      help="FFN width per layer (one number: the same width everywhere)")
    what.add_argument("--layer-tiers", metavar="T1,T2,...", help="tier per layer, e.g. 3,3,2,2,1,1")
    what.add_argument("--budget", metavar="N",
                      help="target non-embedding parameter count (e.g. 120M): picks widths by the "
                      "MatFormer Mix'n'Match heuristic and prints why")
    what.add_argument("--tiers", metavar="T1,T2,...",
                      help="write OUT/tier-T/ for each tier plus OUT/matformer_manifest.json")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--kv-heads", type=int, metavar="G",
                       help="keep the first G KV heads (and their query heads) in every layer")
    heads.add_argument("--layer-kv-heads", metavar="G1,G2,...", help="KV heads kept per layer")
    parser.add_argument("--skip-layers", metavar="I,J,...",
                        help="drop these source layers (0-based) and renumber the rest")
    parser.add_argument("--config-csv", metavar="FILE",
                        help="Gemma 3n: a CSV of named slicing configs (Google's columns)")
    parser.add_argument("--config-name", metavar="NAME", help="Gemma 3n: the row of --config-csv")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest shard file, decimal units (default: 5GB)")


def run(args: argparse.Namespace) -> int:
    if source_family(args.src, revision=args.revision) == GEMMA3N:
        from ..gemma3n.cli import run_slice

        return run_slice(args)
    if args.config_csv or args.config_name:
        raise ConfigError("--config-csv/--config-name apply to Gemma 3n checkpoints only")
    widths: int | list[int] | None = None
    if args.widths is not None:
        wl = parse_int_list(args.widths, "--widths")
        widths = wl[0] if len(wl) == 1 else wl
    result = slice_checkpoint(
        args.src,
        args.output,
        tier=args.tier,
        widths=widths,
        layer_tiers=parse_int_list(args.layer_tiers, "--layer-tiers") if args.layer_tiers else None,
        budget=args.budget,
        skip_layers=parse_int_list(args.skip_layers, "--skip-layers") if args.skip_layers else None,
        tiers=parse_int_list(args.tiers, "--tiers") if args.tiers else None,
        kv_heads=args.kv_heads,
        layer_kv_heads=(parse_int_list(args.layer_kv_heads, "--layer-kv-heads")
                        if args.layer_kv_heads else None),
        max_shard_size=args.max_shard_size,
        revision=args.revision,
        log=print,
    )
    print(result.summary())
    return 0
