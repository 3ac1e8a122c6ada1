"""MatFormer-ize a dense Llama checkpoint: order FFN neurons and attention heads by importance.

SRC is any dense LlamaForCausalLM-architecture checkpoint (folder, .safetensors file or Hub id)
with its tokenizer. Each FFN neuron's and attention head's importance is measured on calibration
text (default: the training split of the data SRC was trained on, per its train_config.json, or
the default corpus); gate/up rows with down columns, and whole heads (KV groups first, then the
query heads inside each group), are permuted so that the most important come first. The
permutation is exact: OUT at tier 0 computes SRC's function (checked on one window and printed).
Every prefix of OUT is then a better submodel than the same prefix of SRC; fine-tune it with
`matformer train --init-from OUT --distill SRC` and compare with `matformer eval OUT --compare`.

examples:
  matformer convert runs/dense -o runs/mat
  matformer convert org/llama -o runs/mat --calibration texts/ --samples 256 --seq-len 512
"""

from __future__ import annotations

import argparse

# Literals, not imports from matformer.slicing.convert: `--help` must not import torch (the library
# checks the method again).
METHODS = ("reconstruction", "contribution", "activation")
DEFAULT_SAMPLES = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="dense checkpoint folder, .safetensors file or Hub repo id (org/name)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output folder (must not be the source)")
    parser.add_argument("--calibration", default=None, metavar="DATA",
                        help="calibration corpus: a text file, folder, .jsonl, datasets folder, "
                        "builtin:kjv or prepare-data folder; its training part is read (split as "
                        "`train` splits it), never the held-out part `eval` scores (default: "
                        "SRC's own training data)")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N",
                        help="calibration windows, evenly spaced over the text (default: "
                        "%(default)s)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per calibration window (default: SRC's training seq_len, "
                        "else 128)")
    parser.add_argument("--importance", default="reconstruction", choices=METHODS,
                        help="reconstruction: greedy order whose every prefix best reconstructs "
                        "the full FFN/attention output on the calibration tokens; contribution: "
                        "by the mean norm of what each neuron/head adds to the residual stream; "
                        "activation: Minitron's mean |activation| (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest shard file, decimal units (default: 5GB)")


def run(args: argparse.Namespace) -> int:
    from matformer.slicing.convert import convert

    result = convert(args.src, args.output, calibration=args.calibration, samples=args.samples,
                     seq_len=args.seq_len, method=args.importance, batch_size=args.batch_size,
                     revision=args.revision, device=args.device,
                     max_shard_size=args.max_shard_size, log=print, progress=True)
    print(result.summary())
    return 0
