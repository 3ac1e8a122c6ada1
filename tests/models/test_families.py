"""The families on the Llama block (issue 25): Llama 3.x rope scaling, Mistral's sliding window,
Qwen2's q/k/v biases, Qwen3's per-head q/k norms. Each is checked against its own transformers
class on a tiny random model built here: full-width logits, the decoding paths (KV cache and
the static cache), every uniform tier sliced out (loaded by the family's transformers class)
against our runtime tier, convert's tier 0 against the source, and the info line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matformer.data import text as D
from matformer.errors import ConfigError
from matformer.io.checkpoint import load_model
from matformer.models.registry import family_of
from tests.conftest import random_norms_and_biases

transformers = pytest.importorskip("transformers")

TEXT = "".join(f"def f{i}(x, y):\n    return x * {i % 13} + y - {i % 7}\n\n" for i in range(300))
VOCAB = 300
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES: dict[str, tuple[str, dict]] = {
    # name: (transformers class, config kwargs)
    "llama3-tied": ("Llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3)),
    "llama-linear-bias": ("Llama", dict(attention_bias=True, rope_parameters={
        "rope_type": "linear", "rope_theta": 500.0, "factor": 4.0})),
    "llama-dynamic": ("Llama", dict(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-yarn": ("Llama", dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 16.0})),
    "mistral-window": ("Mistral", dict(sliding_window=8)),
    "qwen2-bias": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2", dict(use_sliding_window=True, sliding_window=6,
                                   max_window_layers=1)),
    "qwen3-norms": ("Qwen3", dict(head_dim=16)),
    "qwen3-bias": ("Qwen3", dict(head_dim=16, attention_bias=True, tie_word_embeddings=True)),
}
T = 24
"""Longer than every window above and than llama-dynamic's 16 positions."""


def _hf(case: str):
    kind, kw = CASES[case]
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **kw})
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    random_norms_and_biases(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("families")
    tok = D.train_tokenizer([TEXT], VOCAB)
    (root / "calib.txt").write_text(TEXT)
    out = {}
    for case in CASES:
        hf = _hf(case)
        hf.save_pretrained(root / case)
        D.save_tokenizer(tok, root / case)
        out[case] = (root / case, hf)
    return out


def _ids(n: int = T, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_full_width_logits_equal_transformers(saved, case, one_thread) -> None:
    folder, hf = saved[case]
    ours = load_model(folder, dtype=torch.float32)
    kind = CASES[case][0]
    assert family_of(json.loads((folder / "config.json").read_text())).title == kind
    x = _ids()
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert (got - ref).abs().max().item() <= 1e-5
    if T > ours.config.max_position_embeddings:
        return  # caches stop at max_position_embeddings (dynamic rope is checked past it above)
    # The decoding paths see the same window, biases, norms and rope: incremental KV cache
    # (prefill 5, then one token at a time) and the static cache with left padding.
    with torch.no_grad():
        cache = ours.new_cache(2, T)
        steps = [ours(x[:, :5], cache=cache)] + [ours(x[:, i:i + 1], cache=cache)
                                                 for i in range(5, T)]
        assert (torch.cat(steps, 1) - ref).abs().max().item() <= 1e-5
        pad = torch.tensor([0, 3])
        cache = ours.new_cache(2, T + 3)
        ids = torch.cat([torch.zeros(2, 3, dtype=torch.long), x], 1)
        ids[0, :T] = x[0]  # row 0 unpadded (its last 3 columns unused), row 1 padded by 3
        cols = torch.arange(T + 3)
        static = ours.forward_static(ids, cols, cache, pad)
        assert (static[0, :T] - ref[0]).abs().max().item() <= 1e-5
        assert (static[1, 3:] - ref[1]).abs().max().item() <= 1e-5


SLICED = ["llama3-tied", "mistral-window", "qwen2-window", "qwen3-norms"]


@pytest.mark.parametrize("case", SLICED)
def test_uniform_tiers_load_in_the_family_class(saved, case, tmp_path, one_thread) -> None:
    from matformer.slicing.extract import slice_checkpoint

    folder, _ = saved[case]
    kind = CASES[case][0]
    ours = load_model(folder, dtype=torch.float32)
    x = _ids(T, 1)
    for request in ({"tier": 1}, {"tier": 3}, {"kv_heads": 1}):
        out = tmp_path / "-".join(map(str, request.items()))
        slice_checkpoint(folder, out, **request)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["model_type"] == kind.lower() and cfg["architectures"] == [
            f"{kind}ForCausalLM"]
        hf = getattr(transformers, f"{kind}ForCausalLM").from_pretrained(
            out, dtype=torch.float32).eval()
        with torch.no_grad(), ours.at_width(**request):
            mine = ours(x)
        with torch.no_grad():
            assert (hf(x).logits - mine).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["llama3-tied", "mistral-window", "qwen2-bias", "qwen3-norms"])
def test_convert_tier0_equals_source(saved, case, tmp_path, one_thread) -> None:
    """Importance order moves biases with their rows (norms stay, being per head position):
    the converted model at tier 0 is the source's function."""
    from matformer.slicing.convert import convert

    folder, hf = saved[case]
    result = convert(folder, tmp_path / "conv", calibration=folder.parent / "calib.txt",
                     samples=4, seq_len=16, batch_size=4)
    assert result.max_abs_logit_diff <= 1e-5
    assert not result.permutation.is_identity()
    out = load_model(tmp_path / "conv", dtype=torch.float32)
    with torch.no_grad():
        assert (out(_ids()) - hf(_ids()).logits).abs().max().item() <= 1e-5
    cfg = json.loads((tmp_path / "conv" / "config.json").read_text())
    assert cfg["model_type"] == CASES[case][0].lower()


def test_info_line_names_what_differs(saved) -> None:
    from matformer.models.registry import family as fam

    folder, _ = saved["qwen2-window"]
    cfg = load_model(folder).config
    line = fam("qwen2").summary(cfg)
    assert "sliding window 6 in 1 of 2 layers" in line and "q/k/v biases" in line
    assert "rope llama3 x8.0" in fam("lm").summary(load_model(saved["llama3-tied"][0]).config)


@pytest.mark.parametrize("key,value,family", [
    ("attention_bias", True, "mistral"), ("layer_types", ["sliding_attention"] * 2, "mistral"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "qwen3"),
    ("partial_rotary_factor", 0.5, "qwen2"),
])
def test_what_a_family_does_not_compute_is_refused(key, value, family) -> None:
    from matformer.models.lm.config import MatFormerConfig

    with pytest.raises(ConfigError, match=key) as e:
        MatFormerConfig.from_dict({**BASE, "model_type": family, key: value}, "ck/config.json")
    assert "\n" not in str(e.value)


GGUF_CASES = {"llama3-tied": {"tier": 1}, "llama-linear-bias": {}, "llama-yarn": {"kv_heads": 1},
              "mistral-window": {"tier": 2}, "qwen2-bias": {"tier": 1},
              "qwen3-norms": {"tier": 1, "kv_heads": 1}}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_export_round_trips_through_our_reader(saved, case, tmp_path, one_thread) -> None:
    """A uniform tier exported to GGUF (llama.cpp's arch and tensor names for the family) and
    read back as a SRC computes our runtime tier's logits: biases, q/k norms, rope rows and
    rope scaling all survive."""
    pytest.importorskip("gguf")
    from matformer.io.gguf_reader import GGUFFile
    from matformer.io.gguf_source import gguf_to_checkpoint
    from matformer.slicing.export import export_gguf

    folder, _ = saved[case]
    request = GGUF_CASES[case]
    out = tmp_path / "m.gguf"
    result = export_gguf(folder, out, outtype="f32", **request)
    kind = CASES[case][0]
    assert result.arch == {"Qwen2": "qwen2", "Qwen3": "qwen3"}.get(kind, "llama")
    f = GGUFFile(out)
    names = set(f.tensors)
    if kind == "Qwen2":
        assert "blk.0.attn_q.bias" in names and "blk.0.attn_output.bias" not in names
    if kind == "Qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    if case == "llama3-tied":
        assert "rope_freqs.weight" in names
    if case == "mistral-window":  # llama.cpp's llama graph has no window: it is the context
        assert f.metadata["llama.context_length"] == 8
    back = gguf_to_checkpoint(out, tmp_path / "back")
    ours, mine = load_model(folder, dtype=torch.float32), load_model(back, dtype=torch.float32)
    assert mine.config.MODEL_TYPE == (kind.lower() if kind != "Mistral" else "llama")
    assert mine.config.rope == ours.config.rope or case == "mistral-window"
    x = _ids(8 if case == "mistral-window" else T, 1)
    with torch.no_grad(), ours.at_width(**request):
        assert (mine(x) - ours(x)).abs().max().item() <= 1e-5


def test_gguf_export_refusals(saved, tmp_path) -> None:
    from matformer.slicing.export import export_gguf

    with pytest.raises(ConfigError, match="uniform tier") as e:
        export_gguf(saved["qwen3-norms"][0], tmp_path / "x.gguf", layer_tiers=[0, 1])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="qwen2 graph"):
        export_gguf(saved["qwen2-bias"][0], tmp_path / "x.gguf", kv_heads=1)
    with pytest.raises(ConfigError, match="no o_proj bias"):
        export_gguf(saved["qwen3-bias"][0], tmp_path / "x.gguf", tier=1)
    assert not (tmp_path / "x.gguf").exists()


# ---- against llama.cpp itself (slow; needs llama-cpp-python) -------------------------------------

LLAMACPP_CASES = {
    # case: (CASES entry, config overrides): Mistral's window at least the run's length, as
    # llama.cpp's llama graph has none (the export writes the window as the context length)
    "llama3-tied": ("llama3-tied", {}),
    "llama-linear-bias": ("llama-linear-bias", {}),
    "llama-yarn": ("llama-yarn", {}),
    "mistral-window": ("mistral-window", {"sliding_window": 64}),
    "qwen2-bias": ("qwen2-bias", {}),
    "qwen3-norms": ("qwen3-norms", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(LLAMACPP_CASES))
def test_llamacpp_logits_and_greedy_tokens_match(case, tmp_path):
    """A uniform tier (FFN tier 1) exported to GGUF computes, in llama.cpp, our runtime tier's
    logits and greedy tokens."""
    pytest.importorskip("llama_cpp")
    from benchmarks.speed import llamacpp as bench

    name, overrides = LLAMACPP_CASES[case]
    kind, kw = CASES[name]
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **kw, **overrides,
                                                   "max_position_embeddings": 128})
    torch.manual_seed(0)
    hf = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    random_norms_and_biases(hf)
    with torch.no_grad():  # a sharper head: decisive greedy margins
        hf.lm_head.weight.mul_(8)
    folder = tmp_path / "src"
    hf.save_pretrained(folder)
    D.save_tokenizer(D.train_tokenizer([TEXT], VOCAB), folder)
    row = bench.compare(folder, tmp_path / "m.gguf", n_new=16, tier=1)
    assert row["arch"] == {"Qwen2": "qwen2", "Qwen3": "qwen3"}.get(kind, "llama")
    assert row["tokenize_equal"], row
    assert row["max_abs_logit_diff"] < 1e-5, row  # measured 0.95e-6 to 1.4e-6
    assert row["greedy_equal"], row


def test_every_verb_reads_the_family(saved, tmp_path, run_cli, one_thread) -> None:
    """info, generate, eval, train --init-from --distill on a Qwen3 and a Mistral: each verb
    runs the family (its window, norms) and a trained model keeps its model_type."""
    qwen3, _ = saved["qwen3-norms"]
    mistral, hf = saved["mistral-window"]
    r = run_cli("info", qwen3)
    assert r.code == 0 and "Qwen3: vocab 300, q/k norms" in r.out
    r = run_cli("generate", mistral, "--prompt", "def f1(x", "--max-new-tokens", "4", "--tier", "1")
    assert r.code == 0, r.err
    calib = mistral.parent / "calib.txt"
    r = run_cli("eval", mistral, "--data", calib, "--tiers", "0", "--no-mix", "--no-speculative",
                "--no-decode", "--seq-len", "16", "--max-tokens", "64", "--json")
    assert r.code == 0, r.err
    out = tmp_path / "run"
    r = run_cli("train", "--init-from", mistral, "--distill", mistral, "--data", calib,
                "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--out", out, "--quiet",
                "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["sliding_window"] == 8
    assert cfg["architectures"] == ["MistralForCausalLM"]
    trained = transformers.MistralForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        x = _ids()
        assert (trained(x).logits - load_model(out, dtype=torch.float32)(x)).abs().max() <= 1e-5


def test_dropping_layers_keeps_each_layers_window(saved) -> None:
    """A Qwen's windows default from max_window_layers (a layer index): a slice that drops
    layers writes them per layer, so the kept sliding layer stays sliding."""
    from matformer.slicing.extract import plan_slice

    cfg = load_model(saved["qwen2-window"][0]).config
    assert cfg.layer_windows == [None, 6]
    out = plan_slice(cfg, skip_layers=[0]).config
    assert out.layer_windows == [6] and out.to_dict()["layer_types"] == ["sliding_attention"]


_CONVERT = """
import importlib.machinery, runpy, sys, types
sp = types.ModuleType("sentencepiece")  # imported by the converter, not needed for a BPE
sp.SentencePieceProcessor, sp.__spec__ = None, importlib.machinery.ModuleSpec("sentencepiece", None)
sys.modules["sentencepiece"] = sp
import conversion.base as base
for cls in vars(base).values():  # our tokenizer's hash is not in its table; its split is gpt-2's
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path("convert_hf_to_gguf.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["qwen2-bias", "qwen3-norms", "llama3-tied"])
def test_gguf_written_by_llamacpps_converter_reads_back(case, tmp_path):
    """A GGUF written by llama.cpp's own convert_hf_to_gguf.py (the files people download) is
    read as the family's model with transformers' logits. Needs llama.cpp's source:
    $MATFORMER_LLAMACPP_SRC (e.g. llama-cpp-python's sdist vendor/llama.cpp)."""
    import os
    import subprocess
    import sys

    from matformer.io.gguf_source import gguf_to_checkpoint

    src = os.environ.get("MATFORMER_LLAMACPP_SRC")
    if not src or not Path(src, "convert_hf_to_gguf.py").is_file():
        pytest.skip("set MATFORMER_LLAMACPP_SRC to llama.cpp's source folder")
    kind, kw = CASES[case]
    # transformers' tokenizer counts one id past our 300 (its converter asserts the vocabulary
    # holds every id): 320 rows, the last ones never produced
    cfg = getattr(transformers, f"{kind}Config")(**{**BASE, **kw, "vocab_size": 320})
    torch.manual_seed(0)
    hf = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith(("norm.weight", ".bias")):
                p.normal_(1.0, 0.3)
    folder = tmp_path / "src"
    hf.save_pretrained(folder)
    D.save_tokenizer(D.train_tokenizer([TEXT], VOCAB), folder)
    out = tmp_path / "m.gguf"
    env = {**os.environ, "PYTHONPATH": f"{src}:{src}/gguf-py"}
    r = subprocess.run([sys.executable, "-c", _CONVERT, str(folder), "--outfile", str(out),
                        "--outtype", "f32"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=src)
    if case == "llama3-tied":  # rope_freqs alone does not say which llama3 parameters made it
        assert r.returncode == 0, r.stderr[-2000:]
        with pytest.raises(Exception, match="rope_freqs"):
            gguf_to_checkpoint(out, tmp_path / "back")
        return
    assert r.returncode == 0, r.stderr[-2000:]
    mine = load_model(gguf_to_checkpoint(out, tmp_path / "back"), dtype=torch.float32)
    assert mine.config.MODEL_TYPE == CASES[case][0].lower()
    with torch.no_grad():
        assert (mine(_ids()) - hf(_ids()).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", ["llama3-tied", "llama-linear-bias"])
def test_nemotron_nas_refuses_what_it_cannot_state(saved, case) -> None:
    """--format nemotron-nas writes default rope and no biases: a scaled rope or biased Llama is
    refused there (in one line) instead of exported with other logits."""
    from matformer.slicing.nemotron_nas import plan_nemotron_nas

    cfg = load_model(saved[case][0]).config
    with pytest.raises(ConfigError, match="rope_type 'llama3'|rope_type 'linear'") as e:
        plan_nemotron_nas(cfg, tier=0)
    assert "\n" not in str(e.value)
