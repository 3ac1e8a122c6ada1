"""Training at scale (issue 12): the vectorized NestedAdamW against the per-parameter reference,
model shapes from flags and files, mixed precision, torch.compile, FSDP2 on 2 gloo processes,
sharded resume, prepared token files and the training logs."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from matformer.cli import main as cli_main
from matformer.data import text as D
from matformer.data import token_files
from matformer.errors import ConfigError
from matformer.io.checkpoint import load_state_dict
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM
from matformer.training import (
    NestedAdamW,
    Objective,
    TrainConfig,
    lr_at,
    model_config,
    step_plan,
    train,
    update_extent,
    validate,
)
from matformer.training import state as state_module
from matformer.training.distributed import Dist, clip_grads, grad_norm, shard, shard_dim, teardown
from matformer.training.metrics import flops_per_token
from matformer.training.optimizer import nested_dim, set_lr
from matformer.training.precision import LossScaler
from matformer.training.sharded import load_state, read_meta
from matformer.training.state import STATE_FILE
from tests.conftest import tiny_config

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


def test_fused_nested_adamw_matches_foreach_and_keeps_the_untouched_tail(monkeypatch):
    """impl="fused" runs torch's fused AdamW kernel on the contiguous views (row prefixes, whole
    matrices) and foreach on the strided ones (down_proj's column prefixes): the same update up
    to rounding, the same counts, and neurons never trained stay bit-identical."""
    cfg = MatFormerConfig.from_preset("debug")
    fused, ref = MatFormerLM(cfg), MatFormerLM(cfg)
    ref.load_state_dict(fused.state_dict())
    start = {k: v.clone() for k, v in fused.state_dict().items()}
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt_f, opt_r = NestedAdamW(fused, impl="fused", **kw), NestedAdamW(ref, impl="foreach", **kw)
    calls = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda ps, *a, **k: (calls.append(len(ps)), real(ps, *a, **k)))
    gen = torch.Generator().manual_seed(0)
    for extent in [64, 16, 128, 32, 64, 128]:  # never past 128 of 256 neurons
        grads = _nested_grads(fused, extent, gen)
        for model in (fused, ref):
            for name, p in model.named_parameters():
                p.grad = grads[name].clone()
        opt_f.step(extent)
        opt_r.step(extent)
    assert calls and sum(calls) > 0
    for (name, a), b in zip(fused.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(opt_f.state[a]["step"], opt_r.state[b]["step"]), name
        if ".mlp." in name:
            tail = (slice(128, None),) if "down_proj" not in name else (slice(None), slice(128, None))
            assert torch.equal(a.detach()[tail], start[name][tail]), name
            assert not opt_f.state[a]["exp_avg"][tail].any(), name


def test_tail_lr_scale_scales_exactly_the_ffn_tail():
    """tail_lr_scale=2 with tail_tier=2: FFN neurons [:n/4] move exactly as with lr, neurons
    [n/4:] exactly as with 2 * lr (decay included); attention and embeddings as with lr."""
    cfg = MatFormerConfig.from_preset("debug")
    models = [MatFormerLM(cfg) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    kw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    scaled = NestedAdamW(models[0], lr=1e-2, tail_lr_scale=2.0, tail_tier=2, **kw)
    plain = NestedAdamW(models[1], lr=1e-2, **kw)
    double = NestedAdamW(models[2], lr=2e-2, **kw)
    gen = torch.Generator().manual_seed(0)
    for extent in [256, 64, 128, 256]:
        grads = _nested_grads(models[0], extent, gen)
        for m in models:
            for name, p in m.named_parameters():
                p.grad = grads[name].clone()
        for opt in (scaled, plain, double):
            opt.step(extent)
    n = cfg.intermediate_size
    for (name, a), b, c in zip(models[0].named_parameters(), models[1].parameters(),
                               models[2].parameters(), strict=True):
        if ".mlp." not in name:
            assert torch.equal(a, b), name
            continue
        head, tail = ((slice(0, n // 4),), (slice(n // 4, None),)) if "down_proj" not in name else \
            ((slice(None), slice(0, n // 4)), (slice(None), slice(n // 4, None)))
        assert torch.equal(a[head], b[head]), name
        assert torch.equal(a[tail], c[tail]), name
        assert not torch.equal(a[tail], b[tail]), name


# ---- shared helpers ----------------------------------------------------------------------------


def tiny(tmp_path: Path, corpus: Path, **kw) -> TrainConfig:
    return tiny_config(tmp_path, corpus, **{"steps": 12, **kw})


def step_log(out: str) -> list[dict]:
    lines = (Path(out) / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def losses(out: str) -> list[tuple[int, dict[str, float]]]:
    return [(r["step"], r["loss"]) for r in step_log(out)]


# ---- model shapes ------------------------------------------------------------------------------


def test_model_shape_from_overrides_and_from_a_config_file(tmp_path):
    mc = model_config(TrainConfig(preset="debug", hidden_size=96, num_heads=6, num_layers=3,
                                  intermediate_size=384), vocab_size=300)
    assert (mc.hidden_size, mc.head_dim, mc.num_hidden_layers, mc.base, mc.vocab_size) == \
        (96, 16, 3, 384, 300)
    f = tmp_path / "config.json"
    f.write_text(MatFormerConfig.from_preset("small", vocab_size=1024).to_json_string())
    mc = model_config(TrainConfig(model_config=str(f), num_kv_heads=2), vocab_size=300)
    assert (mc.hidden_size, mc.num_key_value_heads, mc.vocab_size) == (256, 2, 1024)  # spare rows kept
    with pytest.raises(ConfigError, match=r"--num-heads 5.*not divisible"):
        model_config(TrainConfig(preset="debug", num_heads=5), 300)
    f.write_text('{"hidden_size": 64}')
    with pytest.raises(ConfigError, match=str(f)):
        validate(TrainConfig(model_config=str(f)))
    with pytest.raises(ConfigError, match="grad_accum"):
        validate(TrainConfig(grad_accum=0))
    with pytest.raises(ConfigError, match="tail_lr_scale must be a positive number, got 0"):
        validate(TrainConfig(tail_lr_scale=0))
    with pytest.raises(ConfigError, match="adamw_impl must be one of auto, foreach, fused"):
        validate(TrainConfig(adamw_impl="apex"))


# ---- precision and accumulation ----------------------------------------------------------------


def test_bf16_autocast_loss_trajectory_tracks_float32(tmp_path, corpus):
    runs = {d: tiny(tmp_path / d, corpus, dtype=d, steps=12, log_every=1)
            for d in ("float32", "bfloat16")}
    results = {d: train(c) for d, c in runs.items()}
    f32, bf16 = (step_log(runs[d].out) for d in ("float32", "bfloat16"))
    assert len(f32) == len(bf16) == 12
    for a, b in zip(f32, bf16, strict=True):
        for t in a["loss"]:
            assert abs(a["loss"][t] - b["loss"][t]) < 0.05 * a["loss"][t], (a, b)
    mean = [sum(r["loss"].values()) / len(r["loss"]) for r in f32]
    assert mean[-1] < mean[0] - 0.5  # it did learn
    for t, v in results["float32"].final_val_loss.items():
        assert abs(results["bfloat16"].final_val_loss[t] - v) < 0.03 * v
    sd = load_state_dict(runs["bfloat16"].out)  # saved in --dtype by default
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert json.loads((Path(runs["bfloat16"].out) / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _masters(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(ckpt / STATE_FILE)).items() if k.startswith("master.")}


def test_float16_loss_scaling_tracks_float32_saves_float16_and_resumes_bit_exact(tmp_path, corpus):
    """float16 autocast on CPU (torch 2.13 runs the linears in float16) with dynamic loss
    scaling: every step's loss within 5% of float32's, weights saved in float16 with float32
    masters and the loss scale in the state, and --resume from step 6 ends bit-identical."""
    f32 = tiny(tmp_path / "f32", corpus, steps=12, log_every=1)
    f16 = tiny(tmp_path / "f16", corpus, dtype="float16", steps=12, log_every=1, save_every=6)
    res32, res16 = train(f32), train(f16)
    a, b = step_log(f32.out), step_log(f16.out)
    assert len(a) == len(b) == 12
    for x, y in zip(a, b, strict=True):
        for t in x["loss"]:
            assert x["loss"][t] != y["loss"][t]  # float16 did run (not silently float32)
            assert abs(x["loss"][t] - y["loss"][t]) < 0.05 * x["loss"][t], (x, y)
    for t, v in res32.final_val_loss.items():
        assert abs(res16.final_val_loss[t] - v) < 0.03 * v
    sd = load_state_dict(f16.out)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert json.loads((Path(f16.out) / "config.json").read_text())["torch_dtype"] == "float16"

    resumed = dataclasses.replace(f16, out=str(tmp_path / "r" / "run"),
                                  resume=str(Path(f16.out) / "checkpoints" / "step-0000006"))
    train(resumed)
    assert losses(resumed.out) == losses(f16.out)[6:]  # the same losses, bit for bit
    ends = [Path(c.out) / "checkpoints" / "step-0000012" for c in (f16, resumed)]
    wa, wb = (load_state_dict(e) for e in ends)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (_masters(e) for e in ends)
    assert ma and all(v.dtype == torch.float32 and torch.equal(v, mb[k]) for k, v in ma.items())
    scale = [state_module.read_state(e)[1].extra["loss_scale"] for e in ends]
    assert scale[0] == scale[1] == {"scale": 2.0**16, "clean_steps": 12}


def test_float16_overflow_skips_the_step_halves_the_scale_and_resumes_bit_exact(
        tmp_path, corpus, monkeypatch):
    """A loss scale too large for float16 (2^20 on this model): the overflowing steps are
    skipped (NestedAdamW's step counts untouched) and the scale halved until the gradients fit;
    the state saved mid-way resumes bit-identically, scale included."""
    from matformer.training import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "LossScaler",
                        lambda enabled: LossScaler(enabled, init_scale=2.0**20))
    cfg = tiny(tmp_path, corpus, dtype="float16", steps=8, save_every=4, log_every=1)
    train(cfg)
    resumed = dataclasses.replace(cfg, out=str(tmp_path / "r" / "run"),
                                  resume=str(Path(cfg.out) / "checkpoints" / "step-0000004"))
    train(resumed)
    ends = [Path(c.out) / "checkpoints" / "step-0000008" for c in (cfg, resumed)]
    tensors, st = state_module.read_state(ends[0])
    scale = st.extra["loss_scale"]
    skipped = 20 - int(np.log2(scale["scale"]))  # one halving per skipped step
    assert skipped >= 1 and scale["scale"] < 2.0**20
    counts = {int(v.max()) for k, v in tensors.items() if k.endswith(".step")}
    assert counts == {8 - skipped}  # a skipped step never reached the optimizer
    assert all(np.isfinite(v).all() for r in step_log(cfg.out) for v in r["loss"].values())
    assert losses(resumed.out) == losses(cfg.out)[4:]
    wa, wb = (load_state_dict(e) for e in ends)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert state_module.read_state(ends[1])[1].extra["loss_scale"] == scale


def test_grad_accum_equals_the_larger_batch_and_checkpointing_changes_nothing(tmp_path, corpus):
    big = tiny(tmp_path / "big", corpus, batch_size=4, steps=6)
    acc = tiny(tmp_path / "acc", corpus, batch_size=2, grad_accum=2, steps=6)
    ckpt = tiny(tmp_path / "ckpt", corpus, batch_size=4, steps=6, activation_checkpointing=True)
    for cfg in (big, acc, ckpt):
        train(cfg)
    a, b, c = (load_state_dict(cfg.out) for cfg in (big, acc, ckpt))
    for k in a:
        # two micro-batch means halved and summed vs one mean over 4 windows: other float32
        # sums, so agreement to rounding carried through 6 AdamW steps (not bits)
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
        # recomputed activations: the same ops in the same order, so the same bits anywhere
        assert torch.equal(a[k], c[k]), k


def test_loss_scaler_skips_overflowing_steps_and_grows_back():
    s = LossScaler(True, init_scale=8.0, growth_interval=2)
    g = [torch.full((3,), 16.0)]
    s.unscale_(g)
    assert g[0].tolist() == [2.0] * 3
    assert s.update(float("inf")) is False and s.scale == 4.0
    assert s.update(1.0) and s.update(1.0) and s.scale == 8.0
    off = LossScaler(False)
    assert off.scale == 1.0 and off.update(float("nan"))


def test_save_dtype_keeps_float32_masters_and_resume_is_bit_exact(tmp_path, corpus):
    ref = tiny(tmp_path / "a", corpus, steps=6, save_every=3, save_dtype="bfloat16")
    train(ref)
    resumed = dataclasses.replace(ref, out=str(tmp_path / "b" / "run"),
                                  resume=str(Path(ref.out) / "checkpoints" / "step-0000003"))
    train(resumed)
    a = load_state_dict(Path(ref.out) / "checkpoints" / "step-0000006")
    b = load_state_dict(Path(resumed.out) / "checkpoints" / "step-0000006")
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from safetensors.torch import load_file

    sa = load_file(str(Path(ref.out) / "checkpoints" / "step-0000006" / STATE_FILE))
    sb = load_file(str(Path(resumed.out) / "checkpoints" / "step-0000006" / STATE_FILE))
    masters = [k for k in sa if k.startswith("master.")]
    assert masters and all(sa[k].dtype == torch.float32 and torch.equal(sa[k], sb[k]) for k in masters)


# ---- torch.compile -----------------------------------------------------------------------------

_GRAPHS: list[bool] = []


def _count_graphs(gm, example_inputs):
    _GRAPHS.append(torch.is_grad_enabled())  # training graphs have grad enabled, eval ones not
    return gm.forward


def test_compile_equal_losses_and_one_graph_per_trained_width(tmp_path, corpus):
    import torch._dynamo

    if "count_graphs" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(_count_graphs, name="count_graphs")
    torch._dynamo.reset()
    _GRAPHS.clear()
    eager = tiny(tmp_path / "eager", corpus, objective="joint", steps=4)
    compiled = dataclasses.replace(eager, out=str(tmp_path / "compiled" / "run"),
                                   compile="count_graphs")
    train(eager)
    train(compiled)
    assert _GRAPHS.count(True) == 4  # tiers 0..3, each step runs all four: compiled once each
    le, lc = step_log(eager.out), step_log(compiled.out)
    for a, b in zip(le, lc, strict=True):
        for t in a["loss"]:
            assert abs(a["loss"][t] - b["loss"][t]) <= 1e-5 * a["loss"][t]


# ---- logs --------------------------------------------------------------------------------------


def test_logs_report_mfu_and_peak_memory(tmp_path, corpus):
    tb = importlib.util.find_spec("tensorboard") is not None  # optional extra
    cfg = tiny(tmp_path, corpus, steps=3, peak_tflops=1.0, log_every=1, tensorboard=tb)
    train(cfg)
    rec = step_log(cfg.out)[-1]
    assert 0 < rec["mfu"] < 1 and rec["peak_memory_gb"] > 0.05 and rec["tokens_per_s"] > 0
    if tb:
        assert list((Path(cfg.out) / "tensorboard").glob("events.out.tfevents.*"))
    mc = model_config(cfg, 300)
    assert flops_per_token(mc, 256, 32) > flops_per_token(mc, 64, 32) > 6 * 300 * 64


# ---- FSDP2 -------------------------------------------------------------------------------------


def test_grad_norm_is_torchs_in_one_process_and_one_order_for_any_layout():
    """`grad_norm`: in one process the norm clip_grad_norm_ computes, bit for bit (and
    `clip_grads` scales as it does); with a world of 2 the norm of the per-piece norms (the
    pieces FSDP2 shards would hold; a dimension shorter than the world gets an empty piece),
    whatever the memory layout of the gradients, and the same number up to rounding."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 48, generator=gen), torch.randn(48, 64, generator=gen),
             torch.randn(7, generator=gen), torch.randn(1, generator=gen)]
    dims = [shard_dim(2, 0), shard_dim(2, 1), shard_dim(1, None), shard_dim(1, 0)]
    assert dims == [1, 0, 0, 0]
    one = grad_norm(grads, dims, Dist())
    assert torch.equal(one, torch.nn.utils.get_total_norm(grads))
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    clipped = [g.clone() for g in grads]
    clip_grads(clipped, one, 1.0)
    assert all(torch.equal(p.grad, c) for p, c in zip(params, clipped, strict=True))

    two = grad_norm(grads, dims, Dist(world=2))
    pieces = [torch.linalg.vector_norm(c.contiguous()) for g, d in zip(grads, dims, strict=True)
              for c in torch.chunk(g, 2, d)]
    assert len(pieces) == 7  # the 1-element gradient: one piece (and an empty one, norm 0)
    assert torch.equal(two, torch.linalg.vector_norm(torch.stack(pieces)))
    strided = [g.t().contiguous().t() for g in grads[:2]] + grads[2:]  # column-major copies
    assert not strided[0].is_contiguous()
    assert torch.equal(grad_norm(strided, dims, Dist(world=2)), two)
    torch.testing.assert_close(two, one, rtol=1e-6, atol=0)


FSDP_ARGS = ["--preset", "debug", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
             "--lr", "1e-2", "--warmup-steps", "2", "--vocab-size", "300", "--eval-every", "1000",
             "--save-every", "2", "--eval-windows", "8", "--val-fraction", "0.1", "--fsdp",
             "--rank-tiers", "1,2", "--objective", "joint", "--activation-checkpointing"]


def _torchrun(args: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), "-m", "matformer.cli", "train", *args],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _reference(cfg: TrainConfig, out: Path) -> tuple[MatFormerLM, dict[str, torch.Tensor]]:
    """Single process: each rank's batch at each rank's plan, gradients averaged over ranks."""
    tok = D.load_tokenizer(out)
    train_texts, _ = D.split_texts(D.load_texts(cfg.data), cfg.val_fraction, cfg.split_seed)
    sampler = D.WindowSampler(D.tokenize(tok, train_texts, cfg.cache_dir), cfg.seq_len, cfg.seed)
    model = MatFormerLM(model_config(cfg, tok.get_vocab_size()))
    model.reset_parameters(seed=cfg.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = NestedAdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
    obj, world, B = Objective(model), 2, cfg.batch_size
    for step in range(cfg.steps):
        x = torch.from_numpy(sampler.next(world * B))
        set_lr(opt, lr_at(cfg, step))
        for r in range(world):
            for item in step_plan(cfg, 256, step, r, world):
                loss, _ = obj(x[r * B:(r + 1) * B], [item])
                (loss / world).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = grad_norm(grads, [shard_dim(p.ndim, opt.nest_dim.get(p)) for p in params],
                         Dist(world=world))  # the run's norm (test_train says why it matters)
        clip_grads(grads, norm, cfg.grad_clip)
        opt.step(update_extent(cfg, 256, step, world))
        opt.zero_grad(set_to_none=True)
    return model, init


def test_fsdp_two_processes_rank_tiers_match_single_process_and_resume_bit_exact(tmp_path, corpus):
    """FSDP2 on 2 gloo processes, ranks at runtime tiers 1 and 2 with `joint` (plans of 3 and 2
    tiers: the shorter one is padded), views of the unsharded nested matrices: the same weights
    as the single-process computation, the never-used tier-0 half bit-identical; resuming the
    sharded state of step 2 with 2 processes ends bit-identical; the same state loads resharded
    into 1 process."""
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), *FSDP_ARGS]
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(["--out", str(a), *common])
    ckpt = a / "checkpoints" / "step-0000002"
    assert (ckpt / "training_state" / ".metadata").is_file() and (ckpt / "config.json").is_file()
    cfg = TrainConfig(**json.loads((a / "train_config.json").read_text()))
    assert cfg.fsdp and cfg.rank_tiers == [1, 2]
    model, init = _reference(cfg, a)
    got = load_state_dict(a)
    for k, v in model.state_dict().items():
        # to rounding: another accumulation and norm order and thread count than the run's
        # (test_two_process_gloo_rank_tiers_match_single_process says why 1e-6 is wide)
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
        if ".mlp." in k:  # neither rank uses the tier-0 half: untouched
            dim = 1 if "down_proj" in k else 0
            assert torch.equal(got[k].narrow(dim, 128, 128), init[k].narrow(dim, 128, 128)), k

    _torchrun(["--out", str(b), *common, "--resume", str(ckpt)])
    got_b = load_state_dict(b)
    assert all(torch.equal(got[k], got_b[k]) for k in got)
    assert json.loads((b / "train_summary.json").read_text())["final_val_loss"] == \
        json.loads((a / "train_summary.json").read_text())["final_val_loss"]

    # any world size: the 2-process state resharded into one process (a group of one)
    one = MatFormerLM(model_config(cfg, got["lm_head.weight"].shape[0]))
    dist = Dist()
    try:
        shard(one, dist, nested_dim)
        opt = NestedAdamW(one)
        load_state(ckpt, one, opt)
        saved = load_state_dict(ckpt)
        for k, v in one.state_dict().items():
            assert torch.equal(v.full_tensor(), saved[k]), k
        counts = opt.state[one.model.layers[0].mlp.gate_proj.weight]["step"]
        assert counts.tolist() == [2] * 128 + [0] * 128  # two steps, tiers >= 1 only
    finally:
        teardown(dist)


# ---- resume across the two state formats (sharded DCP with --fsdp, single-file without) --------

TWO_PROC_ARGS = ["--preset", "debug", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
                 "--lr", "1e-2", "--warmup-steps", "2", "--vocab-size", "300", "--eval-every",
                 "1000", "--save-every", "2", "--eval-windows", "8", "--val-fraction", "0.1",
                 "--objective", "joint", "--log-every", "1"]


def _close_losses(resumed: str | Path, whole: str | Path, rel: float) -> None:
    """Every step the resumed run logged within `rel` of the uninterrupted run's."""
    la = losses(str(resumed))
    lb = losses(str(whole))[-len(la):]
    assert [s for s, _ in la] == [s for s, _ in lb] and la
    for (_, x), (_, y) in zip(la, lb, strict=True):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) <= rel * x[t] for t in x), (x, y)


def test_resume_converts_between_fsdp_and_single_file_state_bit_exact_in_one_process(tmp_path, corpus):
    """One process: --fsdp (a group of one) and plain training are the same math, and a run
    resumed in the other mode (sharded DCP state read into a plain model, a single-file state
    into a sharded one) ends bit-identical to both uninterrupted runs, writing its checkpoints
    in its own format."""
    runs = {m: tiny(tmp_path / m, corpus, steps=6, save_every=3, log_every=1, fsdp=m == "fsdp",
                    save_dtype="bfloat16")  # resuming needs the float32 masters of either state
            for m in ("plain", "fsdp")}
    for cfg in runs.values():
        train(cfg)
    for src, dst in (("plain", "fsdp"), ("fsdp", "plain")):
        runs[f"{src}-{dst}"] = dataclasses.replace(
            runs[dst], out=str(tmp_path / f"{src}-{dst}" / "run"),
            resume=str(Path(runs[src].out) / "checkpoints" / "step-0000003"))
        train(runs[f"{src}-{dst}"])
    ref = load_state_dict(runs["plain"].out)
    for name, cfg in runs.items():
        got = load_state_dict(cfg.out)
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
        assert losses(cfg.out) == losses(runs["plain"].out)[-len(losses(cfg.out)):], name
    assert {v.dtype for v in ref.values()} == {torch.bfloat16}
    end = Path(runs["plain-fsdp"].out) / "checkpoints" / "step-0000006"
    assert (end / "training_state" / ".metadata").is_file() and not (end / STATE_FILE).exists()
    end = Path(runs["fsdp-plain"].out) / "checkpoints" / "step-0000006"
    assert (end / STATE_FILE).is_file() and not (end / "training_state").exists()
    masters = _masters(end)  # the float32 weights a resumed run continues from
    ref_masters = _masters(Path(runs["plain"].out) / "checkpoints" / "step-0000006")
    assert masters and all(torch.equal(v, ref_masters[k]) for k, v in masters.items())


def _same_state(dcp_ckpt: Path, file_ckpt: Path, scratch: Path) -> None:
    """A sharded (--fsdp) and a single-file checkpoint of the same step hold the same state, bit
    for bit: step, data position, tokens seen, world size, lr, history, every moment and
    per-neuron step count of NestedAdamW, and the RNG state."""
    tensors, st = state_module.read_state(file_ckpt)
    assert read_meta(dcp_ckpt) == json.loads(json.dumps(st.to_meta()))
    dcp_to_torch_save(dcp_ckpt / "training_state", scratch)
    full = torch.load(scratch, weights_only=False)
    optim = {k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")}
    assert optim and optim.keys() == full["optim"].keys()
    for k, v in optim.items():
        assert torch.equal(v, full["optim"][k]), k
    assert torch.equal(tensors["rng.torch"], full["rng"])


def test_fsdp_state_resumes_without_fsdp_on_two_processes_and_in_one(tmp_path, corpus, capsys):
    """The sharded state of a 2-process --fsdp run, resumed without --fsdp: by 2 DDP processes
    bit-identical to the uninterrupted FSDP2 run (weights, logged losses, optimizer state, data
    position, RNG); by one process (no process group) every tensor read whole, exactly as DCP
    stored it, and training goes on (4 windows a step instead of 8: the losses stay within 5% of
    the 2-process run's, and the run says why they differ).

    Why bits, on any machine: on 2 processes the gradient reductions agree exactly (DDP's
    all-reduce and FSDP2's reduce-scatter both give a/2 + b/2 or (a + b)/2, equal in float32: a
    sum of two is commutative and halving is exact), and clipping uses
    `distributed.grad_norm`, one summation order whichever wrapper holds the gradients. With
    more processes the backends' summation orders differ and the guarantee is agreement to
    rounding (docs/TRAINING.md, "Sharded resume")."""
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), *TWO_PROC_ARGS]
    a, b = tmp_path / "fsdp", tmp_path / "ddp"
    _torchrun(["--out", str(a), *common, "--fsdp"])
    ckpt = a / "checkpoints" / "step-0000002"
    _torchrun(["--out", str(b), *common, "--resume", str(ckpt)])
    wa, wb = load_state_dict(a), load_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses(str(b)) == losses(str(a))[2:]
    assert (b / "checkpoints" / "step-0000004" / STATE_FILE).is_file()
    _same_state(a / "checkpoints" / "step-0000004", b / "checkpoints" / "step-0000004",
                tmp_path / "end.pt")

    cfg = TrainConfig.from_dict(json.loads((a / "train_config.json").read_text()))
    model = MatFormerLM(model_config(cfg, wa["lm_head.weight"].shape[0]))
    opt = NestedAdamW(model)
    assert not torch.distributed.is_initialized()
    load_state(ckpt, model, opt)
    dcp_to_torch_save(ckpt / "training_state", tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    saved = load_state_dict(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, full["model"][k]) and torch.equal(v, saved[k]), k
    for p, name in opt.names.items():
        for m in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][m], full["optim"][f"{name}.{m}"]), (name, m)

    one = dataclasses.replace(cfg, out=str(tmp_path / "one"), fsdp=False, resume=str(ckpt),
                              quiet=False)
    capsys.readouterr()
    train(one)
    assert "with 1 process(es), saved by 2: 4 windows per step instead of 8" in capsys.readouterr().out
    _close_losses(one.out, a, rel=0.05)


@pytest.mark.slow  # ~15 s; the one-process resume into FSDP and the in-process conversion stay in CI
def test_single_file_state_resumes_with_fsdp_on_two_processes(tmp_path, corpus):
    """A 2-process DDP run (ranks at tiers 1 and 2) resumed with --fsdp on 2 processes: the
    single-file state sharded on load; the same weights, losses and optimizer state as the
    uninterrupted DDP run, bit for bit (why, in the test above), checkpoints now sharded."""
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), *TWO_PROC_ARGS]
    a, b = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(["--out", str(a), *common, "--rank-tiers", "1,2"])
    _torchrun(["--out", str(b), *common, "--rank-tiers", "1,2", "--fsdp", "--resume",
               str(a / "checkpoints" / "step-0000002")])
    assert losses(str(b)) == losses(str(a))[2:]
    wa, wb = load_state_dict(a), load_state_dict(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wb[k], wa[k]), k
    assert (b / "checkpoints" / "step-0000004" / "training_state" / ".metadata").is_file()
    _same_state(b / "checkpoints" / "step-0000004", a / "checkpoints" / "step-0000004",
                tmp_path / "end.pt")


def test_one_process_state_resumes_with_fsdp_on_two_processes(tmp_path, corpus):
    """Any world size: a 1-process run's single-file state resumed by 2 --fsdp processes trains
    on (8 windows a step instead of 4: losses within 5% of the 1-process run's)."""
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), *TWO_PROC_ARGS]
    single = tmp_path / "single"
    assert cli_main(["train", "--out", str(single), *common, "--quiet"]) == 0
    _torchrun(["--out", str(tmp_path / "wide"), *common, "--fsdp", "--resume",
               str(single / "checkpoints" / "step-0000002")])
    _close_losses(tmp_path / "wide", single, rel=0.05)


# ---- prepared token files ----------------------------------------------------------------------


def test_prepare_data_from_text_jsonl_parquet_and_arrow_then_train_on_it(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(texts[:10]):
        (src / f"a{i:02d}.txt").write_text(t)
    (src / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[10:20]))
    pq.write_table(pa.table({"text": texts[20:25], "id": list(range(5))}), src / "c.parquet")
    with pa.OSFile(str(src / "d.arrow"), "wb") as f, \
            pa.ipc.new_stream(f, pa.schema([("text", pa.string())])) as w:  # save_to_disk's format
        w.write_table(pa.table({"text": texts[25:]}))
    assert cli_main(["prepare-data", str(src), "-o", str(tmp_path / "tok"), "--vocab-size", "300",
                     "--val-fraction", "0.2", "--quiet"]) == 0
    tok, train_tokens, val_tokens, meta = token_files.load(tmp_path / "tok")
    assert meta["train_documents"] + meta["val_documents"] == 30 and meta["val_documents"] > 0
    assert isinstance(train_tokens, np.memmap) and train_tokens.dtype == np.uint16
    docs = tok.decode(train_tokens.tolist() + val_tokens.tolist(), skip_special_tokens=False)
    assert sorted(d for d in docs.split("</s>") if d) == sorted(texts)  # every document, once
    # a folder that exists is never overwritten
    assert cli_main(["prepare-data", str(src), "-o", str(tmp_path / "tok"), "--quiet"]) == 2

    cfg = tiny(tmp_path, corpus, data=str(tmp_path / "tok"), steps=6, save_every=3,
               data_workers=2)
    result = train(cfg)
    assert D.load_tokenizer(cfg.out).to_str() == tok.to_str() and result.final_val_loss
    resumed = dataclasses.replace(cfg, out=str(tmp_path / "r"), data_workers=0,
                                  resume=str(Path(cfg.out) / "checkpoints" / "step-0000003"))
    train(resumed)  # no workers, from the position the read-ahead run saved
    a, b = load_state_dict(cfg.out), load_state_dict(resumed.out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # workers read ahead; the position does not


def test_eval_on_a_prepared_token_folder_scores_its_held_out_split(tmp_path, corpus, capsys):
    """`matformer eval CKPT --data DIR` of prepare-data's folder: windows of val.bin spread like
    heldout_windows (the training's shape when DIR is what the run trained on, so the last
    logged val loss), through the library and the verb; a folder prepared with another
    tokenizer is one line naming both tokenizer files (exit 2)."""
    from matformer.evaluation.lm import evaluate

    tok_dir = tmp_path / "tok"
    assert cli_main(["prepare-data", str(corpus), "-o", str(tok_dir), "--vocab-size", "300",
                     "--val-fraction", "0.2", "--quiet"]) == 0
    cfg = tiny(tmp_path, corpus, data=str(tok_dir), steps=3)
    final = train(cfg).final_val_loss
    _, _, val, _ = token_files.load(tok_dir)
    quick = dict(mix_n_match=False, decode=False, speculative=False)

    own = evaluate(cfg.out, data=tok_dir, uniform_tiers=[0, 2], **quick)
    assert (own.windows, own.seq_len) == (cfg.eval_windows, cfg.seq_len)  # the training's shape
    assert "prepared token folder" in own.data
    for r in own.results:
        assert r.loss == pytest.approx(final[r.tier], abs=1e-5)
    default = evaluate(cfg.out, uniform_tiers=[0, 2], **quick)  # no --data: the same val.bin
    assert [r.loss for r in default.results] == [r.loss for r in own.results]

    other = evaluate(cfg.out, data=str(tok_dir), seq_len=16, max_tokens=16 * 5, uniform_tiers=[1],
                     **quick)
    direct = evaluate(cfg.out, data=D.heldout_windows(np.asarray(val), 16, 5), uniform_tiers=[1],
                      **quick)
    assert (other.windows, other.seq_len) == (5, 16)
    assert [r.loss for r in other.results] == [r.loss for r in direct.results]

    capsys.readouterr()
    assert cli_main(["eval", cfg.out, "--data", str(tok_dir), "--tiers", "2", "--no-mix",
                     "--no-decode", "--no-speculative", "--json", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["data"].startswith(f"held-out part of {tok_dir} (prepared token folder: its val.bin)")
    assert rep["split"] == "held-out"
    got = next(r["loss"] for r in rep["results"] if r["name"] == "tier 2")
    assert got == pytest.approx(final[2], abs=1e-5)
    assert cli_main(["eval", cfg.out, "--compare", cfg.out, "--data", str(tok_dir), "--tiers",
                     "2", "--json", "--seq-len", "16", "--max-tokens", "80"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["windows"] == 5 and cmp["losses"][0] == cmp["losses"][1]

    # prepared with the checkpoint's own tokenizer (another split): accepted
    same = tmp_path / "same"
    assert cli_main(["prepare-data", str(corpus), "-o", str(same), "--tokenizer", cfg.out,
                     "--val-fraction", "0.3", "--split-seed", "1", "--quiet"]) == 0
    assert cli_main(["eval", cfg.out, "--data", str(same), "--tiers", "0", "--no-mix",
                     "--no-decode", "--no-speculative", "--json"]) == 0
    capsys.readouterr()
    # another tokenizer: one line naming both files, nothing evaluated
    alien = tmp_path / "alien"
    assert cli_main(["prepare-data", str(corpus), "-o", str(alien), "--vocab-size", "280",
                     "--val-fraction", "0.2", "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", cfg.out, "--data", str(alien), "--no-decode",
                     "--no-speculative"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(alien / "tokenizer.json") in err and str(Path(cfg.out) / "tokenizer.json") in err


def test_convert_calibrates_on_the_prepared_folder_a_run_trained_on(tmp_path, corpus, capsys):
    """`matformer convert` of a run trained on a prepare-data folder calibrates on that folder's
    train.bin (it used to read train.bin as text); a folder of another tokenizer given as
    --calibration is one line naming both tokenizer files (exit 2)."""
    from matformer.errors import DataError
    from matformer.io.source import resolve_source
    from matformer.slicing.convert import calibration_windows

    tok_dir = tmp_path / "tok"
    assert cli_main(["prepare-data", str(corpus), "-o", str(tok_dir), "--vocab-size", "300",
                     "--val-fraction", "0.2", "--quiet"]) == 0
    cfg = tiny(tmp_path, corpus, data=str(tok_dir), steps=2)
    train(cfg)
    _, train_tokens, _, _ = token_files.load(tok_dir)
    windows, what = calibration_windows(resolve_source(cfg.out), None, 4, 16)
    assert np.array_equal(windows.numpy(), D.heldout_windows(np.asarray(train_tokens), 16, 4))
    assert f"train part of {tok_dir}" in what
    alien = tmp_path / "alien"
    assert cli_main(["prepare-data", str(corpus), "-o", str(alien), "--vocab-size", "280",
                     "--val-fraction", "0.2", "--quiet"]) == 0
    with pytest.raises(DataError, match="prepared with another tokenizer"):
        calibration_windows(resolve_source(cfg.out), alien, 4, 16)
    capsys.readouterr()
    assert cli_main(["convert", cfg.out, "-o", str(tmp_path / "conv"), "--calibration",
                     str(alien), "--samples", "2", "--seq-len", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(alien / "tokenizer.json") in err
    assert not (tmp_path / "conv").exists()
