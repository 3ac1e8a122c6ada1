"""`matformer info` for a Gemma 3n checkpoint: layers, per-layer FFN widths, attention types, KV
sharing and parameters by group, from config.json and the safetensors headers only (no tensor
data is read; neither torch nor transformers is imported)."""

from __future__ import annotations

import os
from typing import Any

from matformer.io.source import Source
from matformer.slicing.gemma3n.plan import describe_runs
from matformer.slicing.gemma3n.shapes import parameter_groups
from matformer.slicing.gemma3n.source import open_source
from matformer.slicing.gemma3n.stream import check_source, file_order


def gemma3n_info(src: str | os.PathLike | Source, revision: str | None = None) -> dict[str, Any]:
    """Everything `matformer info` shows for a Gemma 3n checkpoint (folder or Hub repo id)."""
    source, config, ck = open_source(src, revision)
    with ck:
        tensors = file_order(ck)
        files = [{"name": n, "size": s} for n, s in ck.files]
    check_source(config, tensors, str(source.folder))
    stores = config.kv_stores()
    layout = source.layout
    if layout.index is not None:
        files.insert(0, {"name": layout.index.name, "size": layout.index.stat().st_size})
    dtypes = sorted({d for _, d, _ in tensors})
    return {
        "source": source.describe(),
        "architecture": (config.raw.get("architectures") or ["?"])[0],
        "multimodal": config.multimodal,
        "num_hidden_layers": config.num_layers,
        "hidden_size": config.text["hidden_size"],
        "vocab_size": config.text["vocab_size"],
        "intermediate_size": config.widths,
        "layer_types": config.layer_types,
        "activation_sparsity_pattern": config.text["activation_sparsity_pattern"],
        "num_kv_shared_layers": config.num_kv_shared,
        "kv_shared_layers": list(range(config.first_shared, config.num_layers)),
        "kv_sources": {t: stores[t] for t in sorted(stores)},
        "parameters": parameter_groups({n: s for n, _, s in tensors}, config.prefix),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "files": files,
    }


def format_info(info: dict[str, Any]) -> str:
    p = info["parameters"]
    n, shared = info["num_hidden_layers"], info["num_kv_shared_layers"]
    kv = "none" if not shared else (
        f"layers {n - shared}-{n - 1} reuse the keys/values of "
        + ", ".join(f"layer {i} ({t.removesuffix('_attention')})" for t, i in info["kv_sources"].items()))
    full = [i for i, t in enumerate(info["layer_types"]) if t == "full_attention"]
    sparse = [i for i, x in enumerate(info["activation_sparsity_pattern"]) if x > 0]
    towers = f", vision {p['vision']:,}, audio {p['audio']:,}" if info["multimodal"] else ""
    lines = [
        f"checkpoint       {info['source']} (Gemma 3n, {info['architecture']})",
        f"layers x hidden  {n} x {info['hidden_size']}, vocab {info['vocab_size']}",
        f"FFN widths       {describe_runs(info['intermediate_size'])}",
        f"full attention   layers {full} (the rest sliding)",
        f"KV sharing       {kv}",
        f"sparse FFN       layers {sparse}" if sparse else "sparse FFN       none",
        f"effective params {p['effective']:,} ({p['effective'] / 1e9:.2f}B: the text decoder "
        f"without token and per-layer embeddings)",
        f"other params     token embedding {p['embedding']:,}, per-layer embeddings "
        f"{p['per_layer_embedding']:,}{towers}; total {p['total']:,}",
        f"dtype            {info['dtype']}",
        f"files            {len(info['files'])}, {sum(f['size'] for f in info['files']) / 1e6:.2f} MB",
    ]
    return "\n".join(lines)
