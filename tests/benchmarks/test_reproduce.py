"""Smoke test of benchmarks/paper/reproduce_v1.py (and reproduce_v2.py below): the whole pipeline on a debug-size budget (structure of
the report, parameter counts, compute accounting), the tie/verdict rule, the Mix'n'Match shapes
and the two-model consistency measure (checked against `matformer.evaluation.lm` within one model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.paper import reproduce_v1, reproduce_v2
from matformer.evaluation.lm import evaluate
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM
from matformer.models.lm.shapes import parameter_counts


@pytest.fixture(scope="module")
def rp():
    return reproduce_v1


def test_compare_calls_differences_within_the_spread_ties(rp):
    # Ranges 0.2 and 0.1; means 1.1 and 1.1 -> tie.
    c = rp.compare([1.0, 1.2], [1.05, 1.15], names=("base", "mat"))
    assert c["verdict"] == "tie" and c["spread"] == pytest.approx(0.2)
    # Means 1.005 vs 0.805, spread 0.01: a real difference, b is lower (better) loss.
    c = rp.compare([1.0, 1.01], [0.8, 0.81], names=("base", "mat"))
    assert c["verdict"] == "mat better"
    assert c["delta"] == pytest.approx(-0.2)
    # The same numbers as an accuracy (higher is better) flip the verdict.
    assert rp.compare([1.0, 1.01], [0.8, 0.81], lower_is_better=False, names=("base", "mat"))["verdict"] == "base better"
    # A difference exactly as large as the spread is still a tie; a bit more is not.
    assert rp.compare([0.0, 0.5], [0.5, 1.0])["verdict"] == "tie"
    assert rp.compare([0.0, 0.5], [0.75, 1.25])["verdict"] == "A better"
    s = rp.spread([3.0, 1.0, 2.0])
    assert (s["mean"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)


def test_paired_compare_uses_the_spread_of_the_differences(rp):
    # Seed-to-seed spread of each side is large (1.0), but b is 0.1 lower on every seed.
    a, b = [5.0, 6.0], [4.9, 5.9]
    assert rp.compare(a, b)["verdict"] == "tie"
    c = rp.compare_paired(a, b, names=("nd", "dec"))
    assert c["verdict"] == "dec better" and c["delta"] == pytest.approx(-0.1)
    # Seeds disagreeing on the sign: a tie, however the mean falls.
    assert rp.compare_paired([1.0, 1.0, 1.0], [0.5, 0.6, 1.2])["verdict"] == "tie"
    # Differences that vary more than their mean: a tie.
    assert rp.compare_paired([0.0, 0.0], [0.1, 0.3])["verdict"] == "tie"
    assert rp.compare_paired([0.0, 0.0], [0.3, 0.4])["verdict"] == "A better"


def test_mix_shapes_pair_equal_parameter_counts(rp):
    base, L = 512, 4
    mixes = rp.mix_shapes(base, L)
    shapes = [rp.shape_of(m) for m in mixes]
    # Per neighbouring pair: 3 non-decreasing, 3 decreasing, 2 alternating.
    assert shapes.count("non-decreasing") == 9 and shapes.count("decreasing") == 9
    assert shapes.count("other") == 6 and "uniform" not in shapes
    assert rp.shape_of([64, 64, 128, 128]) == "non-decreasing"
    assert rp.shape_of([128, 64, 64, 64]) == "decreasing"
    assert rp.shape_of([64, 128, 64, 128]) == "other"
    assert rp.shape_of([256] * 4) == "uniform"
    # Every non-non-decreasing shape has a non-decreasing one with the same parameter count.
    cfg = MatFormerConfig.from_preset("tiny")
    nd = {parameter_counts(cfg, m)["non_embedding"] for m in mixes if rp.shape_of(m) == "non-decreasing"}
    for m in mixes:
        assert parameter_counts(cfg, m)["non_embedding"] in nd
    # Only neighbouring tiers are mixed.
    for m in mixes:
        assert len(set(m)) == 2 and max(m) == 2 * min(m)


def test_two_model_consistency_matches_evaluate_within_one_model(rp):
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg)
    model.reset_parameters(seed=1)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
    same = rp.consistency(model, model, windows, batch_size=3)
    assert same["greedy_match"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    # A second copy at tier 2 against the first at full width: the numbers `evaluate` reports
    # for tier 2 of the one model.
    narrow = MatFormerLM(cfg)
    narrow.load_state_dict(model.state_dict())
    narrow.set_widths(tier=2)
    two = rp.consistency(model, narrow, windows, batch_size=3)
    rep = evaluate(model, windows, uniform_tiers=[0, 2], mix_n_match=False, decode=False, speculative=False,
                   seq_len=16, max_tokens=64)
    (row,) = [r for r in rep.results if r.tier == 2]
    assert two["greedy_match"] == pytest.approx(row.greedy_match)
    assert two["kl"] == pytest.approx(row.kl_from_reference, rel=1e-4)
    assert two["kl"] > 0


def test_xl_upweighted_probabilities_follow_the_library_order(rp):
    # Library granularities [0, 1, 2, 3] are XL, L, M, S; the paper lists S, M, L, XL.
    assert rp.XL_UPWEIGHTED_PROBS == (0.41, 0.22, 0.20, 0.17)
    assert math.isclose(sum(rp.XL_UPWEIGHTED_PROBS), 1.0)


def test_pipeline_smoke(rp, tmp_path):
    s = rp.Settings(preset="debug", vocab_size=300, seq_len=32, batch_size=2, baseline_steps=2,
                    seeds=[0, 1], eval_windows=3, jobs=1, max_corpus_bytes=40_000,
                    cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"))
    report = rp.run_experiment(s, log=lambda _m: None)
    cfg = MatFormerConfig.from_preset("debug", vocab_size=300)
    base, L = cfg.base, cfg.num_hidden_layers
    table = report["table"]
    assert set(table) == set(rp.CONFIGS)
    for name in rp.CONFIGS:
        tiers = {r["tier"]: r for r in table[name] if r["shape"] == "uniform"}
        assert sorted(tiers) == [0, 1, 2, 3]
        for t, r in tiers.items():
            # Parameters are those of the width, not of the stored full model.
            assert r["non_embedding_params"] == parameter_counts(cfg, [base >> t] * L)["non_embedding"]
            assert r["seeds"] == [0, 1] and len(r["loss"]) == 2
            assert all(math.isfinite(x) and x > 0 for x in r["loss"])
            st = r["loss_stats"]
            assert st["min"] <= st["mean"] <= st["max"]
        assert tiers[0]["greedy_match"] == [1.0, 1.0]  # XL against itself
        if name != "baseline":  # Mix'n'Match rows only exist for the nested models
            # 2 layers: one change each way, no alternating shape.
            assert {r["shape"] for r in table[name]} == {"uniform", "non-decreasing", "decreasing"}
    assert {r["shape"] for r in table["baseline"]} == {"uniform"}
    # A baseline's consistency is against the XL baseline: a different model, so not identical.
    assert any(r["kl"][0] > 0 for r in table["baseline"] if r["tier"] != 0)
    verdicts = {"tie", "baseline better", "matlm_uniform better", "matlm_xl better", "joint better",
                "uniform better", "xl-upweighted better"}
    claims = report["claims"]
    for name in ("matlm_uniform", "matlm_xl", "joint"):
        assert set(claims["loss_vs_baseline"][name]) == {"XL", "L", "M", "S"}
        assert all(v["verdict"] in verdicts for v in claims["loss_vs_baseline"][name].values())
        assert set(claims["consistency_vs_baseline"][name]) == {"L", "M", "S"}
        assert len(claims["mix_n_match"][name]) == 3  # one parameter count per pair (2 layers)
        for g in claims["mix_n_match"][name]:
            assert [o["shape"] for o in g["others"]] == ["decreasing"]
            assert g["others"][0]["vs_non_decreasing_paired"]["verdict"] in {
                "tie", "non-decreasing better", "decreasing better"}
    assert set(claims["xl_upweighting_vs_uniform"]) == {"XL", "L", "M", "S"}
    # Compute: each baseline 2 steps; sampled MatLM 4x the steps; joint = every tier every step.
    c = report["compute"]
    assert c["baseline-seed0"]["steps_per_tier"] == {"XL": 2, "L": 2, "M": 2, "S": 2}
    assert c["joint-seed0"]["steps_per_tier"] == {"XL": 2, "L": 2, "M": 2, "S": 2}
    assert c["joint-seed0"]["train_flops"] == c["baseline-seed0"]["train_flops"]
    assert sum(c["matlm_uniform-seed1"]["steps_per_tier"].values()) == 8
    assert c["matlm_uniform-seed0"]["train_tokens"] == 4 * report["settings"]["x_tokens"]
    assert len({r["name"] for r in report["runs"]}) == 14
    text = rp.format_tables(report)
    for name in rp.CONFIGS:
        assert name in text
    plots = rp.make_plots(report, tmp_path, "-t", "\ntest")
    assert all(p.stat().st_size > 10_000 for p in plots)


# ---- v2 (issue 15): benchmarks/paper/reproduce_v2.py -----------------------------------------


@pytest.fixture(scope="module")
def rp2():
    return reproduce_v2


def test_kjv_corpus_is_natural_language_by_chapter():
    from matformer.data.text import load_texts

    texts = load_texts("builtin:kjv", max_bytes=200_000)
    assert texts[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
    assert texts[1].startswith("Genesis 2\n")
    assert 150_000 < sum(len(t.encode()) for t in texts) <= 200_000  # capped like the default corpus
    assert len(load_texts("builtin:kjv", max_bytes=10**8)) == 1189  # every chapter of the book


def test_speculative_acceptance_counts_leading_matches(rp2):
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg)
    model.reset_parameters(seed=1)
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (5, 24))
    same = rp2.speculative_acceptance(model, model, windows, gamma=3, device="cpu", batch=2)
    assert same["acceptance_rate"] == 1.0 and same["accepted_per_round"] == 3.0
    assert same["tokens_per_target_call"] == 4.0 and same["rounds"] == 15  # 5 windows x 3 cuts
    other = MatFormerLM(cfg)
    other.reset_parameters(seed=2)
    diff = rp2.speculative_acceptance(model, other, windows, gamma=3, device="cpu", batch=2)
    assert 0.0 <= diff["acceptance_rate"] < 1.0
    # By hand: cuts at 1/4, 1/2, 3/4 of 24 tokens; accepted = the leading run of draft tokens
    # equal to the target's greedy choice.
    hand = []
    with torch.no_grad():
        for cut in (6, 12, 18):
            seq = torch.as_tensor(windows[:1, :cut])
            for _ in range(3):
                seq = torch.cat([seq, other(seq)[:, -1].argmax(-1, keepdim=True)], 1)
            want = model(seq)[0, cut - 1:cut + 2].argmax(-1)
            n = 0
            while n < 3 and int(want[n]) == int(seq[0, cut + n]):
                n += 1
            hand.append(n)
    one = rp2.speculative_acceptance(model, other, windows[:1], gamma=3, device="cpu")
    assert one["rounds"] == 3 and one["accepted_per_round"] == pytest.approx(sum(hand) / 3)


def test_v2_pipeline_end_to_end(rp2, tmp_path):
    s = rp2.Settings(preset="debug", vocab_size=300, seq_len=32, batch_size=2, baseline_steps=2,
                     seeds=[0, 1], eval_windows=3, jobs=1, max_corpus_bytes=40_000,
                     cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"))
    report = rp2.run_experiment(s, log=lambda _m: None)
    cfg = MatFormerConfig.from_preset("debug", vocab_size=300)
    base, L = cfg.base, cfg.num_hidden_layers
    assert set(report["table"]) == {"python", "kjv"}
    assert set(report["table"]["python"]) == set(rp2.ALL_CONFIGS)
    assert set(report["table"]["kjv"]) == set(rp2.SECONDARY_CONFIGS) == {"baseline", "matlm_uniform"}
    assert len(report["runs"]) == 2 * (4 + 4) + 2 * (4 + 1)
    assert report["tokenizer_sha256"]["python"] != report["tokenizer_sha256"]["kjv"]
    for corpus, by_cfg in report["table"].items():
        for name, rows in by_cfg.items():
            for t in rp2.TIERS:
                r = rp2._tier(rows, t)
                assert r["non_embedding_params"] == parameter_counts(cfg, [base >> t] * L)["non_embedding"]
                assert r["seeds"] == [0, 1] and all(math.isfinite(x) and x > 0 for x in r["loss"])
            assert rp2._tier(rows, 0)["greedy_match"] == [1.0, 1.0]
            shapes = {r["shape"] for r in rows}
            assert shapes == ({"uniform"} if name == "baseline" else {"uniform", "non-decreasing", "decreasing"})
        cl = report["claims"][corpus]
        wm = cl["width_matters"]
        assert wm["verdict"].startswith(("width matters", "not shown"))
        assert wm["baseline_s_minus_xl"]["mean"] == pytest.approx(
            rp2._tier(by_cfg["baseline"], 3)["loss_stats"]["mean"] - rp2._tier(by_cfg["baseline"], 0)["loss_stats"]["mean"])
        assert set(cl["loss_vs_baseline"]) == set(by_cfg) - {"baseline"}
        assert set(cl["speculative"]) == {"same_target_matlm_xl", "same_target_matlm_xl_paired", "own_pair"}
        spec = report["spec"][corpus]
        assert spec["matlm_xl<-matlm_s"]["seeds"] == [0, 1]
        for pair in spec.values():
            assert all(0.0 <= v["acceptance_rate"] <= 1.0 for v in pair["values"])
    assert set(report["claims"]["python"]["closes_gap_at_equal_compute"]) == {"joint", "joint_xl"}
    assert set(report["claims"]["python"]["xl_upweighting_sample"]) == {"XL", "L", "M", "S"}
    # Budgets: baseline X per width; sampled MatLM 4X tokens; joint X tokens at the baselines' FLOPs.
    c = report["compute"]
    x = report["settings"]["x_tokens"]
    assert c["python-baseline-seed0"]["passes_per_width"] == {"XL": 2, "L": 2, "M": 2, "S": 2}
    assert c["python-baseline-seed0"]["train_tokens"] == 4 * x
    assert c["python-matlm_uniform-seed0"]["train_tokens"] == 4 * x
    assert c["python-joint-seed1"]["train_tokens"] == x
    assert c["python-joint-seed1"]["train_flops"] == c["python-baseline-seed1"]["train_flops"]
    text = rp2.format_tables(report)
    assert "corpus python" in text and "corpus kjv" in text and "equal compute" in text
    plots = rp2.make_plots(report, tmp_path, "-t")
    assert len(plots) == 3 and all(p.stat().st_size > 10_000 for p in plots)
    # --replot recomputes the same summary from the raw evaluations.
    js = tmp_path / "r.json"
    js.write_text(__import__("json").dumps(report))
    assert rp2.replot(js) == 0


@pytest.mark.slow  # ~13 s: the opt-in configs; the default v2 pipeline stays in CI
def test_v2_opt_in_configs_heads_and_tail_lr_end_to_end(rp2, tmp_path, monkeypatch):
    """joint_heads and joint_tail: not in the default run, trained with --configs, their compute
    counted per (tier, KV heads), reported against the baselines and joint, and reused by
    --resume (a run naming only one of them evaluates without the speculative group, and its
    results merge into the JSON it continues)."""
    import json

    from matformer.tiers import head_granularities

    assert not set(rp2.EXTRA_CONFIGS) & set(rp2.ALL_CONFIGS)
    assert rp2.Settings().configs == list(rp2.ALL_CONFIGS)
    with pytest.raises(SystemExit, match="unknown configuration 'joint_nope'"):
        rp2.main(["--configs", "joint,joint_nope"])
    kw = dict(preset="debug", vocab_size=300, seq_len=32, batch_size=2, baseline_steps=2, seeds=[0, 1],
              eval_windows=3, jobs=1, max_corpus_bytes=40_000, corpora=["python"],
              cache_dir=str(tmp_path / "cache"), out=str(tmp_path / "runs"))
    s = rp2.Settings(configs=["joint", "joint_heads", "joint_tail"], **kw)
    report = rp2.run_experiment(s, log=lambda _m: None)
    cfg = MatFormerConfig.from_preset("debug", vocab_size=300)
    base, L, G = cfg.base, cfg.num_hidden_layers, cfg.base_kv_heads
    heads = head_granularities(G)
    assert len(heads) == 2  # the debug preset nests 2 -> 1 KV heads, like ffn8-*
    assert set(report["table"]["python"]) == {"baseline", "joint", "joint_heads", "joint_tail"}
    ts = report["train_settings"]
    assert ts["python-joint_heads-seed0"]["nest_heads"] is True
    assert ts["python-joint_heads-seed0"]["joint_weights"] == [0.25 / len(heads)] * 4  # a mean
    assert ts["python-joint_tail-seed0"]["tail_lr_scale"] == rp2.TAIL_LR_SCALE == 2.0
    assert "tail_lr_scale" not in ts["python-joint-seed0"] and "nest_heads" not in ts["python-joint-seed0"]
    saved = json.loads((tmp_path / "runs" / "python-joint_tail-seed1" / "train_config.json").read_text())
    assert saved["tail_lr_scale"] == 2.0  # the setting reached the library's run
    # Compute: joint_heads runs every (tier, heads) pair a step; its FLOPs by hand.
    c, x = report["compute"], report["settings"]["x_tokens"]
    ch = c["python-joint_heads-seed0"]
    assert ch["passes_per_point"] == {f"{rp2.TIER_NAMES[t]}/kv{g}": 2 for t in rp2.TIERS for g in heads}
    assert ch["train_tokens"] == x
    n = {(t, g): parameter_counts(cfg, [base >> t] * L, [g] * L)["non_embedding"] + 300 * cfg.hidden_size
         for t in rp2.TIERS for g in heads}
    ratio = sum(n.values()) / sum(n[(t, G)] for t in rp2.TIERS)
    assert 1.5 < ratio < 2.0 and ch["flops_vs_baselines"] == pytest.approx(ratio)
    assert report["budgets"]["joint_heads"] == f"X tokens, {ratio:.2f}x the baselines' compute"
    assert c["python-joint_tail-seed1"]["train_flops"] == c["python-baseline-seed1"]["train_flops"]
    assert c["python-joint_tail-seed1"]["flops_vs_baselines"] == 1.0
    # Claims: against the baselines (equal compute or not, labelled) and against joint.
    cl = report["claims"]["python"]
    assert set(cl["closes_gap_at_equal_compute"]) == {"joint", "joint_tail"}
    assert set(cl["closes_gap_at_more_compute"]) == {"joint_heads"}
    assert set(cl["vs_joint"]) == {"joint_heads", "joint_tail"}
    d = cl["vs_joint"]["joint_tail"]["XL"]
    table = report["table"]["python"]
    assert d["delta"] == pytest.approx(rp2._tier(table["joint_tail"], 0)["loss_stats"]["mean"]
                                       - rp2._tier(table["joint"], 0)["loss_stats"]["mean"])
    # Every nested model also at 1 KV head per tier, with the parameters of that setting.
    rh = cl["reduced_heads"]
    assert set(rh) == {"joint", "joint_heads", "joint_tail", "joint_heads_vs_joint"}
    for name in ("joint", "joint_heads", "joint_tail"):
        for t in rp2.TIERS:
            r = next(r for r in report["heads"]["python"][name] if r["tier"] == t)
            assert r["kv_heads"] == 1 and r["seeds"] == [0, 1]
            assert r["non_embedding_params"] == parameter_counts(cfg, [base >> t] * L, [1] * L)["non_embedding"]
            assert r["non_embedding_params"] < rp2._tier(table[name], t)["non_embedding_params"]
            full = rp2._tier(table[name], t)["loss"]
            assert rh[name][rp2.TIER_NAMES[t]]["minus_full_heads"]["mean"] == pytest.approx(
                float(np.mean(r["loss"]) - np.mean(full)))
    assert "python" not in report["spec"]  # no matlm_uniform: no speculative group
    text, md = rp2.format_tables(report), rp2.markdown_tables(report)
    for needle in ("joint_heads - joint", "joint_tail - joint", "joint_heads @kv1", "1.8"):
        assert needle in text
    assert "joint_tail − joint" in md and "| joint_heads @ 1 |" in md
    assert len(rp2.make_plots(report, tmp_path, "-x")) == 3
    # --resume naming only joint_tail: its runs are reused, not trained again, and the results
    # merge into the JSON already under --results (nothing of it lost, the summary recomputed).
    res = tmp_path / "results"
    res.mkdir()
    (res / "reproduce_v2.json").write_text(json.dumps(report))
    model = tmp_path / "runs" / "python-joint_tail-seed0" / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    monkeypatch.setenv("MATFORMER_CACHE", kw["cache_dir"])
    cli = ["--preset", "debug", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2",
           "--baseline-steps", "2", "--seeds", "0,1", "--eval-windows", "3", "--jobs", "1",
           "--max-corpus-bytes", "40000", "--corpora", "python", "--out", kw["out"],
           "--results", str(res), "--resume"]
    assert rp2.main([*cli, "--configs", "joint_tail"]) == 0
    assert model.stat().st_mtime_ns == mtime
    merged = json.loads((res / "reproduce_v2.json").read_text())
    assert set(merged["table"]["python"]) == {"baseline", "joint", "joint_heads", "joint_tail"}
    assert merged["table"]["python"] == json.loads(json.dumps(report["table"]["python"]))
    assert merged["claims"]["python"]["vs_joint"] == json.loads(json.dumps(cl["vs_joint"]))
    assert merged["budgets"]["joint_heads"] == report["budgets"]["joint_heads"]
    assert len(merged["runs"]) == len(report["runs"]) and len(merged["evals"]) == len(report["evals"])
    assert [st["trained"] for st in merged["stages"]] == [[r["name"] for r in report["runs"]], []]
    assert merged["stages"][1]["command"].endswith("--resume --configs joint_tail")
    # Results of another scale are not merged: one line, before anything is trained.
    with pytest.raises(SystemExit, match="seq_len = 32, this run has 16"):
        rp2.main([*cli, "--configs", "joint_tail", "--seq-len", "16"])
