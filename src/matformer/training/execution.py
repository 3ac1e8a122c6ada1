"""How the decoder layers execute: activation checkpointing and torch.compile.

- `checkpoint_layers`: each decoder layer's forward runs under `torch.utils.checkpoint`
  (non-reentrant): its activations are recomputed in backward instead of stored, at the width
  (and KV heads) the forward ran at — backward runs after `at_width` restored them. The layer's
  `forward` is wrapped in place, so parameter names (and checkpoints) do not change.
- `compile_model`: `torch.compile`. The active FFN width is a plain int attribute of each
  `NestedMLP`; dynamo specialises on it and guards it, so each trained width compiles once and
  is then reused from the cache (`trained widths` graphs in all; the cache limit is raised to
  hold them). Without FSDP the whole model compiles (one graph per width); under FSDP2 each
  decoder layer compiles on its own (the shard/unshard hooks between layers stay eager) — the
  layers share one code object, so they share the graphs too.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

# A layer's run-time width settings: the recomputation in backward happens after `at_width` has
# restored them, so it must run at the settings the forward saw.
_SETTINGS = (("mlp", "width"), ("self_attn", "kv_heads"))


def checkpoint_layers(model: nn.Module) -> None:
    for layer in model.model.layers:
        layer.forward = functools.partial(_checkpointed, layer, layer.forward)


def _settings(layer: nn.Module) -> list:
    return [getattr(getattr(layer, m), a, None) for m, a in _SETTINGS]


def _apply(layer: nn.Module, values: list) -> None:
    for (m, a), v in zip(_SETTINGS, values, strict=True):
        if v is not None:
            setattr(getattr(layer, m), a, v)


def _checkpointed(layer: nn.Module, forward, *args):
    seen = _settings(layer)

    def at_seen(*a):
        before = _settings(layer)
        _apply(layer, seen)
        try:
            return forward(*a)
        finally:
            _apply(layer, before)

    return checkpoint(at_seen, *args, use_reentrant=False)


def compile_model(model: nn.Module, backend: str, widths: int, per_layer: bool) -> None:
    """Compile in place (names unchanged); room in dynamo's cache for `widths` graphs per code
    object, plus slack for the evaluation's no-grad graphs."""
    import torch._dynamo

    # The rotary tables are cached per device on first use; a graph traced before that entry
    # exists would be retraced once it does. Fill the cache first.
    model.rotary.inv_freq(next(model.parameters()).device)
    limit = 2 * widths + 4
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    if per_layer:
        for layer in model.model.layers:
            layer.compile(backend=backend)
    else:
        model.compile(backend=backend)
