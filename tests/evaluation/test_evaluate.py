"""Evaluation of every width (matformer.evaluate) and the `generate` / `eval` verbs."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM, parameter_counts
from matformer.data.text import heldout_windows
from matformer.errors import MatFormerError
from matformer.evaluation.lm import evaluate
from matformer.evaluation.report import format_eval_report
from matformer.tiers import mix_n_match_plans
from tests.conftest import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")




def test_eval_numbers_agree_with_a_direct_computation() -> None:
    model = tiny_lm(distinct=True)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (700,), generator=g)
    rep = evaluate(model, tokens, seq_len=32, max_tokens=640, batch_size=3, mix_n_match=False,
                   plans=[[64, 128]], decode=False, speculative=False)
    windows = torch.as_tensor(heldout_windows(tokens.numpy(), 32, 20))  # spread over the stream
    assert rep.windows == 20 and rep.seq_len == 32 and rep.tokens == 20 * 31
    # reference first, then from the largest to the smallest
    assert [r.name for r in rep.results] == ["tier 0", "tier 1", "mix[64,128]", "tier 2", "tier 3"]
    assert [r.kind for r in rep.results] == ["tier", "tier", "custom", "tier", "tier"]
    with torch.no_grad():
        ref_logp = torch.log_softmax(model(windows), -1)
        for r in rep.results:
            with model.at_width(widths=r.widths):
                # loss: the mean of model.loss over the (equal-length) windows
                direct = torch.stack([model.loss(w[None]) for w in windows]).mean().item()
                logp = torch.log_softmax(model(windows), -1)
            assert r.loss == pytest.approx(direct, rel=1e-5)
            assert r.perplexity == pytest.approx(math.exp(direct), rel=1e-5)
            assert r.non_embedding_params == parameter_counts(model.config, r.widths)["non_embedding"]
            kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()
            assert r.kl_from_reference == pytest.approx(kl, rel=1e-4, abs=1e-7)
            match = (logp.argmax(-1) == ref_logp.argmax(-1)).float().mean().item()
            assert r.greedy_match == pytest.approx(match)
            assert r.tokens_per_s > 0
    ref = rep.results[0]
    assert ref.greedy_match == 1.0 and ref.kl_from_reference == pytest.approx(0.0, abs=1e-6)
    assert rep.results[-1].greedy_match < 1.0 and rep.results[-1].kl_from_reference > 0
    assert model.widths == model.stored_widths


def test_speculative_report_and_decode_speed() -> None:
    model = tiny_lm(1, distinct=True)
    tokens = torch.randint(0, model.config.vocab_size, (600,), generator=torch.Generator().manual_seed(1))
    rep = evaluate(model, tokens, seq_len=64, max_tokens=512, spec_prompts=2, spec_prompt_len=8,
                   spec_new_tokens=24, draft_tokens=3)
    auto, *rows = rep.speculative
    assert [s.draft_name for s in rows] == ["tier 1", "tier 2", "tier 3"]
    # The automatic choice runs through the same speculative_generate and reports what it chose
    # and why: here (widths that disagree) its probe of the first tokens settles on plain
    # decoding without timing anything (issue 28: auto costs nothing measurable then).
    assert auto.chosen and auto.identical and auto.draft_name == "auto: plain"
    costs, choice = rep.speculative_costs, rep.speculative_choice
    assert costs == {} and choice["draft"] is None and auto.drafted == 0
    # (the warm-up call probed; the timed calls reuse its verdict: `generate` itself)
    assert choice["reason"].startswith("no draft can pay, as earlier calls' probes found: tier 1")
    assert auto.chosen_draft_tokens == choice["k"] == 0
    for s in rows:
        assert s.identical  # greedy speculative == plain, on data prompts
        assert 0 < s.accepted <= s.drafted and s.acceptance_rate == s.accepted / s.drafted
        assert s.speedup == pytest.approx(s.speculative_tokens_per_s / s.plain_tokens_per_s)
    assert all(r.decode_tokens_per_s and r.decode_tokens_per_s > 0 for r in rep.results)
    mixes = [r for r in rep.results if r.kind == "mix"]
    assert mixes and all(r.widths == sorted(r.widths) for r in mixes)
    text = format_eval_report(rep)
    assert "KL(P_reference || P_width)" in text and "speed-up" in text
    assert "auto chose plain decoding (no draft can pay, as earlier calls' probes" in text
    json.dumps(rep.to_dict())


def test_mix_n_match_points_follow_least_slope() -> None:
    mixes = mix_n_match_plans(1024, 8, [0, 1, 2])
    assert [512] * 6 + [1024] * 2 in mixes and [256] * 4 + [512] * 4 in mixes
    for ws in mixes:
        assert ws == sorted(ws)  # non-decreasing with depth
        assert len(set(ws)) == 2 and max(ws) == 2 * min(ws)  # one change, neighbouring tiers
    assert len(mixes) == 6


def test_a_sliced_model_is_its_own_reference() -> None:
    full = tiny_lm(2, distinct=True)
    small = MatFormerLM(full.config.with_widths(128)).eval()
    tokens = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(2))
    rep = evaluate(small, tokens, seq_len=32, decode=False, speculative=False)
    assert [r.name for r in rep.results if r.kind == "tier"] == ["tier 1", "tier 2", "tier 3"]
    assert rep.reference_widths == [128, 128] and rep.results[0].greedy_match == 1.0


def test_eval_layer_tiers_is_one_point_like_tier() -> None:
    """`layer_tiers` names one per-layer point, like `tier` one uniform one: that point and the
    stored reference; the two together are one request too many."""
    model = tiny_lm(distinct=True)
    tokens = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3))
    rep = evaluate(model, tokens, seq_len=32, decode=False, speculative=False,
                   layer_tiers=[2, 1], kv_heads=[])
    assert [(r.name, r.widths) for r in rep.results] == [("tier 0 (width 256)", [256, 256]),
                                                        ("mix[64,128]", [64, 128])]
    with pytest.raises(MatFormerError, match="exactly one of tier, layer_tiers, widths"):
        evaluate("no/such-ckpt", tier=1, layer_tiers=[1, 1])


# ---- the verbs, on a small saved checkpoint --------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from matformer.data.text import load_texts, save_tokenizer, split_texts, train_tokenizer
    from matformer.io.checkpoint import save_model

    texts, _ = split_texts(load_texts(None, max_bytes=150_000))
    tok = train_tokenizer(texts, 384)
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset("debug", vocab_size=tok.get_vocab_size())
    model = MatFormerLM(cfg).eval()
    out = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(model, out)
    save_tokenizer(tok, out)
    # Same split as `matformer train --max-corpus-bytes 150000` would record.
    (out / "train_config.json").write_text(json.dumps({"max_corpus_bytes": 150_000}))
    return out



def test_generate_verb_streams_text_and_speculative_matches(ckpt, run_cli) -> None:
    code, plain, err = run_cli("generate", str(ckpt), "--prompt", "def main(", "--max-new-tokens",
                             "12")
    assert code == 0 and plain.strip() and "tok/s at tier 0" in err
    code, spec, err = run_cli("generate", str(ckpt), "--max-new-tokens", "12", "--draft-tier", "2",
                            "--draft-tokens", "3", stdin="def main(")
    assert code == 0 and spec == plain and "draft tier 2" in err
    code, small, _ = run_cli("generate", str(ckpt), "--prompt", "def main(", "--max-new-tokens", "12",
                           "--tier", "3", "--temperature", "0.9", "--top-k", "20", "--seed", "3")
    assert code == 0 and small.strip()


def test_generate_verb_errors(ckpt, tmp_path, run_cli) -> None:
    code, out, err = run_cli("generate", str(ckpt), "--prompt", "   ")
    assert code == 2 and "prompt is empty" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("generate", str(ckpt), stdin="")
    assert code == 2 and "prompt is empty" in err
    # A width this checkpoint can't run: tier 9 of base 256 is no width; a sliced checkpoint
    # can't run wider than it stores.
    code, out, err = run_cli("generate", str(ckpt), "--prompt", "x", "--tier", "9")
    assert code == 2 and "tier 9" in err and len(err.strip().splitlines()) == 1
    from matformer.io.checkpoint import load_model, save_model

    sliced = tmp_path / "t2"
    m = load_model(ckpt)
    small = MatFormerLM(m.config.with_widths(64)).eval()
    save_model(small, sliced)
    shutil.copy(ckpt / "tokenizer.json", sliced / "tokenizer.json")
    code, out, err = run_cli("generate", str(sliced), "--prompt", "x", "--tier", "0")
    assert code == 2 and "load the full checkpoint" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli("generate", str(sliced), "--prompt", "x", "--draft-tier", "1")
    assert code == 2 and "tier 1" in err
    # no tokenizer.json
    (sliced / "tokenizer.json").unlink()
    code, out, err = run_cli("generate", str(sliced), "--prompt", "x")
    assert code == 2 and "tokenizer.json" in err and len(err.strip().splitlines()) == 1


def test_eval_verb_json_plot_and_data(ckpt, tmp_path, run_cli) -> None:
    png = tmp_path / "curve.png"
    code, out, err = run_cli("eval", str(ckpt), "--json", "--plot", str(png), "--max-tokens", "1024",
                           "--seq-len", "64", "--widths", "64,256")
    assert code == 0
    rep = json.loads(out)
    kinds = {r["kind"] for r in rep["results"]}
    assert kinds == {"tier", "mix", "custom"}
    assert rep["split"] == "held-out" and rep["data"].startswith("held-out part of ")
    assert rep["kl_direction"].startswith("KL(P_reference || P_width)")
    assert all(s["identical"] for s in rep["speculative"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = tmp_path / "val.txt"
    text.write_text("import os\nprint(os.getcwd())\n" * 40)
    report_file = tmp_path / "report.json"
    code, out, err = run_cli("eval", str(ckpt), "--data", str(text), "--seq-len", "32",
                           "--no-speculative", "--no-decode", "--tiers", "0,2",
                           "--json-out", str(report_file))
    assert code == 0 and "tier 2" in out and "tier 1" not in out
    # --json-out writes the same report the table shows.
    written = json.loads(report_file.read_text())
    assert {r["name"] for r in written["results"]} >= {"tier 0", "tier 2"}
    # --data names a corpus: only its held-out part is scored, and the report says so
    assert written["split"] == "held-out" and written["data"].startswith(f"held-out part of {text}")
    assert "data: held-out part of" in err
    code, out, err = run_cli("eval", str(ckpt), "--plot", str(tmp_path / "x.pdf"))
    assert code == 2 and ".png" in err
