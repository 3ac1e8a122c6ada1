"""Export one width of a checkpoint to a GGUF file for llama.cpp (and the tools built on it).

Choose the width with one of --tier, --widths or --layer-tiers (none: the stored widths), and
the attention heads with --kv-heads or --layer-kv-heads (none: the stored heads).
Uniform widths are written as llama.cpp's `llama` architecture, per-layer (Mix'n'Match) widths
as `deci`, the Llama block with per-layer FFN widths; a Gemma 3 checkpoint as llama.cpp's
`gemma3` (uniform tiers only: its graph has no per-layer widths). The tokenizer is embedded with
its chat template and llama.cpp's name for its pre-tokenizer. Tensors stream
one at a time; the file appears only when complete. Needs `pip install 'matformer[export]'`.

examples:
  matformer export runs/full -o tier2.gguf --tier 2
  matformer export runs/full -o mix.gguf --layer-tiers 3,3,2,2,1,1 --outtype q8_0
  matformer export SmolLM2-135M-Instruct.Q4_1.gguf -o tier0.gguf --type q4_0
  llama-cli -m tier2.gguf -p "Once upon a time" -n 32
"""

from __future__ import annotations

import argparse

from matformer.cli.flags import add_width_flags, width_request

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint folder, .safetensors file, multi-tier repo or org/name")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.gguf",
                        help="GGUF file to write (replaced only by a complete file)")
    add_width_flags(parser, what="export")
    parser.add_argument("--outtype", "--type", choices=OUTTYPES, default="f16",
                        help="type of the 2-D weights; norms stay f32; q4_0/q4_1 keep the "
                        "embedding q8_0 (default: f16)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")


def run(args: argparse.Namespace) -> int:
    from matformer.slicing.export import export_gguf

    result = export_gguf(
        args.src,
        args.output,
        **width_request(args).keywords(),
        outtype=args.outtype,
        revision=args.revision,
    )
    print(result.summary())
    return 0
