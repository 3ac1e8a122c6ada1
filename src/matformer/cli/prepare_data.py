"""Tokenize a corpus once into memory-mapped token files for `matformer train --data DIR`.

SRC: a text file, a JSONL file ({"text": ...} per line), a Parquet or Arrow file (a `text`
column), a folder of any of these, or a dataset saved with Hugging Face datasets' save_to_disk.
DIR gets train.bin / val.bin (token ids, each document followed by </s>), tokens.json and the
tokenizer. Documents are streamed (never all in memory; a long one is tokenized in pieces cut at
whitespace, so memory stays bounded), with a progress bar.

examples:
  matformer prepare-data corpus/ -o data/tok                  # trains a 32000-token BPE
  matformer prepare-data shards/ -o data/tok --tokenizer runs/demo   # a checkpoint's tokenizer
  matformer train --data data/tok --preset base --dtype bfloat16 --out runs/base
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="corpus: file, folder, or datasets save_to_disk folder")
    p.add_argument("-o", "--out", required=True, help="new folder for the token files")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or a folder holding one (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="BPE vocabulary to train without --tokenizer (default: %(default)s)")
    p.add_argument("--tokenizer-sample-bytes", type=int, default=100_000_000,
                   help="training text the BPE is learnt from (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="held-out fraction of the documents (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from matformer.data.token_files import prepare

    meta = prepare(args.src, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                   val_fraction=args.val_fraction, split_seed=args.split_seed,
                   progress=not args.quiet)
    print(f"{args.out}: {meta['train_tokens']:,} training tokens ({meta['train_documents']:,} "
          f"documents), {meta['val_tokens']:,} held-out tokens ({meta['val_documents']:,} "
          f"documents), vocab {meta['vocab_size']}, {meta['dtype']}")
    return 0
