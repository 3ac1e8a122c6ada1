"""Held-out evaluation during training.

The windows are `data.heldout_windows(val_tokens, seq_len, eval_windows)`: evenly spaced over the
whole held-out split, the same ones `matformer eval` scores on a checkpoint of this run (it reads
seq_len and eval_windows from the checkpoint's train_config.json). So the last logged val loss of
tier t is `matformer eval OUT --tiers t`'s loss for that tier (tested to 1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from matformer.data import text as D
from matformer.models.lm.config import MatFormerConfig, perplexity
from matformer.models.lm.model import MatFormerLM
from matformer.models.registry import parameter_counts
from matformer.training.points import Key, Point, setting_of, tier_of_key


def heldout(val_tokens: np.ndarray, seq_len: int, max_windows: int,
            device: torch.device) -> tuple[torch.Tensor, str]:
    """The held-out windows (N, T) on `device`, and a line saying what they are."""
    windows = D.heldout_windows(val_tokens, seq_len, max_windows)
    desc = (f"{len(windows)} windows x {seq_len} tokens, evenly spaced over the "
            f"{len(val_tokens):,} held-out tokens")
    return torch.from_numpy(windows).to(device), desc


@torch.no_grad()
def evaluate_tiers(model: MatFormerLM, windows: torch.Tensor, tiers: Sequence[Key],
                   batch_size: int) -> dict[int, float]:
    """Mean held-out loss of each tier over `windows` (N, T) (token-weighted: equal-length windows)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for t in tiers:
            with model.at_width(**setting_of(t)):
                total = 0.0
                for i in range(0, len(windows), batch_size):
                    chunk = windows[i:i + batch_size]
                    total += float(model.loss(chunk)) * len(chunk)
            out[t] = total / len(windows)
    finally:
        model.train(was_training)
    return out


def loss_table(model_cfg: MatFormerConfig, losses: dict[Key, float]) -> str:
    """One row per trained point: tier, FFN width, KV heads, size, loss, perplexity."""
    with_heads = any(isinstance(k, Point) for k in losses)
    rows = ["tier  width" + ("  kv heads" if with_heads else "")
            + "  non-emb params  val loss  perplexity"]
    n = model_cfg.num_hidden_layers
    for k in sorted(losses, key=lambda k: (tier_of_key(k), -setting_of(k).get("kv_heads", 0))):
        t = tier_of_key(k)
        w = model_cfg.base >> t
        g = setting_of(k).get("kv_heads")
        heads = model_cfg.layer_kv_heads if g is None else [g] * n
        ne = parameter_counts(model_cfg, [w] * n, heads)["non_embedding"]
        rows.append(f"{t:>4}  {w:>5}" + (f"  {heads[0]:>8}" if with_heads else "")
                    + f"  {ne:>14,}  {losses[k]:>8.4f}  {perplexity(losses[k]):>10.2f}")
    return "\n".join(rows)
