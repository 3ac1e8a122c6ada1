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

from .. import data as D
from ..config import MatFormerConfig, perplexity
from ..model import MatFormerLM, parameter_counts


def heldout(val_tokens: np.ndarray, seq_len: int, max_windows: int,
            device: torch.device) -> tuple[torch.Tensor, str]:
    """The held-out windows (N, T) on `device`, and a line saying what they are."""
    windows = D.heldout_windows(val_tokens, seq_len, max_windows)
    desc = (f"{len(windows)} windows x {seq_len} tokens, evenly spaced over the "
            f"{len(val_tokens):,} held-out tokens")
    return torch.from_numpy(windows).to(device), desc


@torch.no_grad()
def evaluate_tiers(model: MatFormerLM, windows: torch.Tensor, tiers: Sequence[int],
                   batch_size: int) -> dict[int, float]:
    """Mean held-out loss of each tier over `windows` (N, T) (token-weighted: equal-length windows)."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for t in tiers:
            with model.at_width(tier=t):
                total = 0.0
                for i in range(0, len(windows), batch_size):
                    chunk = windows[i:i + batch_size]
                    total += float(model.loss(chunk)) * len(chunk)
            out[t] = total / len(windows)
    finally:
        model.train(was_training)
    return out


def loss_table(model_cfg: MatFormerConfig, losses: dict[int, float]) -> str:
    rows = ["tier  width  non-emb params  val loss  perplexity"]
    for t in sorted(losses):
        w = model_cfg.base >> t
        ne = parameter_counts(model_cfg, [w] * model_cfg.num_hidden_layers)["non_embedding"]
        rows.append(f"{t:>4}  {w:>5}  {ne:>14,}  {losses[t]:>8.4f}  {perplexity(losses[t]):>10.2f}")
    return "\n".join(rows)
