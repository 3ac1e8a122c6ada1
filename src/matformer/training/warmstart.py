"""Starting a run from a checkpoint's weights: `matformer train --init-from SRC`.

SRC (anything `io.source.resolve_source` takes; typically `matformer convert`'s output) gives the
run its architecture (config.json), its tokenizer and its initial weights; `--preset` and the
tokenizer training are not used. The optimizer, data order and schedule start fresh (this is not
`--resume`). SRC must store its full width and all its heads: nested training trains prefixes
of the full model.
"""

from __future__ import annotations

import os
from typing import Any

from matformer.data import text as D
from matformer.errors import ConfigError
from matformer.io.source import Source, resolve_source
from matformer.models.registry import Config


def init_source(src: str | os.PathLike) -> Source:
    """The checkpoint to start from, checked to be full width with its tokenizer."""
    source = resolve_source(src, companions=True)
    cfg = source.config
    if cfg.layer_widths != [cfg.base] * cfg.num_hidden_layers or \
            cfg.layer_kv_heads != [cfg.base_kv_heads] * cfg.num_hidden_layers:
        raise ConfigError(f"--init-from {source.describe()}: stores FFN widths {cfg.layer_widths} "
                          f"and KV heads {cfg.layer_kv_heads} of base {cfg.base} / "
                          f"{cfg.base_kv_heads}; nested training starts from a full-width model")
    source.require_tokenizer()
    return source


def init_tokenizer(source: Source) -> Any:
    return D.load_tokenizer(source.folder)


def init_model_config(source: Source, vocab_size: int, seq_len: int) -> Config:
    """The run's model: SRC's config, trained in float32 (master weights)."""
    d = source.config.to_dict()
    d.pop("matformer_tier", None)
    d["torch_dtype"] = "float32"
    mc = type(source.config).from_dict(d, source=str(source.config_path))  # SRC's family
    if vocab_size > mc.vocab_size:
        raise ConfigError(f"--init-from {source.describe()}: its tokenizer has {vocab_size} tokens "
                          f"but the model only {mc.vocab_size} embeddings")
    if seq_len > mc.max_position_embeddings:
        raise ConfigError(f"seq_len={seq_len} exceeds --init-from {source.describe()}'s "
                          f"max_position_embeddings={mc.max_position_embeddings}; lower --seq-len")
    return mc
