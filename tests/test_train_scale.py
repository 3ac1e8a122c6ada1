"""Training at scale (issue 12): the vectorized NestedAdamW against the per-parameter reference,
model shapes from flags and files, mixed precision, torch.compile, FSDP2 on 2 gloo processes,
sharded resume, prepared token files and the training logs."""

from __future__ import annotations

import torch

from matformer.config import MatFormerConfig
from matformer.model import MatFormerLM
from matformer.training import NestedAdamW

# ---- the optimizer: vectorized == per-parameter reference, bit for bit ------------------------


@torch.no_grad()
def reference_step(opt: NestedAdamW, extent: int | None) -> None:
    """NestedAdamW.step as it was before the foreach version: one AdamW per parameter and per run
    of equal step counts (torch's single-tensor arithmetic)."""
    for group in opt.param_groups:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            st = opt.state[p]
            if not st:
                st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["step"] = torch.zeros(p.shape[opt.nest_dim[p]] if p in opt.nest_dim else 1,
                                         dtype=torch.int64)
            dim = opt.nest_dim.get(p)
            n_all = st["step"].numel()
            m = n_all if dim is None or extent is None else min(extent, n_all)
            st["step"][:m] += 1
            values, lengths = torch.unique_consecutive(st["step"][:m], return_counts=True)
            a = 0
            for c, n in zip(values.tolist(), lengths.tolist(), strict=True):
                sl = (slice(None),) if dim is None else \
                    (slice(a, a + n),) if dim == 0 else (slice(None), slice(a, a + n))
                pv, g, mv, v = p[sl], p.grad[sl], st["exp_avg"][sl], st["exp_avg_sq"][sl]
                if wd:
                    pv.mul_(1 - lr * wd)
                mv.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v.sqrt() / ((1 - beta2**c) ** 0.5)).add_(eps)
                pv.addcdiv_(mv, denom, value=-(lr / (1 - beta1**c)))
                a += n


def _nested_grads(model: MatFormerLM, extent: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen)
        if ".mlp." in name:  # what the nested FFN's backward gives the unused neurons
            (g[extent:] if "down_proj" not in name else g[:, extent:]).zero_()
        grads[name] = g
    return grads


def test_vectorized_nested_adamw_is_bit_identical_to_the_per_parameter_reference():
    cfg = MatFormerConfig.from_preset("debug")
    fast, ref = MatFormerLM(cfg), MatFormerLM(cfg)
    ref.load_state_dict(fast.state_dict())
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_f, opt_r = NestedAdamW(fast, **kw), NestedAdamW(ref, **kw)
    gen = torch.Generator().manual_seed(0)
    extents = [256, 64, 128, None, 32, 64, 256, 16, 128]
    for i, extent in enumerate(extents):
        grads = _nested_grads(fast, extent or 256, gen)
        for model in (fast, ref):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        if i == 4:  # a resumed optimizer: counts restored per parameter, then shared again
            opt_f.load_state_tensors(opt_f.state_tensors(), "test")
        opt_f.step(extent)
        reference_step(opt_r, extent)
        for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
            assert torch.equal(a, b), (i, name)
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(opt_f.state[a][k], opt_r.state[b][k]), (i, name, k)
    counts = opt_f.state[fast.model.layers[0].mlp.gate_proj.weight]["step"]
    assert counts[:16].tolist() == [9] * 16 and counts[-1].item() == 3  # 256-wide steps + None
