"""What the step logs measure beyond the loss: model FLOPs, MFU, peak memory, TensorBoard.

Model FLOPs per token of a forward + backward at FFN width w (PaLM's accounting, as the GPU
benchmark and its transformers reference use): 6 * N(w) + 12 * L * H * T, with N(w) the matmul
parameters at that width (attention, FFN, lm_head; not the embedding lookup) and the attention
scores counted in full (no causal halving). A step's FLOPs are summed over every rank's plan
(plans are known on every rank), so MFU = FLOPs / time / (peak * world size).

Peak FLOP/s: `--peak-tflops`, else the dense bf16 tensor-core peak of the CUDA device by name
(the table below), else unknown (no MFU is logged, e.g. on a CPU).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch

from matformer.errors import ConfigError
from matformer.models.lm.config import MatFormerConfig
from matformer.training.objective import step_plan
from matformer.training.points import tier_of_key

# Dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
# Order matters: the first substring found in the device name wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("V100", 125.0))


def flops_per_token(cfg: MatFormerConfig, width: int, seq_len: int) -> float:
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    attn = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    n = L * (attn + 3 * h * width) + cfg.vocab_size * h
    return 6.0 * n + 12.0 * L * h * seq_len


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device, None when unknown."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


class TensorBoard:
    """Scalars under OUT/tensorboard (rank 0), when asked for."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                              "'matformer[tensorboard]' (or run without --tensorboard)") from None
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Model FLOPs of the steps run so far (every rank's plan) -> MFU, and peak memory."""

    def __init__(self, model_cfg: MatFormerConfig, cfg: Any, dist: Any) -> None:
        self.model_cfg, self.cfg, self.dist = model_cfg, cfg, dist
        self.peak = peak_flops(dist.device, cfg.peak_tflops)
        self.flops = 0.0
        self._per_token: dict[int, float] = {}

    def add(self, step: int) -> None:
        tokens = self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum
        for r in range(self.dist.world):
            for t, _ in step_plan(self.cfg, self.model_cfg.base, step, r, self.dist.world,
                                  kv_base=self.model_cfg.base_kv_heads):
                if t not in self._per_token:  # (at the stored heads: an upper bound for fewer)
                    self._per_token[t] = flops_per_token(
                        self.model_cfg, self.model_cfg.base >> tier_of_key(t), self.cfg.seq_len)
                self.flops += tokens * self._per_token[t]

    def summary(self, elapsed: float) -> dict[str, float]:
        out = {"peak_memory_gb": peak_memory_gb(self.dist.device)}
        if self.peak is not None and elapsed > 0:
            out["mfu"] = self.flops / elapsed / (self.peak * self.dist.world)
        return out
