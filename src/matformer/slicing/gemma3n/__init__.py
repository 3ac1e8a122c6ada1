"""Gemma 3n in: `matformer slice` and `matformer info` on Hugging Face Gemma 3n checkpoints
(docs/GEMMA3N.md).

- `slice_gemma3n(src, out, widths=/layer_tiers=/tier=, skip_layers=, config_csv=, config_name=)`
  cuts per-layer FFN widths and layers out of a Gemma 3n folder, streamed tensor by tensor;
- `gemma3n_info(src)` describes one from config.json and the headers (no torch import);
- SRC is a folder or a Hub repo id, resolved by `io.source.resolve_source`; the `slice` and
  `info` verbs hand SRC here when the resolved `Source.family` is `models.registry.GEMMA3N`.
"""

from __future__ import annotations

from matformer.slicing.gemma3n.config import Gemma3nConfig, read_config
from matformer.slicing.gemma3n.info import format_info, gemma3n_info
from matformer.slicing.gemma3n.plan import Gemma3nPlan, plan_gemma3n
from matformer.slicing.gemma3n.slicer import Gemma3nSliceResult, slice_gemma3n
from matformer.slicing.gemma3n.slicing_configs import (
    SlicingConfig,
    parse_expression,
    read_slicing_config,
)

__all__ = [
    "Gemma3nConfig",
    "Gemma3nPlan",
    "Gemma3nSliceResult",
    "SlicingConfig",
    "format_info",
    "gemma3n_info",
    "parse_expression",
    "plan_gemma3n",
    "read_config",
    "read_slicing_config",
    "slice_gemma3n",
]
