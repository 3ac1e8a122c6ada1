"""Export one width of a checkpoint to a GGUF file for llama.cpp (and the tools built on it).

Choose the width with one of --tier, --widths or --layer-tiers (none: the stored widths), and
the attention heads with --kv-heads or --layer-kv-heads (none: the stored heads).
Uniform widths are written as llama.cpp's `llama` architecture, per-layer (Mix'n'Match) widths
as `deci`, the Llama block with per-layer FFN widths. The tokenizer is embedded. Tensors stream
one at a time; the file appears only when complete. Needs `pip install 'matformer[export]'`.

examples:
  matformer export runs/full -o tier2.gguf --tier 2
  matformer export runs/full -o mix.gguf --layer-tiers 3,3,2,2,1,1 --outtype q8_0
  llama-cli -m tier2.gguf -p "Once upon a time" -n 32
"""

from __future__ import annotations

import argparse

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint folder, .safetensors file, multi-tier repo or org/name")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.gguf",
                        help="GGUF file to write (replaced only by a complete file)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--tier", type=int, metavar="T",
                      help="uniform tier: FFN width B >> T in every layer (B = the base width)")
    what.add_argument("--widths", metavar="W1,W2,...",
                      help="FFN width per layer (one number: the same width everywhere)")
    what.add_argument("--layer-tiers", metavar="T1,T2,...", help="tier per layer, e.g. 3,3,2,2,1,1")
    heads = parser.add_mutually_exclusive_group()
    heads.add_argument("--kv-heads", type=int, metavar="G",
                       help="keep the first G KV heads (and their query heads) in every layer")
    heads.add_argument("--layer-kv-heads", metavar="G1,G2,...",
                       help="KV heads per layer (written as per-layer head count arrays, 'deci')")
    parser.add_argument("--outtype", choices=OUTTYPES, default="f16",
                        help="type of the 2-D weights; norms stay f32 (default: f16)")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")


def run(args: argparse.Namespace) -> int:
    from ..export import export_gguf
    from ..tiers import parse_int_list

    widths: int | list[int] | None = None
    if args.widths is not None:
        wl = parse_int_list(args.widths, "--widths")
        widths = wl[0] if len(wl) == 1 else wl
    result = export_gguf(
        args.src,
        args.output,
        tier=args.tier,
        widths=widths,
        layer_tiers=parse_int_list(args.layer_tiers, "--layer-tiers") if args.layer_tiers else None,
        kv_heads=args.kv_heads,
        layer_kv_heads=(parse_int_list(args.layer_kv_heads, "--layer-kv-heads")
                        if args.layer_kv_heads else None),
        outtype=args.outtype,
        revision=args.revision,
    )
    print(result.summary())
    return 0
