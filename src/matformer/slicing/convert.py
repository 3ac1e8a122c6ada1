"""MatFormer-ize a dense Llama checkpoint: order its FFN neurons and attention heads by importance.

`convert(src, out)` turns any dense `LlamaForCausalLM`-architecture checkpoint (a folder, a
.safetensors file or a Hub id: anything `io.source.resolve_source` takes) into a MatFormer
checkpoint whose every prefix keeps the most important neurons and heads:

1. importance (one load of the model, forward passes over calibration windows, float32). Neuron
   j of an FFN adds c_j = a_j * down_proj[:, j] to the residual stream (a = silu(gate_proj x) *
   up_proj x); truncating to width m removes exactly sum_{j>=m} c_j. Three orders:
   - `reconstruction` (default): greedy forward selection on the calibration tokens, each next
     neuron the one that most lowers ||sum_all c - sum_prefix c||^2 (`greedy_order`, from the
     Gram matrix <c_j, c_k> = (a_j . a_k)(down_j . down_k), I x I per layer). It scores sets, not
     neurons: neurons whose outputs cancel or repeat each other are not all put first. It needs
     I^2 float64 numbers per layer (refused above `MAX_GRAM_BYTES`: use `contribution` there).
   - `contribution`: by mean_tokens ||c_j|| = mean |a_j| * ||down[:, j]|| alone.
   - `activation`: Minitron's score mean_tokens |a_j| (ignores the down column's scale).
   Heads: query head h adds c_h = o_proj[:, h] y_h (y_h its attention output); a KV group (one
   key/value head and its r query heads) adds the sum of its heads'. Heads nest by KV group
   (issue 11: the first g groups run), so the groups are ordered (greedy on the groups' Gram
   matrix, or by the sum of their heads' scores: mean ||c_h||, Minitron's mean ||y_h|| for
   `activation`), and the query heads inside each group by their scores.
   Measured on small models in docs/RESULTS.md: reconstruction keeps the most at narrow widths.
2. permutation, exact: gate_proj/up_proj rows and down_proj columns by the FFN order; q_proj
   rows and o_proj columns by head (hd rows/columns each), k_proj/v_proj rows by KV group, q/k/v
   biases (Qwen2) with their rows; o_proj's bias and Qwen3's q/k norms (one weight over
   head_dim, the same for every head) stay as they are. Every
   neuron and head computes what it did, in another place, so the converted model at tier 0 (all
   heads) computes the original function (logits equal up to float summation order).
3. streamed write: the source tensors are memory-mapped, and each output tensor is permuted and
   written by `io.checkpoint.write_checkpoint` one at a time (peak memory: one tensor beside the
   maps). The output config is the source's with the MatFormer keys (base width = the stored
   width, tier 0, base KV heads = the stored ones); the tokenizer and the other companion files
   are copied; `convert_report.json` records the method, the calibration data and the orders.

The output can be sliced, evaluated at any tier, or fine-tuned with the nested objectives and
distillation from the source (`matformer train --init-from OUT --distill SRC`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from matformer.data import text as D
from matformer.data.splits import TRAIN, corpus_part
from matformer.errors import CheckpointError, ConfigError, DataError
from matformer.io.checkpoint import load_model, load_state_dict, parse_size, write_checkpoint
from matformer.io.outputs import check_output_folder
from matformer.io.safetensors import st_dtype
from matformer.io.source import COMPANION_FILES, Source, resolve_source
from matformer.models.devices import check_device
from matformer.models.lm.model import MatFormerLM
from matformer.models.registry import GEMMA3, LLAMA_BLOCK, Config

METHODS = ("reconstruction", "contribution", "activation")
REPORT_NAME = "convert_report.json"
MAX_GRAM_BYTES = 16 * 2**30
"""reconstruction keeps an I x I float64 Gram matrix per layer; more than this in all is refused."""
DEFAULT_SAMPLES = 128


# ---- importance ------------------------------------------------------------------------------


@dataclass
class Importance:
    """Scores of every FFN neuron (per layer: (I,)) and query head (per layer: (n_heads,))."""

    ffn: list[torch.Tensor]
    heads: list[torch.Tensor]
    method: str
    tokens: int
    ffn_gram: list[torch.Tensor] | None = None
    """reconstruction: per layer, <c_j, c_k> summed over tokens, c_j = a_j down[:, j] (I, I)."""
    group_gram: list[torch.Tensor] | None = None
    """reconstruction: per layer, the same for the KV groups' attention contributions (G, G)."""


class _HeadRecorder(TorchFunctionMode):
    """Records each query head's score from the attention output `scaled_dot_product_attention`
    returns, in the layer a forward pre-hook named (`layer`)."""

    def __init__(self, method: str, scores: list[torch.Tensor],
                 grams: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.method, self.scores, self.grams = method, scores, grams
        self.layer: Any = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "scaled_dot_product_attention" and self.layer is not None:
            self._record(out.detach())
        return out

    def _record(self, y: torch.Tensor) -> None:  # y: (B, nh, T, hd)
        """Every head at once (one batched matmul; a loop over heads cost more than the layer's
        attention): c_h = o_proj[:, h] y_h, float32, scores and Gram accumulated in float64."""
        attn = self.layer.self_attn
        b, nh, t, hd = y.shape
        wo = attn.o_proj.weight.detach().float()  # (H, nh * hd)
        yf = y.float()
        c = torch.einsum("bnth,onh->bnto", yf, wo.view(wo.shape[0], nh, hd))  # (B, nh, T, H)
        scored = yf if self.method == "activation" else c
        self.scores[attn.layer_idx] += scored.norm(dim=-1).sum(dim=(0, 2), dtype=torch.float64)
        if self.grams is not None:
            groups = c.view(b, nh // attn.group, attn.group, t, -1).sum(2)  # (B, G, T, H)
            flat = groups.transpose(0, 1).reshape(groups.shape[1], -1)  # (G, B*T*H)
            self.grams[attn.layer_idx] += (flat @ flat.T).double()
        self.layer = None


def _score_ffn(acc: torch.Tensor, gram: torch.Tensor | None, down: Any, args: tuple) -> None:
    """Forward pre-hook of a NestedMLP's down_proj (at the stored width the MLP calls it with its
    activations a = act(gate_proj x) * up_proj x: read, never recomputed): add sum |a_j| over
    the input's tokens to `acc`, and a^T a to `gram` (float32, in place: a float64 GEMM, or a
    float64 copy of each batch's product, cost as much as the forward itself; the sums over a
    few hundred batches lose ~1e-6 relative, far below the gaps the greedy order compares)."""
    a = args[0].detach().float()
    a = a.reshape(-1, a.shape[-1])  # (tokens, I)
    acc += a.abs().sum(0, dtype=torch.float64)
    if gram is not None:
        gram.addmm_(a.T, a)  # in place: no (I, I) temporary per batch


@torch.no_grad()
def measure_importance(model: MatFormerLM, windows: torch.Tensor, method: str = "reconstruction",
                       batch_size: int = 8, progress: bool = False) -> Importance:
    """Importance of every FFN neuron and query head of `model` (at its stored widths and heads)
    over `windows` (N, T) of token ids; see the module docstring for the scores. `progress`: a
    progress bar on stderr, one step per calibration batch (a 135M model took 11 minutes for
    16K tokens on a busy CPU, silently, before)."""
    if method not in METHODS:
        raise ConfigError(f"importance method must be one of {', '.join(METHODS)}, got {method!r}")
    layers = list(model.model.layers)
    need = sum(layer.mlp.stored_width ** 2 * 8 for layer in layers)
    if method == "reconstruction" and need > MAX_GRAM_BYTES:
        raise ConfigError(f"importance 'reconstruction' needs {need / 2**30:.1f} GiB of Gram "
                          f"matrices for this model (more than {MAX_GRAM_BYTES // 2**30} GiB); "
                          f"use --importance contribution")
    ffn = [torch.zeros(layer.mlp.stored_width, dtype=torch.float64) for layer in layers]
    heads = [torch.zeros(layer.self_attn.stored_kv_heads * layer.self_attn.group,
                         dtype=torch.float64) for layer in layers]
    recon = method == "reconstruction"
    ffn_gram = [torch.zeros(len(s), len(s)) for s in ffn] if recon else None  # float32 sums
    group_gram = [torch.zeros(len(s) // layer.self_attn.group, len(s) // layer.self_attn.group,
                              dtype=torch.float64) for s, layer in zip(heads, layers, strict=True)
                  ] if recon else None
    recorder = _HeadRecorder(method, heads, group_gram)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(
            partial(_score_ffn, ffn[i], ffn_gram[i] if ffn_gram else None)))
        handles.append(layer.self_attn.register_forward_pre_hook(
            lambda mod, args, layer=layer: setattr(recorder, "layer", layer)))
    was_training, setting = model.training, model.setting
    model.eval()
    model.set_widths()  # the stored model: every neuron and head runs
    tokens = 0
    try:
        with recorder, tqdm(total=len(windows) * windows.shape[-1], unit="tok", unit_scale=True,
                            desc=f"importance ({method})", file=sys.stderr,
                            disable=not progress) as bar:
            for i in range(0, len(windows), batch_size):
                chunk = windows[i:i + batch_size]
                model(chunk)
                tokens += chunk.numel()
                bar.update(chunk.numel())
    finally:
        for h in handles:
            h.remove()
        model.set_widths(**setting)
        model.train(was_training)
    if tokens == 0:
        raise DataError("no calibration windows to measure importance on")
    if any(float(s.sum()) == 0.0 for s in heads):
        raise CheckpointError("attention head scores were not recorded (the model's attention "
                              "no longer calls scaled_dot_product_attention)")
    if any(float(s.sum()) == 0.0 for s in ffn):
        raise CheckpointError("FFN activations were not recorded (the MLP no longer calls "
                              "down_proj at its stored width)")
    for i, (scores, layer) in enumerate(zip(ffn, layers, strict=True)):
        d = layer.mlp.down_proj.weight.double()
        if method != "activation":  # mean |a_j| ||down[:, j]||
            scores *= d.norm(dim=0)
        if ffn_gram is not None:  # a^T a -> <c_j, c_k> = (a_j . a_k)(down_j . down_k)
            ffn_gram[i] = ffn_gram[i].double() * (d.T @ d)
    for gram in (ffn_gram or []) + (group_gram or []):  # exactly symmetric (the GEMM's halves
        gram.copy_((gram + gram.T) / 2)  # may round apart): greedy_orders reads rows
    return Importance([s / tokens for s in ffn], [s / tokens for s in heads], method, tokens,
                      ffn_gram, group_gram)


# ---- the permutation -------------------------------------------------------------------------


@dataclass
class Permutation:
    """Per layer, the source index at each new position: FFN neurons, KV groups, query heads."""

    ffn: list[list[int]]
    kv: list[list[int]]
    heads: list[list[int]]

    def is_identity(self) -> bool:
        return all(p == sorted(p) for p in self.ffn + self.kv + self.heads)


def _descending(scores: torch.Tensor) -> list[int]:
    """Indices by decreasing score; ties keep the original order (stable)."""
    return [int(i) for i in torch.sort(-scores, stable=True).indices]


def greedy_order(gram: torch.Tensor) -> list[int]:
    """Forward selection: the order whose every prefix S best reconstructs the sum Y of all items
    (min ||Y - sum_{j in S} c_j||^2 over the calibration tokens, each item kept as it is), from
    the Gram matrix gram[j, k] = <c_j, c_k>. Adding j to S lowers the error by
    2 <Y - sum_S c, c_j> - ||c_j||^2; the residual products are updated in O(n) per step."""
    return greedy_orders([gram])[0]


GREEDY_BATCH_BYTES = 256 * 2**20
"""Gram matrices ordered together (stacked, one copy) in `greedy_orders`: at most this much."""


def greedy_orders(grams: list[torch.Tensor]) -> list[list[int]]:
    """`greedy_order` of each Gram matrix; those of one size run together, a batch of layers per
    step (n steps of a few tensor ops for the batch, not for each layer: 30 layers of 1536
    neurons took 6 s one at a time). Ties go to the lowest index, as `argmax` breaks them."""
    orders: list[list[int]] = [[] for _ in grams]
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        by_size.setdefault(g.shape[0], []).append(i)
    for n, idx in by_size.items():
        per = max(1, GREEDY_BATCH_BYTES // max(1, n * n * grams[idx[0]].element_size()))
        for c in range(0, len(idx), per):
            chunk = idx[c:c + per]
            for i, order in zip(chunk, _greedy_batch(torch.stack([grams[i] for i in chunk])),
                                strict=True):
                orders[i] = order
    return orders


def _greedy_batch(gram: torch.Tensor) -> list[list[int]]:
    """Forward selection on a batch of symmetric Gram matrices (L, n, n) at once: a few dense
    ops per step (row j of each matrix by index_select on the flattened stack, `taken` by
    scatter; advanced indexing cost more than the arithmetic)."""
    L, n = gram.shape[0], gram.shape[1]
    flat = gram.reshape(L * n, n)
    first = torch.arange(L) * n  # row 0 of each matrix in `flat`
    residual = gram.sum(2)  # (L, n): <Y - sum_S c, c_j>, S empty
    diag = gram.diagonal(dim1=1, dim2=2).clone()
    taken = torch.zeros(L, n, dtype=torch.bool)
    picked = []
    for _ in range(n):
        gain = (2 * residual - diag).masked_fill_(taken, -math.inf)
        j = gain.argmax(1)  # (L,)
        picked.append(j)
        taken.scatter_(1, j[:, None], True)
        residual -= flat.index_select(0, first + j)  # row j = column j (symmetric)
    return torch.stack(picked, 1).tolist()


def importance_order(imp: Importance, group_size: int) -> Permutation:
    """The most important first. reconstruction: FFN neurons and KV groups in the greedy order of
    their contributions (`greedy_order`); otherwise by score, a KV group scoring the sum of its
    query heads. Inside each group its query heads by score."""
    kv, heads = [], []
    for i, s in enumerate(imp.heads):
        groups = s.view(-1, group_size)  # (G, r)
        order = (greedy_order(imp.group_gram[i]) if imp.group_gram is not None
                 else _descending(groups.sum(1)))
        kv.append(order)
        heads.append([g * group_size + int(j) for g in order for j in _descending(groups[g])])
    ffn = (greedy_orders(imp.ffn_gram) if imp.ffn_gram is not None
           else [_descending(s) for s in imp.ffn])
    return Permutation(ffn=ffn, kv=kv, heads=heads)


def _rows(order: list[int], block: int) -> torch.Tensor:
    """Row indices of whole blocks of `block` rows in `order`."""
    idx = torch.tensor(order, dtype=torch.long)
    return (idx[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def permute_tensor(name: str, tensor: torch.Tensor, perm: Permutation, head_dim: int) -> torch.Tensor:
    """`tensor` of the checkpoint key `name` with the permutation applied (others unchanged)."""
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return tensor
    i, proj = int(parts[2]), parts[4]
    index: torch.Tensor | None = None
    dim = 0
    if tensor.dim() == 1 and proj in ("down_proj", "o_proj"):
        return tensor  # a bias over the hidden size: not permuted (q/k norms: not projections)
    if proj in ("gate_proj", "up_proj", "down_proj"):
        index, dim = torch.tensor(perm.ffn[i], dtype=torch.long), int(proj == "down_proj")
    elif proj in ("q_proj", "o_proj"):
        index, dim = _rows(perm.heads[i], head_dim), int(proj == "o_proj")
    elif proj in ("k_proj", "v_proj"):
        index = _rows(perm.kv[i], head_dim)
    if index is None:
        return tensor
    return tensor.index_select(dim, index)


# ---- calibration data ------------------------------------------------------------------------


def calibration_windows(source: Source, calibration: str | os.PathLike | None, samples: int,
                        seq_len: int, cache_dir: str | os.PathLike | None = None
                        ) -> tuple[torch.Tensor, str]:
    """(windows (n, seq_len), what they are): `samples` evenly spaced windows of the *training*
    part of `calibration` (default: the data the source was trained on, per its
    train_config.json; the default corpus otherwise), tokenized with the source's tokenizer and
    split as training splits it (`data.splits`), so held-out evaluation (`matformer eval`, which
    scores the held-out part) never sees calibration text."""
    if samples < 1:
        raise ConfigError(f"--samples must be a positive number of windows, got {samples}")
    tok_file = source.require_tokenizer()
    tok = D.load_tokenizer(tok_file.parent)
    data = calibration if calibration is not None else D.training_data(source.folder)
    part = corpus_part(data, tok, TRAIN, checkpoints=[source.folder], tokenizer_file=tok_file,
                       cache_dir=cache_dir)
    tokens, what = part.tokens, part.description
    if len(tokens) < seq_len:
        raise DataError(f"{what}: fewer than one calibration window of {seq_len} tokens; give "
                        f"more --calibration text or a smaller --seq-len")
    windows = D.heldout_windows(tokens, seq_len, samples)
    return torch.from_numpy(windows), (f"{len(windows)} windows x {seq_len} tokens evenly spaced "
                                       f"over the {what}")


# ---- convert ---------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    out: Path
    source: str
    method: str
    calibration: str
    tokens: int
    permutation: Permutation
    max_abs_logit_diff: float
    """Tier 0 of the output against the source, on the first calibration window (float32)."""
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        moved = [sum(1 for j, p in enumerate(order) if j != p) for order in self.permutation.ffn]
        groups = [o for o in self.permutation.kv]
        return "\n".join([
            f"converted {self.source} -> {self.out}",
            f"importance: {self.method}, on {self.calibration} ({self.tokens:,} tokens)",
            f"FFN neurons moved per layer: {moved}",
            f"KV group order per layer: {groups}",
            f"check: tier 0 of the output vs the source, max |logit difference| "
            f"{self.max_abs_logit_diff:.2e} (float32)",
            "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items()),
        ])


def _check_dense(source: Source) -> Config:
    cfg = source.config
    if cfg.layer_widths != [cfg.base] * cfg.num_hidden_layers:
        raise ConfigError(f"{source.describe()}: stores FFN widths {cfg.layer_widths} of base "
                          f"{cfg.base}; convert takes a dense checkpoint (every layer at its full "
                          f"width), e.g. the source the slice was cut from")
    if cfg.layer_kv_heads != [cfg.base_kv_heads] * cfg.num_hidden_layers:
        raise ConfigError(f"{source.describe()}: stores {cfg.layer_kv_heads} KV heads of "
                          f"{cfg.base_kv_heads}; convert takes a dense checkpoint with all its heads")
    return cfg


def _check_counts(**counts: Any) -> None:
    """--samples, --batch-size, --seq-len: positive integers (None: the default), bounded."""
    for key, v in counts.items():
        if v is None and key == "seq_len":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**24:
            raise ConfigError(f"--{key.replace('_', '-')} must be a positive integer (at most "
                              f"{2**24}), got {str(v)[:40]}")


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def convert(src: str | os.PathLike | Source, out: str | os.PathLike, *,
            calibration: str | os.PathLike | None = None, samples: int = DEFAULT_SAMPLES,
            seq_len: int | None = None, method: str = "reconstruction", batch_size: int = 8,
            revision: str | None = None, device: str | None = None,
            cache_dir: str | os.PathLike | None = None, max_shard_size: int | str = "5GB",
            log: Callable[[str], None] | None = None, progress: bool = False) -> ConvertResult:
    """Write the importance-ordered MatFormer version of the dense checkpoint `src` to `out`
    (`log`: progress lines; `progress`: a progress bar of the importance pass on stderr)."""
    say = log or (lambda _m: None)
    if method not in METHODS:
        raise ConfigError(f"importance method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_counts(samples=samples, batch_size=batch_size, seq_len=seq_len)
    parse_size(max_shard_size)  # a bad size fails now, not after the importance pass
    check_device(device)
    source = resolve_source(src, revision=revision, companions=True)
    if source.family not in (*LLAMA_BLOCK, GEMMA3):
        raise ConfigError(f"{source.describe()}: a {type(source.config).__name__} checkpoint "
                          f"(family {source.family.name}); convert orders the FFN and heads of a "
                          f"dense language model on the Llama block (Llama, Mistral, Qwen2, "
                          f"Qwen3) or Gemma 3 only")
    config = _check_dense(source)
    if _same_folder(source.folder, Path(out)):
        raise CheckpointError(f"{out}: is the source checkpoint; write the converted model to "
                              f"another folder (the source stays as it is)")
    check_output_folder(out, protect=[*source.inputs(), calibration])
    seq_len = min(seq_len or D.heldout_shape(D.training_settings(source.folder))[0],
                  config.max_position_embeddings)
    t0 = time.time()
    windows, what = calibration_windows(source, calibration, samples, seq_len, cache_dir)
    say(f"calibration: {what}")
    model = load_model(source, dtype=torch.float32, device=device)
    windows = windows.to(model.model.embed_tokens.weight.device)
    t1 = time.time()
    imp = measure_importance(model, windows, method, batch_size, progress)
    with torch.no_grad():
        reference = model(windows[:1]).cpu()
    del model
    perm = importance_order(imp, config.group_size)
    t2 = time.time()
    say(f"importance measured on {imp.tokens:,} tokens ({t2 - t1:.1f}s); writing {out}")
    _write(source, config, perm, out, max_shard_size,
           _report(source, imp, perm, what, calibration, samples, seq_len))
    t3 = time.time()
    check = load_model(out, dtype=torch.float32, device=device)
    with torch.no_grad():
        diff = float((check(windows[:1]).cpu() - reference).abs().max())
    return ConvertResult(out=Path(out), source=source.describe(), method=method, calibration=what,
                         tokens=imp.tokens, permutation=perm, max_abs_logit_diff=diff,
                         seconds={"calibration data": t1 - t0, "importance": t2 - t1,
                                  "write": t3 - t2, "check": time.time() - t3})


def _write(source: Source, config: Config, perm: Permutation, out: str | os.PathLike,
           max_shard_size: int | str, report: bytes) -> Path:
    """Stream the permuted tensors into `out` (one in memory at a time), companions beside them."""
    sd = load_state_dict(source)  # memory-mapped
    names = [n for n in sd if not n.endswith("rotary_emb.inv_freq")]
    specs = [(n, st_dtype(sd[n].dtype), tuple(sd[n].shape)) for n in names]
    hd = config.head_dim
    assert hd is not None
    extra: dict[str, str | os.PathLike | bytes] = {
        name: source.folder / name for name in COMPANION_FILES if (source.folder / name).is_file()}
    extra[REPORT_NAME] = report
    out_config = type(config).from_dict(config.to_dict())
    return write_checkpoint(out, out_config, specs, lambda n: permute_tensor(n, sd[n], perm, hd),
                            max_shard_size=max_shard_size, extra_files=extra)


def _report(source: Source, imp: Importance, perm: Permutation, what: str,
            calibration: str | os.PathLike | None, samples: int, seq_len: int) -> bytes:
    def stats(scores: list[torch.Tensor]) -> list[dict[str, float]]:
        return [{"max": float(s.max()), "median": float(s.median()), "min": float(s.min())}
                for s in scores]

    doc = {
        "source": source.describe(), "method": imp.method, "calibration": what,
        "calibration_data": None if calibration is None else str(calibration),
        "calibration_split": TRAIN,
        "samples": samples, "seq_len": seq_len, "tokens": imp.tokens,
        "ffn_score_stats": stats(imp.ffn), "head_scores": [[float(x) for x in s] for s in imp.heads],
        "order": {"ffn": perm.ffn, "kv_groups": perm.kv, "query_heads": perm.heads},
        "note": "order[k][i][j] is the source index now at position j of layer i",
    }
    return (json.dumps(doc) + "\n").encode()
