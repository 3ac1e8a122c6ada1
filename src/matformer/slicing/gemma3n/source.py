"""What a Gemma 3n SRC is: a checkpoint folder or a Hub repo id, resolved by the one resolver
(`io.source.resolve_source`: a Hub repo's config.json, index and shards, plus the companion
files a slice carries, all pinned to one commit), then its config.json read as Gemma 3n and its
safetensors headers validated. Slicing and `info` both start here."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from matformer.errors import CheckpointError
from matformer.io.layout import Checkpoint, open_checkpoint
from matformer.io.source import Source, resolve_source
from matformer.slicing.gemma3n.config import Gemma3nConfig, read_config

# Copied unchanged into a slice (and so fetched with the weights of a Hub repo to slice).
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def open_source(src: str | os.PathLike | Source, revision: str | None = None,
                companions: Sequence[str] = ()) -> tuple[Source, Gemma3nConfig, Checkpoint]:
    """The resolved source (Hub: with the `companions` fetched), its Gemma 3n config, and its
    validated safetensors headers (the caller closes the Checkpoint)."""
    source = resolve_source(src, revision=revision, companions=tuple(companions))
    config = read_config(source.folder)
    if source.layout.pickle:
        raise CheckpointError(f"{source.folder}: only pickle (.bin) weights; matformer reads Gemma "
                              f"3n checkpoints from safetensors")
    return source, config, open_checkpoint(source.layout)


def companions_of(source: Source) -> dict[str, Path]:
    """The companion files present beside the weights, by name."""
    found = {name: source.companion(name) for name in COMPANION_FILES}
    return {name: path for name, path in found.items() if path is not None}
