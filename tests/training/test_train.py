"""Training: objectives lower every trained width's loss, runtime tiers leave the tail untouched,
the saved tier is the stored one, SIGKILL + resume is bit-exact, a 2-process gloo run with
different rank tiers matches a single-process computation, and bad input gives clear errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from matformer.cli import main as cli_main
from matformer.data import text as D
from matformer.io.checkpoint import load_state_dict
from matformer.models.lm.model import MatFormerLM
from matformer.training import (
    NestedAdamW,
    Objective,
    TrainConfig,
    evaluate_tiers,
    lr_at,
    model_config,
    step_plan,
    train,
    update_extent,
)
from matformer.training.distributed import Dist, clip_grads, grad_norm, shard_dim
from tests.conftest import tiny_config as tiny

FFN = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")


def cli_args(cfg: TrainConfig) -> list[str]:
    return ["train", "--out", cfg.out, "--data", cfg.data, "--preset", cfg.preset,
            "--steps", str(cfg.steps), "--batch-size", str(cfg.batch_size), "--seq-len",
            str(cfg.seq_len), "--lr", str(cfg.lr), "--warmup-steps", str(cfg.warmup_steps),
            "--vocab-size", str(cfg.vocab_size), "--eval-every", str(cfg.eval_every),
            "--save-every", str(cfg.save_every), "--eval-windows", str(cfg.eval_windows),
            "--cache-dir", cfg.cache_dir, "--val-fraction", str(cfg.val_fraction), "--quiet"]


def initial_model(out: Path, cfg: TrainConfig) -> MatFormerLM:
    """The model as the run initialised it (same seed, same tokenizer size)."""
    model = MatFormerLM(model_config(cfg, D.load_tokenizer(out).get_vocab_size()))
    model.reset_parameters(seed=cfg.seed)
    return model


def val_windows(out: Path, cfg: TrainConfig) -> torch.Tensor:
    return torch.from_numpy(D.heldout_windows(D.heldout_tokens(out), cfg.seq_len, cfg.eval_windows))


def check_saved_config(folder: Path, base: int = 256) -> None:
    c = json.loads((folder / "config.json").read_text())
    assert c["matformer_tier"] == 0 and c["intermediate_size"] == base
    assert c["matformer_base_intermediate_size"] == base


# ---- objectives --------------------------------------------------------------------------------


@pytest.mark.parametrize("objective,tier,trained", [
    ("sample", None, [0, 1, 2, 3]),
    ("joint", None, [0, 1, 2, 3]),
    ("single", 2, [2]),
])
def test_objective_lowers_loss_of_every_trained_width(tmp_path, corpus, objective, tier, trained,
                                                     capsys):
    cfg = tiny(tmp_path, corpus, objective=objective, tier=tier, quiet=False, log_every=1000)
    res = train(cfg)
    printed = capsys.readouterr().out
    # A run that never trained tier 0 says how to get a checkpoint of the width it did train.
    assert ("only tiers [2] were trained" in printed and "--tier 2" in printed) == (0 not in trained)
    out = Path(cfg.out)
    assert sorted(res.final_val_loss) == trained
    before = evaluate_tiers(initial_model(out, cfg), val_windows(out, cfg), trained, 8)
    for t in trained:
        assert res.final_val_loss[t] < before[t] - 1.0, (t, before[t], res.final_val_loss[t])
    # what train() reports is what the saved model computes
    saved = load_state_dict(out)
    model = initial_model(out, cfg)
    model.load_state_dict({k: v.clone() for k, v in saved.items()})
    after = evaluate_tiers(model, val_windows(out, cfg), trained, cfg.batch_size)
    assert after == pytest.approx(res.final_val_loss, rel=1e-5)
    check_saved_config(out)  # full-width tensors on disk -> tier 0, whatever was trained
    check_saved_config(out / "checkpoints" / f"step-{cfg.steps:07d}")


def test_runtime_tier_leaves_tail_bit_identical(tmp_path, corpus):
    cfg = tiny(tmp_path, corpus, objective="sample", tier=1, steps=12, weight_decay=0.5)
    res = train(cfg)
    assert sorted(res.final_val_loss) == [1, 2, 3]
    out = Path(cfg.out)
    init = initial_model(out, cfg).state_dict()
    final = load_state_dict(out)
    m = 256 >> 1
    for name, w0 in init.items():
        w1 = final[name]
        if name.endswith(FFN):
            dim = 1 if "down_proj" in name else 0
            assert torch.equal(w1.narrow(dim, m, w0.shape[dim] - m), w0.narrow(dim, m, w0.shape[dim] - m)), name
            assert not torch.equal(w1.narrow(dim, 0, m), w0.narrow(dim, 0, m)), name
        else:
            assert not torch.equal(w1, w0), name
    # the optimizer never touched the tail's moments or step counts either
    state = load_state_dict_raw(out / "checkpoints" / f"step-{cfg.steps:07d}" / "training_state.safetensors")
    g = state["optim.model.layers.0.mlp.gate_proj.weight.exp_avg"]
    steps = state["optim.model.layers.0.mlp.gate_proj.weight.step"]
    assert (g[m:] == 0).all() and (g[:m] != 0).any()
    assert (steps[m:] == 0).all() and steps[0] == cfg.steps
    check_saved_config(out)


def load_state_dict_raw(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- the optimizer -----------------------------------------------------------------------------


def test_nested_adamw_is_adamw_per_neuron():
    """Full extent == torch.optim.AdamW; a neuron used on k of n steps follows exactly the AdamW
    trajectory of those k steps (moments, decay and bias correction), untouched on the others."""
    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.model = torch.nn.Module()
    mlp = torch.nn.Linear(8, 16, bias=False)
    layer.model.layers = torch.nn.ModuleList([torch.nn.Module()])
    layer.model.layers[0].mlp = torch.nn.Module()
    layer.model.layers[0].mlp.gate_proj = mlp
    w = mlp.weight
    kw = dict(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = NestedAdamW(layer, **kw)
    head = torch.nn.Parameter(w.detach()[:4].clone())  # neurons [:4]: used on every step
    tail = torch.nn.Parameter(w.detach()[4:].clone())  # neurons [4:]: used on steps 0 and 2
    ref_h = torch.optim.AdamW([head], foreach=False, **kw)
    ref_t = torch.optim.AdamW([tail], foreach=False, **kw)
    for extent in (16, 4, 16, 4):
        g = torch.randn_like(w)
        g[extent:] = 0  # what the nested FFN's backward gives the unused neurons
        w.grad = g.clone()
        opt.step(extent)
        head.grad = g[:4].clone()
        ref_h.step()
        if extent == 16:
            tail.grad = g[4:].clone()
            ref_t.step()
        assert torch.equal(w.detach()[:4], head.detach())
        assert torch.equal(w.detach()[4:], tail.detach())
    assert opt.state[w]["step"].tolist() == [4] * 4 + [2] * 12


# ---- resume ------------------------------------------------------------------------------------


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "matformer.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_resume_after_sigkill_is_bit_exact(tmp_path, corpus):
    ref = tiny(tmp_path / "a", corpus, steps=60, save_every=5, eval_every=20)
    killed = dataclasses.replace(ref, out=str(tmp_path / "b" / "run"))
    p = _run_cli(cli_args(ref))
    q = _run_cli(cli_args(killed))
    target = Path(killed.out) / "checkpoints" / "step-0000010"
    deadline = time.time() + 120
    while not target.exists() and q.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    q.send_signal(signal.SIGKILL)
    q.wait(timeout=60)
    assert q.returncode == -signal.SIGKILL
    assert not (Path(killed.out) / "config.json").exists(), "the run finished before the kill"
    assert p.wait(timeout=300) == 0, p.stdout.read()
    r = _run_cli(cli_args(killed) + ["--resume"])
    assert r.wait(timeout=300) == 0, r.stdout.read()
    a, b = load_state_dict(ref.out), load_state_dict(killed.out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((Path(ref.out) / "train_summary.json").read_text())
    sb = json.loads((Path(killed.out) / "train_summary.json").read_text())
    assert sa["final_val_loss"] == sb["final_val_loss"] and sa["history"] == sb["history"]
    # at most keep_checkpoints complete checkpoints remain, no temporary folders
    names = sorted(p.name for p in (Path(killed.out) / "checkpoints").iterdir())
    assert names == ["step-0000055", "step-0000060"]


# ---- distributed -------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["sample", "joint"])
def test_two_process_gloo_rank_tiers_match_single_process(tmp_path, corpus, objective):
    # joint: the ranks' plans hold different numbers of granularities (tiers >= 1 vs >= 2), and
    # each rank still all-reduces exactly once per step.
    cfg = tiny(tmp_path, corpus, steps=5, objective=objective, rank_tiers=[1, 2])
    args = cli_args(cfg) + ["--rank-tiers", "1,2", "--objective", objective]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "matformer.cli", *args],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(cfg.out)
    saved_cfg = TrainConfig(**json.loads((out / "train_config.json").read_text()))
    assert saved_cfg.rank_tiers == [1, 2]

    # Single-process reference: each rank's batch at each rank's plan, gradients averaged.
    tok = D.load_tokenizer(out)
    train_texts, _ = D.split_texts(D.load_texts(cfg.data), cfg.val_fraction, cfg.split_seed)
    sampler = D.WindowSampler(D.tokenize(tok, train_texts, cfg.cache_dir), cfg.seq_len, cfg.seed)
    model = initial_model(out, cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = NestedAdamW(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
    obj = Objective(model)
    base, world, B = 256, 2, cfg.batch_size
    plans = []
    for step in range(cfg.steps):
        x = torch.from_numpy(sampler.next(world * B))
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        for r in range(world):
            plan = step_plan(cfg, base, step, r, world)
            plans.append(plan[0][0])
            loss, _ = obj(x[r * B:(r + 1) * B], plan)
            (loss / world).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = grad_norm(grads, [shard_dim(p.ndim, opt.nest_dim.get(p)) for p in params],
                         Dist(world=world))  # the run's norm: over each gradient's 2 pieces
        clip_grads(grads, norm, cfg.grad_clip)
        opt.step(update_extent(cfg, base, step, world))
        opt.zero_grad(set_to_none=True)
    assert set(plans[0::2]) <= {1, 2, 3} and set(plans[1::2]) <= {2, 3}
    got = load_state_dict(out)
    for k, v in model.state_dict().items():
        # Agreement to rounding, not bits: with `joint` the reference accumulates both ranks'
        # passes into one gradient (DDP sums each rank's, then the two), and it runs with this
        # process's thread count (the run: OMP_NUM_THREADS=1). Those differ by float32 rounding,
        # which 5 AdamW steps carry into the weights as a few ulps (measured: `sample` 0, `joint`
        # <= 7e-8): rtol 1e-5 / atol 1e-6 is a wide margin. The norm must be the run's own
        # (grad_norm over 2 pieces): clipped by torch's whole-tensor norm, one ulp away, the
        # reference drifted past 1e-6 in gate_proj within 5 steps.
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
        if k.endswith(FFN):  # neither rank uses the tier-0 half: it is untouched
            dim = 1 if "down_proj" in k else 0
            assert torch.equal(got[k].narrow(dim, 128, 128), init[k].narrow(dim, 128, 128))
    check_saved_config(out)


# ---- errors ------------------------------------------------------------------------------------


def _sha(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_errors_are_clear_and_change_nothing(tmp_path, corpus, capsys):
    cfg = tiny(tmp_path, corpus, steps=3, save_every=3)
    assert cli_main(cli_args(cfg)) == 0
    out = Path(cfg.out)
    before = _sha(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    fresh = str(tmp_path / "fresh")
    cases = [
        (["--granularity-probs", "0.5,0.2,0.1,0.1"], fresh, "sum to 1"),
        (["--tier-probs", "0.5,x"], fresh, "comma-separated numbers"),
        (["--granularity-probs", "0.5,0.5"], fresh, "one probability per tier"),
        (["--tier", "9"], fresh, "tier 9"),
        (["--rank-tiers", "0,1"], fresh, "one tier per rank"),
        (["--data", str(empty)], fresh, "empty.txt"),
        (["--data", str(tmp_path / "nope")], fresh, "nope: no such file"),
        (["--preset", "nosuch"], fresh, "unknown preset"),
        ([], cfg.out, "already holds a training run"),
        (["--resume"], fresh, "no complete checkpoint"),
        (["--resume", "--preset", "tiny"], cfg.out, "preset"),
        (["--resume", "--seed", "5"], cfg.out, "seed"),
        (["--resume", "--steps", "2"], cfg.out, "past --steps 2"),
    ]
    for extra, where, message in cases:
        args = cli_args(dataclasses.replace(cfg, out=where)) + extra
        assert cli_main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) <= 2, (extra, err)
        assert "Traceback" not in err
    assert _sha(out) == before
    assert not Path(fresh).exists() or not any(Path(fresh).iterdir())


# ---- the held-out numbers: training's log and `matformer eval` agree ---------------------------


def test_last_logged_val_loss_is_what_eval_reports(tmp_path, corpus, capsys):
    import matformer

    cfg = tiny(tmp_path, corpus, steps=8, eval_every=4, quiet=False, log_every=1000)
    matformer.train(cfg)
    printed = capsys.readouterr().out
    assert f"held-out evaluation: {cfg.eval_windows} windows x {cfg.seq_len} tokens" in printed
    records = [json.loads(line) for line in (Path(cfg.out) / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r][-1]
    assert last["step"] == cfg.steps
    for t in (0, 2):
        rep = matformer.evaluate(cfg.out, uniform_tiers=[t], mix_n_match=False, decode=False,
                                 speculative=False)
        assert (rep.windows, rep.seq_len) == (cfg.eval_windows, cfg.seq_len)
        got = next(r.loss for r in rep.results if r.name == f"tier {t}")
        assert got == pytest.approx(last["val_loss"][str(t)], abs=1e-5)
    # the verb, as a user runs it: the same number, and it says which windows it used
    assert cli_main(["eval", cfg.out, "--tiers", "2", "--json", "--no-mix", "--no-decode",
                     "--no-speculative"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    got = next(r["loss"] for r in report["results"] if r["name"] == "tier 2")
    assert got == pytest.approx(last["val_loss"]["2"], abs=1e-5)
    assert f"{cfg.eval_windows} windows x {cfg.seq_len} tokens" in out.err


# ---- settings and flags ------------------------------------------------------------------------


def test_every_setting_is_a_flag_with_its_default():
    import argparse

    from matformer.cli import train as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    assert cmd.config_from_args(p.parse_args([])) == TrainConfig()
    flags = {s for a in p._actions for s in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name
    cfg = cmd.config_from_args(p.parse_args([
        "--granularities", "1,2", "--granularity-probs", "0.25,0.75", "--rank-tiers", "0,1",
        "--lr", "1e-3", "--tier", "1", "--max-corpus-bytes", "1000", "--quiet", "--resume"]))
    assert (cfg.trained_tiers, cfg.tier_probs, cfg.rank_tiers) == ([1, 2], [0.25, 0.75], [0, 1])
    assert (cfg.lr, cfg.tier, cfg.max_corpus_bytes, cfg.quiet, cfg.resume) == (1e-3, 1, 1000, True, True)
    assert cmd.config_from_args(p.parse_args(["--resume", "runs/x"])).resume == "runs/x"
    # train_config.json files written before the rename still read back
    old = TrainConfig.from_dict({"granularities": [0, 1], "granularity_probs": [0.5, 0.5]})
    assert (old.trained_tiers, old.tier_probs) == ([0, 1], [0.5, 0.5])


# ---- resuming from another SRC -----------------------------------------------------------------


def test_resume_from_a_checkpoint_folder_or_a_hub_id_into_a_new_out(tmp_path, corpus):
    from tests.fake_hub import FakeHub

    ref = tiny(tmp_path / "a", corpus, steps=6, save_every=3, eval_every=3)
    train(ref)
    step3 = Path(ref.out) / "checkpoints" / "step-0000003"
    fork = dataclasses.replace(ref, out=str(tmp_path / "fork"), resume=str(step3))
    train(fork)
    a, b = load_state_dict(ref.out), load_state_dict(fork.out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with FakeHub() as hub:
        hub.add_repo("acme/run-step3", {p.name: p.read_bytes() for p in step3.iterdir()})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1",
                   HF_HUB_DISABLE_TELEMETRY="1")
        hubbed = dataclasses.replace(ref, out=str(tmp_path / "hub"))
        r = subprocess.run([sys.executable, "-m", "matformer.cli", *cli_args(hubbed), "--steps",
                            "6", "--resume", "acme/run-step3"], env=env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        # a model without its training state is not a resumable checkpoint
        hub.add_repo("acme/model-only", {p.name: p.read_bytes() for p in step3.iterdir()
                                         if p.name != "training_state.safetensors"})
        other = dataclasses.replace(ref, out=str(tmp_path / "other"))
        r = subprocess.run([sys.executable, "-m", "matformer.cli", *cli_args(other), "--resume",
                            "acme/model-only"], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "holds no training_state.safetensors" in r.stderr, r.stderr
    c = load_state_dict(hubbed.out)
    assert all(torch.equal(a[k], c[k]) for k in a)
