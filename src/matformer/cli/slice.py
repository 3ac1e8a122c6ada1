"""Cut a tier or a Mix'n'Match submodel out of a checkpoint into a real, smaller checkpoint.

Choose the width with one of --tier, --widths, --layer-tiers or --budget (or --tiers for a
multi-tier repo with a manifest), and the attention heads with --kv-heads or --layer-kv-heads
(combinable with any of them; --budget searches both axes when the source's heads nest, unless
--kv-heads pins them). Tensors stream one at a time: memory stays about one tensor.
SRC may itself be a multi-tier repo: the tier folder that holds the widths asked for is used
(--budget needs a plain checkpoint or one tier folder, e.g. REPO/tier-1).
A Hugging Face Gemma 3n SRC (config.json model_type gemma3n / gemma3n_text) is sliced by its own
rules (docs/GEMMA3N.md): --tier, --widths, --layer-tiers or a named row of --config-csv
(--config-name), and --skip-layers; not --budget, --tiers or the head flags.

examples:
  matformer slice runs/full -o runs/tier2 --tier 2
  matformer slice runs/full -o runs/mix --layer-tiers 3,3,2,2,1,1
  matformer slice runs/full -o runs/120m --budget 120M --skip-layers 5
  matformer slice runs/full -o runs/repo --tiers 0,1,2,3
  matformer slice runs/full -o runs/t1-kv1 --tier 1 --kv-heads 1
  matformer slice runs/full -o runs/nas --format nemotron-nas --layer-tiers 2,1,1,0 --skip-layers 3
  matformer slice runs/full -o runs/fit --plan PLAN.json      # a plan written by `matformer plan`

--format nemotron-nas writes NVIDIA's DeciLMForCausalLM (block_configs) for vLLM, SGLang,
TensorRT-LLM and llama.cpp's converter: FFN widths must be multiples of 256, skipped layers
become no-op blocks (docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse

from matformer.cli.flags import add_width_flags, int_list, width_request
from matformer.errors import ConfigError
from matformer.io.source import COMPANION_FILES, Source
from matformer.models.registry import GEMMA3N
from matformer.slicing.extract import slice_checkpoint, slice_source
from matformer.slicing.gemma3n.slicer import slice_gemma3n
from matformer.slicing.gemma3n.source import COMPANION_FILES as GEMMA3N_COMPANIONS

FORMATS = ("matformer", "nemotron-nas")


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
    what.add_argument("--plan", metavar="PLAN.json",
                      help="the widths, heads, skipped layers and format of a plan written by "
                      "`matformer plan`")
    parser.add_argument("--skip-layers", metavar="I,J,...",
                        help="drop these source layers (0-based) and renumber the rest")
    parser.add_argument("--config-csv", metavar="FILE",
                        help="Gemma 3n: a CSV of named slicing configs (Google's columns)")
    parser.add_argument("--config-name", metavar="NAME", help="Gemma 3n: the row of --config-csv")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="matformer (default: our checkpoint, skipped layers dropped) or "
                        "nemotron-nas (DeciLMForCausalLM with block_configs, skipped layers as "
                        "no-op blocks)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest shard file, decimal units (default: 5GB)")


def run(args: argparse.Namespace) -> int:
    if args.plan is not None:
        _apply_plan(args)
    if args.format == "nemotron-nas":
        return _run_nemotron_nas(args)
    # SRC resolved once, with what a slice of either kind carries; its family picks the slicer.
    source = slice_source(args.src, args.revision, request=width_request(args),
                          tiers=int_list(args.tiers, "--tiers"),
                          companions=tuple(dict.fromkeys(COMPANION_FILES + GEMMA3N_COMPANIONS)))
    if source.family is GEMMA3N:
        return _run_gemma3n(args, source)
    if args.config_csv or args.config_name:
        raise ConfigError("--config-csv/--config-name apply to Gemma 3n checkpoints only")
    result = slice_checkpoint(
        source,
        args.output,
        **width_request(args).keywords(),
        budget=args.budget,
        skip_layers=int_list(args.skip_layers, "--skip-layers"),
        tiers=int_list(args.tiers, "--tiers"),
        max_shard_size=args.max_shard_size,
        log=print,
    )
    print(result.summary())
    return 0


def _run_gemma3n(args: argparse.Namespace, source: Source) -> int:
    """The Gemma 3n half of `slice` (matformer.slicing.gemma3n)."""
    for flag, value in (("--budget", args.budget), ("--tiers", args.tiers),
                        ("--kv-heads", args.kv_heads), ("--layer-kv-heads", args.layer_kv_heads)):
        if value is not None:
            raise ConfigError(f"{flag} is not available for Gemma 3n checkpoints; give --widths, "
                              f"--layer-tiers, --tier or --config-csv/--config-name")
    result = slice_gemma3n(
        source,
        args.output,
        **width_request(args).ffn().keywords(),
        skip_layers=int_list(args.skip_layers, "--skip-layers"),
        config_csv=args.config_csv,
        config_name=args.config_name,
        max_shard_size=args.max_shard_size,
        log=print,
    )
    print(result.summary())
    return 0


def _apply_plan(args: argparse.Namespace) -> None:
    """--plan: a PLAN.json's widths, KV heads, skipped layers (and format, unless --format
    is given) in place of the width flags."""
    from matformer.evaluation.plan import read_plan

    given = [f for f, v in (("--kv-heads", args.kv_heads), ("--layer-kv-heads", args.layer_kv_heads),
                            ("--skip-layers", args.skip_layers)) if v is not None]
    if given:
        raise ConfigError(f"--plan sets the widths, heads and skipped layers; drop "
                          f"{', '.join(given)}")
    plan = read_plan(args.plan)
    args.widths = ",".join(map(str, plan.widths))
    args.layer_kv_heads = ",".join(map(str, plan.kv_heads))
    args.skip_layers = ",".join(map(str, plan.skip_layers)) or None
    if args.format is None and plan.format == "nemotron-nas":
        args.format = "nemotron-nas"


def _run_nemotron_nas(args: argparse.Namespace) -> int:
    """--format nemotron-nas (matformer.slicing.nemotron_nas)."""
    from matformer.slicing.nemotron_nas import write_nemotron_nas

    for flag, value in (("--tiers", args.tiers), ("--config-csv", args.config_csv),
                        ("--config-name", args.config_name)):
        if value is not None:
            raise ConfigError(f"{flag} does not apply to --format nemotron-nas")
    result = write_nemotron_nas(
        args.src, args.output, **width_request(args).keywords(), budget=args.budget,
        skip_layers=int_list(args.skip_layers, "--skip-layers"),
        max_shard_size=args.max_shard_size, revision=args.revision, log=print)
    print(result.summary())
    return 0
