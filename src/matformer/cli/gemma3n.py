"""The Gemma 3n halves of the `slice` and `info` verbs; `matformer.cli.slice` / `.info`
hand over to these when SRC's config.json declares a Gemma 3n model."""

from __future__ import annotations

import argparse
import json

from matformer.cli.flags import int_list, width_request
from matformer.errors import ConfigError
from matformer.slicing.gemma3n.info import format_info, gemma3n_info
from matformer.slicing.gemma3n.slicer import slice_gemma3n


def run_slice(args: argparse.Namespace) -> int:
    for flag, value in (("--budget", args.budget), ("--tiers", args.tiers),
                        ("--kv-heads", args.kv_heads), ("--layer-kv-heads", args.layer_kv_heads)):
        if value is not None:
            raise ConfigError(f"{flag} is not available for Gemma 3n checkpoints; give --widths, "
                              f"--layer-tiers, --tier or --config-csv/--config-name")
    result = slice_gemma3n(
        args.src,
        args.output,
        **width_request(args).ffn().keywords(),
        skip_layers=int_list(args.skip_layers, "--skip-layers"),
        config_csv=args.config_csv,
        config_name=args.config_name,
        max_shard_size=args.max_shard_size,
        revision=args.revision,
        log=print,
    )
    print(result.summary())
    return 0


def run_info(args: argparse.Namespace) -> int:
    info = gemma3n_info(args.src, revision=args.revision)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
