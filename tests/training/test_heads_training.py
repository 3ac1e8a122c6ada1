"""Training with nested attention heads (issue 11): the (tier, heads) plans, NestedAdamW's prefix
updates over rows (q/k/v) and columns (o), runtime-head training that leaves every other head
bit-identical (weights and optimizer state), in one process and per rank on 2 gloo processes
(DDP and FSDP2, against a single-process reference, resumed bit-exactly), --nest-heads end to end
with resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from matformer import MatFormerConfig, MatFormerLM
from matformer.cli.train import add_arguments, config_from_args
from matformer.data import text as D
from matformer.io.checkpoint import load_state_dict
from matformer.training import Objective, TrainConfig, lr_at, model_config, train
from matformer.training.objective import step_plan, update_extents
from matformer.training.optimizer import NestedAdamW, build_optimizer, nested_dims, set_lr
from matformer.training.points import Point, all_trained_points, extents, parse_key
from matformer.training.state import STATE_FILE
from tests.conftest import HEADS
from tests.training.test_train_scale import _torchrun

SMALL = dict(preset="debug", batch_size=2, seq_len=32, vocab_size=300, max_corpus_bytes=60_000,
             eval_windows=2, quiet=True, warmup_steps=0)


def _grads(model: MatFormerLM, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_plans_cross_tiers_with_head_granularities():
    cfg = TrainConfig(nest_heads=True, objective="joint", trained_tiers=[0, 2],
                      joint_weights=[1.0, 0.5])
    plan = step_plan(cfg, 256, 0, 0, 1, kv_base=4)
    assert plan == [(Point(t, g), w) for t, w in ((0, 1.0), (2, 0.5)) for g in (4, 2, 1)]
    sample = TrainConfig(nest_heads=True, trained_tiers=[0, 1])
    drawn = [step_plan(sample, 256, s, 0, 1, kv_base=4)[0][0] for s in range(600)]
    counts = {k: drawn.count(k) for k in set(drawn)}
    assert set(counts) == {Point(t, g) for t in (0, 1) for g in (4, 2, 1)}
    assert min(counts.values()) > 600 / 6 * 0.6  # about uniform over the grid
    # without heads in play, plans are the tiers they always were (same draws)
    plain = TrainConfig(trained_tiers=[0, 1])
    assert [step_plan(plain, 256, s, 0, 1, kv_base=4) for s in range(20)] == \
        [step_plan(plain, 256, s, 0, 1) for s in range(20)]
    # a rank at runtime heads 2 trains pairs with at most 2 heads; ranks see each other's plans
    ranks = TrainConfig(nest_heads=True, objective="joint", trained_tiers=[0],
                        rank_kv_heads=[4, 2])
    assert all_trained_points(ranks, 256, 4, 2) == [Point(0, 4), Point(0, 2), Point(0, 1)]
    assert [k for k, _ in step_plan(ranks, 256, 0, 1, 2, kv_base=4)] == [Point(0, 2), Point(0, 1)]
    assert parse_key(str(Point(3, 1))) == Point(3, 1) and parse_key("2") == 2


def test_update_extents_cover_the_widest_pair_any_rank_trains():
    mc = MatFormerConfig.from_preset("debug", **HEADS)
    cfg = TrainConfig(objective="single", tier=1, rank_kv_heads=[1, 2])
    ext = update_extents(cfg, mc, 0, 2)
    assert ext == extents(mc, 128, 2)
    assert ext["model.layers.0.mlp.gate_proj.weight"] == 128
    assert ext["model.layers.1.self_attn.q_proj.weight"] == 2 * 2 * 16
    assert ext["model.layers.1.self_attn.k_proj.weight"] == 2 * 16
    assert ext["model.layers.0.self_attn.o_proj.weight"] == 2 * 2 * 16


@pytest.mark.parametrize("ffn", [256, 128])  # 128: gate rows == q rows, one shared count vector
def test_nested_adamw_updates_row_and_column_prefixes_only(ffn):
    torch.manual_seed(0)
    model = MatFormerLM(MatFormerConfig.from_preset("debug", intermediate_size=ffn, **HEADS))
    opt = NestedAdamW(model, lr=1e-2, weight_decay=0.1, nest_heads=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ext = extents(model.config, ffn, 1)  # FFN whole, 1 KV head
    for step in range(3):
        _grads(model, step)
        opt.step(ext)
    q, kv = 1 * 2 * 16, 16
    cut = {"q_proj": (0, q), "k_proj": (0, kv), "v_proj": (0, kv), "o_proj": (1, q)}
    for i in range(2):
        for name, (dim, n) in cut.items():
            key = f"model.layers.{i}.self_attn.{name}.weight"
            p = dict(model.named_parameters())[key]
            st = opt.state[p]
            tail = (slice(n, None),) if dim == 0 else (slice(None), slice(n, None))
            head = (slice(0, n),) if dim == 0 else (slice(None), slice(0, n))
            assert torch.equal(p.detach()[tail], before[key][tail]), key  # bit-identical
            assert torch.count_nonzero(st["exp_avg"][tail]) == 0
            assert torch.count_nonzero(st["exp_avg_sq"][tail]) == 0
            assert not torch.equal(p.detach()[head], before[key][head])
            assert st["step"][:n].tolist() == [3] * n and st["step"][n:].sum() == 0
        gate = dict(model.named_parameters())[f"model.layers.{i}.mlp.gate_proj.weight"]
        assert opt.state[gate]["step"].tolist() == [3] * ffn  # FFN whole: every row stepped
    # an int extent keeps its old meaning (FFN neurons) and leaves attention whole
    opt2 = NestedAdamW(model, lr=1e-2, nest_heads=True)
    _grads(model, 9)
    opt2.step(64)
    q_p = model.model.layers[0].self_attn.q_proj.weight
    assert opt2.state[q_p]["step"].tolist() == [1] * q_p.shape[0]
    up = model.model.layers[0].mlp.up_proj.weight
    assert opt2.state[up]["step"].tolist() == [1] * 64 + [0] * (ffn - 64)


def test_runtime_head_training_updates_only_the_kept_heads(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=3, eval_every=3, save_every=3,
                      objective="single", tier=1, kv_heads=1, **SMALL)
    train(cfg)
    w = load_file(str(tmp_path / "run" / "model.safetensors"))
    st = load_file(str(tmp_path / "run" / "checkpoints" / "step-0000003" /
                       "training_state.safetensors"))
    init = MatFormerLM(MatFormerConfig.from_json_file(tmp_path / "run" / "config.json"))
    init.reset_parameters(seed=0)
    ref = init.state_dict()
    hd, r = init.config.head_dim, init.config.group_size
    for i in range(init.config.num_hidden_layers):
        for name, dim, n in (("self_attn.q_proj", 0, r * hd), ("self_attn.k_proj", 0, hd),
                             ("self_attn.v_proj", 0, hd), ("self_attn.o_proj", 1, r * hd),
                             ("mlp.gate_proj", 0, 128), ("mlp.down_proj", 1, 128)):
            key = f"model.layers.{i}.{name}.weight"
            tail = (slice(n, None),) if dim == 0 else (slice(None), slice(n, None))
            kept = (slice(0, n),) if dim == 0 else (slice(None), slice(0, n))
            assert torch.equal(w[key][tail], ref[key][tail]), key
            assert not torch.equal(w[key][kept], ref[key][kept]), key
            assert torch.count_nonzero(st[f"optim.{key}.exp_avg"][tail]) == 0
            steps = st[f"optim.{key}.step"]
            assert steps[:n].tolist() == [3] * n and int(steps[n:].sum()) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["num_key_value_heads"] == 2  # the truth: stored heads, not the runtime 1


def test_nest_heads_end_to_end_flags_log_keys_and_resume(tmp_path):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--nest-heads", "--kv-heads", "2", "--rank-kv-heads", "1,2"])
    c = config_from_args(args)
    assert (c.nest_heads, c.kv_heads, c.rank_kv_heads) == (True, 2, [1, 2])
    cfg = TrainConfig(out=str(tmp_path / "run"), steps=2, eval_every=2, save_every=2,
                      nest_heads=True, objective="joint", trained_tiers=[0, 3], **SMALL)
    res = train(cfg)
    want = {Point(t, g) for t in (0, 3) for g in (2, 1)}
    assert set(res.final_val_loss) == want
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert set(summary["final_val_loss"]) == {"0/kv2", "0/kv1", "3/kv2", "3/kv1"}
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["nest_heads"] is True
    resumed = train(TrainConfig(**{**cfg.to_dict(), "steps": 3, "resume": True}))
    assert set(resumed.final_val_loss) == want and resumed.history[0]["step"] == 2
    assert all(np.isfinite(v) for v in resumed.final_val_loss.values())
    assert set(resumed.history[0]["val_loss"]) == want  # 'T/kvG' keys parsed back


# ---- per-rank runtime heads on 2 gloo processes (DDP and FSDP2) --------------------------------

# G = 4 KV heads (8 query heads, 2 per KV head): rank 0 at runtime heads 2 (= G/2) and tier 1,
# rank 1 at 1 head and tier 2; `joint`, so every step uses the same prefixes (counts = steps).
RANK_HEADS_ARGS = ["--preset", "debug", "--num-heads", "8", "--num-kv-heads", "4", "--head-dim",
                   "16", "--steps", "4", "--save-every", "2", "--batch-size", "2", "--seq-len",
                   "32", "--lr", "1e-2", "--warmup-steps", "2", "--vocab-size", "300",
                   "--eval-every", "1000", "--eval-windows", "2", "--val-fraction", "0.1",
                   "--objective", "joint", "--rank-tiers", "1,2", "--rank-kv-heads", "2,1"]


def _rank_heads_reference(cfg: TrainConfig, out: Path) -> tuple[MatFormerLM, dict, NestedAdamW]:
    """Single process: each rank's batch at each of its plan's (tier, heads) points, the ranks'
    gradients averaged as DDP does (each divided by the world size, then summed in rank order:
    summing `loss / world` backward passes instead differs by float rounding, which Adam can
    amplify past 1e-6 where a gradient cancels), NestedAdamW over the prefixes any rank used."""
    tok = D.load_tokenizer(out)
    train_texts, _ = D.split_texts(D.load_texts(cfg.data), cfg.val_fraction, cfg.split_seed)
    sampler = D.WindowSampler(D.tokenize(tok, train_texts, cfg.cache_dir), cfg.seq_len, cfg.seed)
    mc = model_config(cfg, tok.get_vocab_size())
    model = MatFormerLM(mc)
    model.reset_parameters(seed=cfg.seed)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, cfg)
    obj, world, B = Objective(model), 2, cfg.batch_size
    for step in range(cfg.steps):
        x = torch.from_numpy(sampler.next(world * B))
        set_lr(opt, lr_at(cfg, step))
        total: dict[str, torch.Tensor] = {}
        for r in range(world):
            for item in step_plan(cfg, mc.base, step, r, world, kv_base=mc.base_kv_heads):
                loss, _ = obj(x[r * B:(r + 1) * B], [item])
                loss.backward()
            for name, p in model.named_parameters():
                g = p.grad / world
                total[name] = g if r == 0 else total[name] + g
                p.grad = None
        for name, p in model.named_parameters():
            p.grad = total[name]
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step(update_extents(cfg, mc, step, world))
        opt.zero_grad(set_to_none=True)
    return model, init, opt


def _checkpoint(ckpt: Path, fsdp: bool, tmp: Path) -> tuple[dict, dict]:
    """(weights, optimizer state by 'name.exp_avg' / '.exp_avg_sq' / '.step') a checkpoint holds:
    the single-file state of a DDP run, the DCP folder of an FSDP2 run (read without a process
    group, all shards gathered)."""
    if not fsdp:
        st = load_file(str(ckpt / STATE_FILE))
        return load_state_dict(ckpt), {k[6:]: v for k, v in st.items() if k.startswith("optim.")}
    dcp_to_torch_save(ckpt / "training_state", tmp)
    st = torch.load(tmp, weights_only=False)
    return st["model"], st["optim"]


@pytest.mark.parametrize("fsdp,nest", [(False, False), (True, True)])
def test_rank_kv_heads_on_two_processes_match_one_keep_other_heads_and_resume(
        tmp_path, corpus, fsdp, nest):  # noqa: F811 (the imported fixture)
    """DDP (each rank at exactly its heads) and FSDP2 with --nest-heads (rank 0 trains heads 2
    and 1, rank 1 only 1: plans of 6 and 2 passes, the shorter padded): the weights equal the
    single-process reference; the heads past 2 (q/k/v rows, o columns) and the FFN past tier 1
    keep their initial weights bit for bit, with zero moments and zero step counts; resuming the
    step-2 checkpoint on 2 processes ends bit-identical in weights and optimizer state."""
    common = ["--data", str(corpus), "--cache-dir", str(tmp_path / "cache"), *RANK_HEADS_ARGS,
              *(["--fsdp"] if fsdp else []), *(["--nest-heads"] if nest else [])]
    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(["--out", str(a), *common])
    cfg = TrainConfig(**json.loads((a / "train_config.json").read_text()))
    assert (cfg.rank_kv_heads, cfg.rank_tiers, cfg.fsdp, cfg.nest_heads) == ([2, 1], [1, 2], fsdp,
                                                                              nest)
    model, init, ref_opt = _rank_heads_reference(cfg, a)
    mc = model.config
    assert (mc.base_kv_heads, mc.group_size, mc.head_dim) == (4, 2, 16)
    got = load_state_dict(a)
    for k, v in model.state_dict().items():
        # to rounding: another accumulation and norm order and thread count than the run's
        # (test_train.test_two_process_gloo_rank_tiers_match_single_process says why)
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    weights, moments = _checkpoint(a / "checkpoints" / "step-0000004", fsdp, tmp_path / "a.pt")
    assert all(torch.equal(weights[k], got[k]) for k in got)
    kept, dim_of = extents(mc, mc.base >> 1, 2), nested_dims(True)
    for name, n in kept.items():
        tail = (slice(n, None),) if dim_of(name) == 0 else (slice(None), slice(n, None))
        head = (slice(0, n),) if dim_of(name) == 0 else (slice(None), slice(0, n))
        assert torch.equal(got[name][tail], init[name][tail]), name  # bit-identical
        assert not torch.equal(got[name][head], init[name][head]), name  # the kept part trained
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.count_nonzero(moments[f"{name}.{m}"][tail]) == 0, name
        steps = moments[f"{name}.step"]
        assert steps[:n].tolist() == [4] * n and int(steps[n:].sum()) == 0, name
        assert torch.equal(ref_opt.state[dict(model.named_parameters())[name]]["step"], steps)

    _torchrun(["--out", str(b), *common, "--resume", str(a / "checkpoints" / "step-0000002")])
    got_b = load_state_dict(b)
    assert all(torch.equal(got[k], got_b[k]) for k in got)
    _, moments_b = _checkpoint(b / "checkpoints" / "step-0000004", fsdp, tmp_path / "b.pt")
    assert moments.keys() == moments_b.keys()
    assert all(torch.equal(moments[k], moments_b[k]) for k in moments)
