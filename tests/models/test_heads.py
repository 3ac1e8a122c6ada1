"""Nested attention heads (issue 11), the second elastic axis: runtime views, checkpoints whose
metadata tells the truth about the stored heads, head-sliced checkpoints that transformers'
Llama loads with equal logits, further slicing bit-exact, GGUF head arrays, generation,
speculative drafting at fewer heads, evaluation over the (tier, kv_heads) grid, CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM, TierError
from matformer.cli import main
from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.evaluation.lm import evaluate
from matformer.inference.decode import generate
from matformer.inference.speculative import speculative_generate
from matformer.io.checkpoint import checkpoint_info, load_model, save_model
from matformer.models.lm.config import ConfigError
from matformer.models.lm.shapes import expected_shapes, kv_cache_bytes_per_token, parameter_counts
from matformer.slicing.extract import plan_budget_heads, slice_checkpoint
from matformer.tiers import head_granularities, runnable_kv_heads
from tests.conftest import HEADS, tiny_lm


def _ids(vocab: int = 512, n: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, MatFormerLM]:
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    folder = tmp_path_factory.mktemp("heads") / "full"
    save_model(model, folder)
    return folder, model


# ---- arithmetic ----------------------------------------------------------------------------


def test_head_granularities_halve_then_reach_one():
    assert head_granularities(8) == [8, 4, 2, 1]
    assert head_granularities(6) == [6, 3, 1]
    assert head_granularities(5) == [5, 1]
    assert head_granularities(1) == [1]
    assert runnable_kv_heads(8, [4, 2]) == [2, 1]


def test_shapes_counts_and_cache_bytes_follow_the_heads():
    cfg = MatFormerConfig.from_preset("debug", **HEADS)
    shapes = expected_shapes(cfg, kv_heads=[1, 3])
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (1 * 2 * 16, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (3 * 16, 64)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (64, 3 * 2 * 16)
    # per layer, g KV heads cost (2r + 2) * g * hd * H attention parameters
    full = parameter_counts(cfg)["non_embedding"]
    one = parameter_counts(cfg, kv_heads=[1, 1])["non_embedding"]
    assert full - one == 2 * (2 * 2 + 2) * 3 * 16 * 64
    assert kv_cache_bytes_per_token(cfg) == 2 * 2 * 4 * 16 * 4
    assert kv_cache_bytes_per_token(cfg, [1, 2], itemsize=2) == 2 * 3 * 16 * 2


def test_config_keeps_stored_heads_base_and_head_dim():
    cfg = MatFormerConfig.from_preset("debug", **HEADS).with_kv_heads([3, 1])
    d = cfg.to_dict()
    assert d["num_key_value_heads"] == [3, 1] and d["num_attention_heads"] == [6, 2]
    assert d["matformer_base_num_key_value_heads"] == 4 and d["head_dim"] == 16
    assert d["architectures"] == ["MatFormerForCausalLM"]  # transformers' Llama can't
    back = MatFormerConfig.from_dict(d)
    assert back.layer_kv_heads == [3, 1] and back.group_size == 2
    with pytest.raises(ConfigError, match="more than matformer_base_num_key_value_heads"):
        MatFormerConfig.from_dict({**d, "num_key_value_heads": [5, 1], "num_attention_heads": [10, 2]})
    with pytest.raises(ConfigError, match="the same in every layer"):
        MatFormerConfig.from_dict({**d, "num_attention_heads": [6, 4]})


# ---- runtime views -------------------------------------------------------------------------


def test_fewer_heads_run_as_views_and_unused_heads_get_exactly_zero_gradient():
    model = tiny_lm(heads=True, random_norms=True, head_scale=4).train()
    x = _ids()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    with model.at_width(kv_heads=1, layer_kv_heads=None, tier=1):
        assert model.kv_heads == 1 and model.widths == [128, 128]
        model.loss(x).backward()
    assert model.layer_kv_heads == [4, 4] and model.widths == [256, 256]  # restored
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}  # nothing copied
    for layer in model.model.layers:
        a = layer.self_attn
        q, kv = 1 * 2 * 16, 1 * 16
        assert a.q_proj.weight.grad[:q].abs().sum() > 0
        assert torch.count_nonzero(a.q_proj.weight.grad[q:]) == 0
        assert torch.count_nonzero(a.k_proj.weight.grad[kv:]) == 0
        assert torch.count_nonzero(a.v_proj.weight.grad[kv:]) == 0
        assert torch.count_nonzero(a.o_proj.weight.grad[:, q:]) == 0
        assert a.o_proj.weight.grad[:, :q].abs().sum() > 0


def test_runtime_heads_equal_a_model_built_with_those_heads():
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    small = MatFormerLM(model.config.with_kv_heads([2, 1])).eval()
    sd = {}
    for k, v in model.state_dict().items():
        want = small.state_dict()[k].shape
        sd[k] = v[tuple(slice(0, d) for d in want)]
    small.load_state_dict(sd)
    x = _ids()
    with torch.no_grad(), model.at_width(layer_kv_heads=[2, 1]):
        torch.testing.assert_close(model(x), small(x), rtol=0, atol=1e-6)


def test_head_requests_that_cannot_run_are_clear_errors():
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    small = MatFormerLM(model.config.with_kv_heads(2))
    with pytest.raises(TierError, match="stores 2 KV heads; kv_heads 3 needs 3"):
        small.set_widths(kv_heads=3)
    with pytest.raises(TierError, match=r"outside 1\.\.4"):
        model.set_widths(kv_heads=5)
    with pytest.raises(TierError, match="got 3 per-layer KV head counts for a model of 2 layers"):
        model.set_widths(layer_kv_heads=[1, 1, 1])
    with pytest.raises(TierError, match="not both"):
        model.set_widths(kv_heads=1, layer_kv_heads=[1, 1])


def test_kv_cache_is_allocated_at_the_active_heads_and_decoding_matches_full_recompute():
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    with model.at_width(kv_heads=1):
        cache = model.new_cache(1, 32)
        assert [k.shape[1] for k in cache.k] == [1, 1]
        assert cache.bytes_per_token == kv_cache_bytes_per_token(model.config, [1, 1])
    assert model.new_cache(1, 32).bytes_per_token == 4 * cache.bytes_per_token
    with pytest.raises(TierError, match="KV cache holds 1 KV heads"):
        model(_ids()[:1], cache=cache)
    fast = generate(model, [3, 4, 5], 12, kv_heads=2, tier=2, ignore_eos=True)
    slow = generate(model, [3, 4, 5], 12, kv_heads=2, tier=2, ignore_eos=True, use_cache=False)
    assert fast.tokens == slow.tokens and fast.kv_heads == [2, 2]
    assert model.setting == {"widths": [256, 256], "layer_kv_heads": [4, 4]}


def test_speculative_draft_with_fewer_heads_gives_the_targets_greedy_output():
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    prompt = [5, 6, 7, 8]
    for target, draft in (({}, {"draft_kv_heads": 1}),
                          ({}, {"draft_kv_heads": 2, "draft_tier": 2}),
                          ({"kv_heads": 2, "tier": 1}, {"draft_layer_kv_heads": [1, 2]})):
        want = generate(model, prompt, 24, ignore_eos=True, **target).tokens
        out = speculative_generate(model, prompt, 24, ignore_eos=True, **target, **draft)
        assert out.tokens == want, (target, draft)
        assert out.stats.drafted > 0
    with pytest.raises(TierError, match="draft with at most the target's heads"):
        speculative_generate(model, prompt, 4, kv_heads=1, draft_kv_heads=2)


# ---- checkpoints ---------------------------------------------------------------------------


def test_truth_rule_save_model_writes_stored_heads_not_the_runtime_setting(tmp_path):
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    model.set_widths(kv_heads=1, tier=2)
    save_model(model, tmp_path / "ck")
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert d["num_key_value_heads"] == 4 and d["num_attention_heads"] == 8
    assert d["matformer_base_num_key_value_heads"] == 4 and d["head_dim"] == 16
    assert d["matformer_tier"] == 0
    info = checkpoint_info(tmp_path / "ck")
    assert info["runnable_kv_heads"] == [4, 2, 1]
    loaded = load_model(tmp_path / "ck", kv_heads=2)
    assert loaded.layer_kv_heads == [2, 2] and loaded.stored_kv_heads == [4, 4]


def test_truth_rule_on_a_head_sliced_model_and_the_slicer(full, tmp_path):
    folder, _ = full
    slice_checkpoint(folder, tmp_path / "kv2", kv_heads=2)
    m = load_model(tmp_path / "kv2")
    m.set_widths(kv_heads=1)  # runs 1, stores 2
    save_model(m, tmp_path / "resaved")
    for ck in ("kv2", "resaved"):
        d = json.loads((tmp_path / ck / "config.json").read_text())
        assert (d["num_key_value_heads"], d["num_attention_heads"]) == (2, 4), ck
        assert d["matformer_base_num_key_value_heads"] == 4 and d["head_dim"] == 16


def test_loading_more_heads_than_stored_is_an_error_before_reading(full, tmp_path):
    folder, _ = full
    slice_checkpoint(folder, tmp_path / "kv1", kv_heads=1)
    with pytest.raises(TierError, match="this checkpoint stores 1 KV heads; kv_heads 2 needs 2"):
        load_model(tmp_path / "kv1", kv_heads=2)
    with pytest.raises(TierError, match="the source stores 1 KV heads"):
        slice_checkpoint(tmp_path / "kv1", tmp_path / "bad", kv_heads=2)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("request_", [{"kv_heads": 2}, {"kv_heads": 1, "tier": 1},
                                      {"kv_heads": 2, "widths": 96}])
def test_uniform_head_slice_loads_in_transformers_with_equal_logits(full, tmp_path, request_):
    from transformers import LlamaForCausalLM

    folder, model = full
    slice_checkpoint(folder, tmp_path / "s", **request_)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "s", dtype=torch.float32).eval()
    x = _ids()
    with torch.no_grad(), model.at_width(**request_):
        ours = model(x)
        torch.testing.assert_close(hf(x).logits, ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_model(tmp_path / "s")(x), ours, rtol=0, atol=1e-6)


def test_per_layer_heads_load_in_ours_and_further_slicing_is_bit_exact(full, tmp_path):
    folder, model = full
    slice_checkpoint(folder, tmp_path / "pl", layer_kv_heads=[3, 1], widths=[256, 64])
    loaded = load_model(tmp_path / "pl")
    assert loaded.stored_kv_heads == [3, 1]
    x = _ids()
    with torch.no_grad(), model.at_width(layer_kv_heads=[3, 1], widths=[256, 64]):
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-6)
    # further: the per-layer slice cut again == the full checkpoint cut once, byte for byte
    slice_checkpoint(tmp_path / "pl", tmp_path / "twice", kv_heads=1, widths=64)
    slice_checkpoint(folder, tmp_path / "once", kv_heads=1, widths=64)
    a, b = load_model(tmp_path / "twice").state_dict(), load_model(tmp_path / "once").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and dropping a layer renumbers the heads with it
    slice_checkpoint(tmp_path / "pl", tmp_path / "drop", skip_layers=[0])
    assert load_model(tmp_path / "drop").stored_kv_heads == [1]


def test_budget_searches_both_axes_only_when_heads_nest(full, tmp_path):
    folder, _ = full
    cfg = MatFormerConfig.from_json_file(folder / "config.json")
    # full FFN at 1 KV head (111K) beats every FFN plan at 4 heads within this budget (98.6K)
    budget = parameter_counts(cfg, [256, 256], [1, 1])["non_embedding"] + 100
    ws, hl, why = plan_budget_heads(cfg, budget)
    assert (ws, hl) == ([256, 256], [1, 1])
    assert "head granularity" in why and "1 KV head" in why
    # a checkpoint not trained with nested heads: FFN only, heads as stored
    r = slice_checkpoint(folder, tmp_path / "ffn", budget=budget)
    assert r.config.layer_kv_heads == [4, 4]
    # declared nested (train_config.json nest_heads): both axes
    (tmp_path / "nested").mkdir()
    for f in folder.iterdir():
        (tmp_path / "nested" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "nested" / "train_config.json").write_text('{"nest_heads": true}')
    r = slice_checkpoint(tmp_path / "nested", tmp_path / "both", budget=budget)
    assert (r.widths, r.config.layer_kv_heads) == ([256, 256], [1, 1])
    # --kv-heads pins the heads for a budget
    r = slice_checkpoint(tmp_path / "nested", tmp_path / "pinned", budget=budget, kv_heads=4)
    assert r.config.layer_kv_heads == [4, 4]


# ---- GGUF ----------------------------------------------------------------------------------


def test_gguf_writes_per_layer_head_arrays_and_cut_weights(tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from matformer.io.gguf import field_value, unpermute_rope
    from matformer.slicing.export import export_gguf

    tok = train_tokenizer([f"the quick brown fox {i} jumps" for i in range(200)], 300)
    model = tiny_lm(vocab_size=tok.get_vocab_size(), heads=True, random_norms=True, head_scale=4)
    save_model(model, tmp_path / "ck")
    save_tokenizer(tok, tmp_path / "ck")
    res = export_gguf(tmp_path / "ck", tmp_path / "pl.gguf", layer_kv_heads=[3, 1],
                      outtype="f32")
    assert res.arch == "deci" and res.kv_heads == [3, 1]
    r = gguf.GGUFReader(tmp_path / "pl.gguf")
    assert field_value(r, "deci.attention.head_count") == [6, 2]
    assert field_value(r, "deci.attention.head_count_kv") == [3, 1]
    src = load_file(str(tmp_path / "ck" / "model.safetensors"))
    got = {t.name: np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape])))
           for t in r.tensors}
    for i, g in enumerate((3, 1)):
        p = f"model.layers.{i}.self_attn."
        q, kv = g * 2 * 16, g * 16
        np.testing.assert_array_equal(unpermute_rope(got[f"blk.{i}.attn_q.weight"], g * 2),
                                      src[p + "q_proj.weight"][:q])
        np.testing.assert_array_equal(unpermute_rope(got[f"blk.{i}.attn_k.weight"], g),
                                      src[p + "k_proj.weight"][:kv])
        np.testing.assert_array_equal(got[f"blk.{i}.attn_v.weight"], src[p + "v_proj.weight"][:kv])
        np.testing.assert_array_equal(got[f"blk.{i}.attn_output.weight"],
                                      src[p + "o_proj.weight"][:, :q])
    uni = export_gguf(tmp_path / "ck", tmp_path / "u.gguf", kv_heads=2, tier=1, outtype="f32")
    assert uni.arch == "llama"
    r = gguf.GGUFReader(tmp_path / "u.gguf")
    assert field_value(r, "llama.attention.head_count_kv") == 2
    assert field_value(r, "llama.attention.head_count") == 4


# ---- evaluation ----------------------------------------------------------------------------


def test_eval_reports_the_tier_by_heads_grid_with_cache_bytes(tmp_path):
    model = tiny_lm(heads=True, random_norms=True, head_scale=4)
    data = np.random.default_rng(0).integers(0, 512, (3, 24))
    r = evaluate(model, data, kv_heads=[2, 1], mix_n_match=False, uniform_tiers=[0, 2],
                 speculative=False, spec_prompts=1, spec_new_tokens=4)
    points = {(row.tier, tuple(row.kv_heads)) for row in r.results}
    assert points == {(t, (g, g)) for t in (0, 2) for g in (4, 2, 1)}
    by = {(row.tier, row.kv_heads[0]): row for row in r.results}
    assert by[(0, 4)].kl_from_reference == 0 and by[(0, 4)].kind == "tier"
    assert by[(2, 1)].kind == "heads" and by[(2, 1)].name == "tier 2, 1 KV head"
    assert by[(0, 1)].kv_cache_bytes_per_token * 4 == by[(0, 4)].kv_cache_bytes_per_token
    assert by[(2, 1)].non_embedding_params == parameter_counts(
        model.config, [64, 64], [1, 1])["non_embedding"]
    for row in r.results:  # each point's loss is the model's own loss at that setting
        with torch.no_grad(), model.at_width(widths=row.widths, layer_kv_heads=row.kv_heads):
            want = float(np.mean([float(model.loss(torch.as_tensor(w[None]))) for w in data]))
        assert row.loss == pytest.approx(want, abs=1e-5)
        assert row.decode_tokens_per_s and row.decode_tokens_per_s > 0


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_head_flags_on_slice_info_generate_eval(full, tmp_path, capsys):
    folder, model = full
    tok = train_tokenizer([f"hello world {i} fox" for i in range(200)], 512)
    save_tokenizer(tok, folder)
    assert main(["slice", str(folder), "-o", str(tmp_path / "s"), "--tier", "1",
                 "--kv-heads", "2"]) == 0
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "KV heads         2 of base 4 (query heads 4, head_dim 16); runtime kv_heads 2, 1" in out
    assert main(["slice", str(folder), "-o", str(tmp_path / "p"), "--layer-kv-heads",
                 "1,3"]) == 0
    assert json.loads((tmp_path / "p" / "config.json").read_text())["num_key_value_heads"] == [1, 3]
    assert main(["slice", str(tmp_path / "s"), "-o", str(tmp_path / "x"), "--kv-heads", "3"]) == 2
    assert "the source stores 2 KV heads; kv_heads 3 needs 3" in capsys.readouterr().err
    assert main(["slice", str(folder), "-o", str(tmp_path / "k3"), "--kv-heads", "3"]) == 0
    assert "transformers' Llama refuses" in capsys.readouterr().out  # 64 % 6 query heads
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "5",
                 "--kv-heads", "2", "--draft-kv-heads", "1"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's own refusal, exit status 2
        main(["generate", str(folder), "--prompt", "hello", "--kv-heads", "x"])
    assert e.value.code == 2 and "--kv-heads: invalid int value" in capsys.readouterr().err
    assert main(["eval", str(folder), "--data", str(_text(tmp_path)), "--tiers", "0",
                 "--kv-heads", "2,1", "--no-mix", "--no-speculative", "--no-decode",
                 "--max-tokens", "128", "--seq-len", "32", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [(r["tier"], r["kv_heads"]) for r in rep["results"]] == [
        (0, [4, 4]), (0, [2, 2]), (0, [1, 1])]
    assert main(["eval", str(folder), "--data", str(_text(tmp_path)), "--split", "all",
                 "--layer-kv-heads", "1,2,3", "--no-speculative", "--no-decode"]) == 2
    assert "3 per-layer KV head counts" in capsys.readouterr().err


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "eval.txt"
    p.write_text("hello world fox " * 200)
    return p
