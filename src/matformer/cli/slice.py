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

from matformer.cli.flags import add_width_flags, int_list, width_request
from matformer.errors import ConfigError
from matformer.io.source import source_family
from matformer.models.registry import GEMMA3N
from matformer.slicing.extract import slice_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="source checkpoint folder, .safetensors file, Hub repo id (org/name) "
                        "or multi-tier repo (the tier folder holding the widths asked for is used)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (must not be the source)")
    what = add_width_flags(parser, what="slice")
    what.add_argument("--budget", metavar="N",
                      help="target non-embedding parameter count (e.g. 120M): picks widths by the "
                      "MatFormer Mix'n'Match heuristic and prints why")
    what.add_argument("--tiers", metavar="T1,T2,...",
                      help="write OUT/tier-T/ for each tier plus OUT/matformer_manifest.json")
    parser.add_argument("--skip-layers", metavar="I,J,...",
                        help="drop these source layers (0-based) and renumber the rest")
    parser.add_argument("--config-csv", metavar="FILE",
                        help="Gemma 3n: a CSV of named slicing configs (Google's columns)")
    parser.add_argument("--config-name", metavar="NAME", help="Gemma 3n: the row of --config-csv")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest shard file, decimal units (default: 5GB)")


def run(args: argparse.Namespace) -> int:
    if source_family(args.src, revision=args.revision) == GEMMA3N:
        from matformer.cli.gemma3n import run_slice

        return run_slice(args)
    if args.config_csv or args.config_name:
        raise ConfigError("--config-csv/--config-name apply to Gemma 3n checkpoints only")
    result = slice_checkpoint(
        args.src,
        args.output,
        **width_request(args).keywords(),
        budget=args.budget,
        skip_layers=int_list(args.skip_layers, "--skip-layers"),
        tiers=int_list(args.tiers, "--tiers"),
        max_shard_size=args.max_shard_size,
        revision=args.revision,
        log=print,
    )
    print(result.summary())
    return 0
