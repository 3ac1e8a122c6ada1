"""A `Gemma3ForConditionalGeneration` folder (Gemma 3 4B/12B/27B: text + vision) as a checkpoint
source: its text model, extracted once into a normal `Gemma3ForCausalLM` folder.

Why: matformer nests and deploys the language model; the vision tower and projector are not
part of it. transformers itself does not load such a checkpoint into `Gemma3ForCausalLM` (its
tensors are named `language_model.model.*`: every weight would be missing and random), so the
text part is written as transformers would write a `Gemma3ForCausalLM`:

- `config.json`: the `text_config` (`model_type: gemma3_text`, the keys transformers' defaults
  fill written out, the outer `tie_word_embeddings` and dtype);
- `model.safetensors`: the `language_model.model.*` (older saves) or `model.language_model.*`
  tensors renamed `model.*`, an untied `lm_head.weight` kept; vision_tower and
  multi_modal_projector left out; stored dtype kept, one tensor in memory at a time (read by
  `io.tensors.TensorReader`);
- the tokenizer files copied; `gemma3_text_source.json` says where it came from.

`text_checkpoint(p)` is what `io.source` calls for a local folder: None unless its config.json
is a `gemma3` (multimodal) config; else the folder in the cache (`$MATFORMER_CACHE/gemma3-text/`
or `~/.cache/matformer/gemma3-text/`), keyed by the config and the weight files' sizes and
mtimes, written the first time and reused after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError
from matformer.io.atomic import atomic_write
from matformer.io.files import read_json
from matformer.io.layout import CONFIG_NAME, INDEX_NAME, open_checkpoint, resolve_files
from matformer.io.safetensors import write_file
from matformer.io.swap import atomic_folder
from matformer.io.tensors import ReadJob, TensorReader
from matformer.models.gemma3.config import MULTIMODAL_TYPE, text_part
from matformer.models.registry import config_from_dict

MARKER = "gemma3_text_source.json"
VERSION = 1
"""Part of the cache key: bump it when what is written changes."""
WEIGHTS = "model.safetensors"
TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
"""Where a multimodal save keeps the text decoder (transformers 4.5x and 5 save the first)."""
LM_HEADS = ("language_model.lm_head.weight", "lm_head.weight")
COMPANIONS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "tokenizer.model", "chat_template.jinja",
              "chat_template.json")


def is_multimodal(folder: Path) -> bool:
    """Whether `folder` holds a Gemma3ForConditionalGeneration config.json."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        d = read_json(path)
    except CheckpointError:
        return False  # the normal reader reports it
    return isinstance(d, dict) and d.get("model_type") == MULTIMODAL_TYPE


def text_name(name: str, tied: bool) -> str | None:
    """The `Gemma3ForCausalLM` name of a multimodal tensor, None for one left out."""
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name in LM_HEADS and not tied:
        return "lm_head.weight"
    return None


def cache_root() -> Path:
    env = os.environ.get("MATFORMER_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "matformer") / "gemma3-text"


def _key(folder: Path, config_bytes: bytes, files: list[str]) -> str:
    h = hashlib.sha256(config_bytes)
    for name in sorted(files):
        st = os.stat(folder / name)
        h.update(json.dumps([VERSION, name, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()[:20]


def _write(src: Path, out: Path, outer: dict[str, Any]) -> Path:
    config = text_part(outer, str(src / CONFIG_NAME))
    source = f"{src / CONFIG_NAME} (text_config)"
    parsed = config_from_dict(dict(config), source=source)  # refused before anything is written
    tied = parsed.tie_word_embeddings
    layout = resolve_files(src)
    if layout.pickle:
        raise CheckpointError(f"{src}: holds pickle (.bin) weights; matformer reads safetensors")
    ck = open_checkpoint(layout)
    try:
        renamed = {new: name for name in ck.where
                   if (new := text_name(name, tied)) is not None}
        if not renamed:
            raise CheckpointError(f"{src}: a Gemma3ForConditionalGeneration config but no "
                                  f"tensor under {' or '.join(TEXT_PREFIXES)}")
        specs = [(new, ck.info(old).dtype, tuple(ck.info(old).shape))
                 for new, old in sorted(renamed.items())]
        with TensorReader(ck) as reader:
            def fill(tmp: Path) -> set[str]:
                write_file(tmp / WEIGHTS, specs, lambda n: reader.read(ReadJob(renamed[n])),
                           metadata={"format": "pt"})
                copied = set()
                for name in COMPANIONS:
                    if (src / name).is_file():
                        shutil.copyfile(src / name, tmp / name)
                        copied.add(name)
                atomic_write(tmp / MARKER, json.dumps(
                    {"source": str(src.resolve()), "version": VERSION}, indent=2) + "\n")
                atomic_write(tmp / CONFIG_NAME,
                             json.dumps(parsed.to_dict(), indent=2, sort_keys=True) + "\n")
                return {WEIGHTS, MARKER, CONFIG_NAME, *copied}

            return atomic_folder(out, fill, lambda _f: {WEIGHTS, MARKER, CONFIG_NAME, INDEX_NAME,
                                                        *COMPANIONS})
    finally:
        ck.close()


def text_checkpoint(p: str | os.PathLike, *,
                    cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The Gemma3ForCausalLM folder of the multimodal checkpoint folder `p` (extracted into the
    cache the first time, reused after); None when `p` is not one."""
    src = Path(p)
    if not src.is_dir() or not is_multimodal(src):
        return None
    config_bytes = (src / CONFIG_NAME).read_bytes()
    outer = read_json(src / CONFIG_NAME)
    layout = resolve_files(src)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / f"{src.resolve().name[:80]}-{_key(src, config_bytes, list(layout.shards))}"
    if (folder / MARKER).is_file() and (folder / CONFIG_NAME).is_file():
        return folder
    print(f"matformer: {src} is a Gemma3ForConditionalGeneration checkpoint; writing its text "
          f"model to {folder} (once; later runs reuse it)", file=sys.stderr, flush=True)
    return _write(src, folder, outer)
