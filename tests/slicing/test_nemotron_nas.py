"""`slice --format nemotron-nas`: NVIDIA's DeciLMForCausalLM checkpoints, read back the way the
engines read them.

- block_configs are parsed by the lines of vLLM's loader (copied below with their source) through
  the config class the export ships (`configuration_decilm.py`), and every layer's sizes are
  checked, and the tensors' shapes against them;
- the logits: transformers' own Llama decoder layers, built per layer at the sizes vLLM's parsing
  gives (no-op blocks pass the residual through) and loaded with the exported tensors, equal
  matformer's slice of the same request;
- refusals: widths that are no multiple of 256, KV heads that do not divide the query heads.
llama.cpp's own converter on an export is the slow test at the end.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from matformer import load_model, save_model
from matformer.errors import ConfigError, TierError
from matformer.slicing.extract import slice_checkpoint
from matformer.slicing.nemotron_nas import (
    ffn_mult_for,
    ffn_mult_to_intermediate_size,
    write_nemotron_nas,
)
from tests.conftest import tiny_lm

# 3 layers, FFN 1024 (tiers 1024/512/256: multiples of 256), 8 query heads on 4 KV heads,
# head_dim 64/8 = 8 (llama.cpp derives the head size from hidden_size / heads).
SHAPE = dict(intermediate_size=1024, num_hidden_layers=3, num_attention_heads=8,
             num_key_value_heads=4)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nas") / "src"
    save_model(tiny_lm(0, distinct=True, random_norms=True, **SHAPE), folder)
    return folder


# ---- vLLM's parsing (vllm/model_executor/models/nemotron_nas.py, vllm-project/vllm at
# 00bd1493, Apache-2.0): `_ffn_mult_to_intermediate_size`, `_find_multiple` and the size lines
# of `DeciLMDecoderLayer.__init__`, copied.

def _vllm_ffn_mult_to_intermediate_size(ffn_mult: float, n_embd: int) -> int:
    intermediate_size = int(2 * ffn_mult * n_embd / 3)
    return _vllm_find_multiple(intermediate_size, 256)


def _vllm_find_multiple(n: int, k: int) -> int:
    if n % k == 0:
        return n
    return n + k - (n % k)


def vllm_layer_sizes(config, layer_idx: int) -> dict:
    """What DeciLMDecoderLayer builds for `layer_idx` (None: a no-op sub-block)."""
    block_config = config.block_configs[layer_idx]
    sizes: dict = {"num_heads": None, "num_kv_heads": None, "intermediate_size": None}
    if not block_config.attention.no_op:
        num_kv_heads = config.num_attention_heads // block_config.attention.n_heads_in_group
        sizes.update(num_heads=config.num_attention_heads, num_kv_heads=num_kv_heads)
    if not block_config.ffn.no_op:
        ffn_mult = block_config.ffn.ffn_mult
        sizes["intermediate_size"] = _vllm_ffn_mult_to_intermediate_size(ffn_mult,
                                                                          config.hidden_size)
    return sizes


def shipped_config(out: Path):
    """config.json through the export's own configuration_decilm.DeciLMConfig (the class the
    engines instantiate with trust_remote_code), imported from the file."""
    spec = importlib.util.spec_from_file_location("nas_config_under_test",
                                                  out / "configuration_decilm.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    d = json.loads((out / "config.json").read_text())
    assert d["auto_map"]["AutoConfig"] == "configuration_decilm.DeciLMConfig"
    cfg = mod.DeciLMConfig(**{k: v for k, v in d.items() if k not in ("model_type", "auto_map")})
    assert cfg.model_type == "nemotron-nas"
    assert cfg.to_dict()["block_configs"] == d["block_configs"]  # round trip as plain JSON
    return cfg


def reference_logits(out: Path, cfg, ids: torch.Tensor) -> torch.Tensor:
    """transformers' Llama, each decoder layer built at vLLM's sizes for that layer (a no-op
    block: the identity), loaded with the exported tensors."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    base = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                rope_parameters=dict(cfg.rope_parameters),
                tie_word_embeddings=cfg.tie_word_embeddings,
                max_position_embeddings=cfg.max_position_embeddings, intermediate_size=256)
    model = LlamaForCausalLM(LlamaConfig(**base, attn_implementation="eager")).eval()

    class NoOp(torch.nn.Module):
        def forward(self, hidden_states, **_):
            return hidden_states

    for i in range(cfg.num_hidden_layers):
        s = vllm_layer_sizes(cfg, i)
        if s["num_heads"] is None:
            assert s["intermediate_size"] is None  # our no-op blocks skip both sub-blocks
            model.model.layers[i] = NoOp()
            continue
        layer_cfg = LlamaConfig(**{**base, "num_key_value_heads": s["num_kv_heads"],
                                   "intermediate_size": s["intermediate_size"]},
                                attn_implementation="eager")
        model.model.layers[i] = LlamaDecoderLayer(layer_cfg, i)
    state = load_file(str(out / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("request_, skip", [
    ({"layer_tiers": [2, 1, 0], "layer_kv_heads": [4, 2, 1]}, None),
    ({"widths": [256, 1024, 512], "kv_heads": 2}, [1]),
])
def test_block_configs_sizes_tensors_and_logits(src, tmp_path, request_, skip, one_thread):
    out = tmp_path / "nas"
    write_nemotron_nas(src, out, **request_, skip_layers=skip)
    cfg = shipped_config(out)
    d = json.loads((out / "config.json").read_text())
    assert d["architectures"] == ["DeciLMForCausalLM"] and d["model_type"] == "nemotron-nas"
    assert cfg.num_hidden_layers == 3 == len(cfg.block_configs)

    # the matformer slice of the same request is the reference model
    ref = tmp_path / "ref"
    slice_checkpoint(src, ref, **request_, skip_layers=skip)
    ref_cfg = json.loads((ref / "config.json").read_text())
    keep = [i for i in range(3) if i not in (skip or [])]
    widths = dict(zip(keep, ref_cfg["intermediate_size"] if isinstance(
        ref_cfg["intermediate_size"], list) else [ref_cfg["intermediate_size"]] * len(keep),
        strict=True))
    kv = ref_cfg["num_key_value_heads"]
    kv = dict(zip(keep, kv if isinstance(kv, list) else [kv] * len(keep), strict=True))

    from safetensors.torch import load_file
    shapes = {k: tuple(v.shape) for k, v in load_file(str(out / "model.safetensors")).items()}
    hd = cfg.head_dim
    for i in range(3):
        s = vllm_layer_sizes(cfg, i)
        p = f"model.layers.{i}."
        if i not in keep:
            assert s == {"num_heads": None, "num_kv_heads": None, "intermediate_size": None}
            assert not any(n.startswith(p) for n in shapes)  # a no-op block has no tensors
            continue
        assert s == {"num_heads": 8, "num_kv_heads": kv[i], "intermediate_size": widths[i]}
        assert shapes[p + "mlp.gate_proj.weight"] == shapes[p + "mlp.up_proj.weight"] == (
            widths[i], 64)
        assert shapes[p + "mlp.down_proj.weight"] == (64, widths[i])
        assert shapes[p + "self_attn.k_proj.weight"] == shapes[p + "self_attn.v_proj.weight"] \
            == (kv[i] * hd, 64)
        assert shapes[p + "self_attn.q_proj.weight"] == (8 * hd, 64)
        assert shapes[p + "self_attn.o_proj.weight"] == (64, 8 * hd)

    ids = torch.tensor([[1, 5, 9, 200, 33, 7, 480, 2, 64, 3]])
    with torch.no_grad():
        ours = load_model(ref, dtype=torch.float32).eval()(ids)
    ours = ours.logits if hasattr(ours, "logits") else ours
    theirs = reference_logits(out, cfg, ids)
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0), (theirs - ours).abs().max()


def test_ffn_mult_round_trips_through_the_engines_formula():
    for hidden in (64, 576, 2048, 4096, 8192):
        for w in range(256, 16 * hidden + 1, 256):
            m = ffn_mult_for(w, hidden)
            assert ffn_mult_to_intermediate_size(m, hidden) == w
            assert _vllm_ffn_mult_to_intermediate_size(round(m, 6), hidden) == w


def test_refusals_name_the_nearest_expressible_and_write_nothing(src, tmp_path, run_cli):
    out = tmp_path / "nas"
    with pytest.raises(TierError, match=r"layer 1: FFN width 384 .* nearest expressible: 256 "
                                        r"or 512"):
        write_nemotron_nas(src, out, widths=[256, 384, 1024])
    with pytest.raises(TierError, match=r"layer 0: FFN width 128 .*nearest expressible: 256"):
        write_nemotron_nas(src, out, tier=3)
    with pytest.raises(TierError, match=r"layer 2: 3 KV heads .* nearest expressible: 2 or 4"):
        write_nemotron_nas(src, out, layer_kv_heads=[4, 4, 3])
    assert not out.exists()
    r = run_cli("slice", src, "-o", out, "--format", "nemotron-nas", "--widths", "640")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "FFN width 640" in r.err and "nearest expressible: 512 or 768" in r.err
    assert not out.exists()
    r = run_cli("slice", src, "-o", out, "--format", "nemotron-nas", "--tiers", "0,1")
    assert r.code == 2 and "--tiers" in r.err and not out.exists()


def test_head_dim_that_is_not_hidden_over_heads_is_refused(tmp_path):
    folder = tmp_path / "src"
    save_model(tiny_lm(0, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4,
                       head_dim=16), folder)
    with pytest.raises(ConfigError, match="hidden_size / head_dim"):
        write_nemotron_nas(folder, tmp_path / "out")


# ---- llama.cpp's own converter (slow: needs the llama-cpp-python source and the library) ------


def _llama_tokenizer(vocab_size: int):
    """A Llama-style BPE tokenizer (byte fallback, Sequence decoder): the kind llama.cpp's
    converter reads for a DeciLM whose vocabulary is not Llama 3's (`LlamaHfVocab`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for c in "▁abcdefghijklmnopqrstuvwxyz0123456789.,!?'":
        vocab.setdefault(c, len(vocab))
    while len(vocab) < vocab_size:
        vocab[f"▁w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return tok


def _llama_cpp_tree(tmp: Path) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist: $LLAMA_CPP_SRC (the folder
    holding convert_hf_to_gguf.py), else the sdist of the installed version via pip."""
    import os
    import subprocess
    import sys
    import tarfile

    if os.environ.get("LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMA_CPP_SRC"])
    llama_cpp = pytest.importorskip("llama_cpp")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(tmp)],
                       capture_output=True, text=True, timeout=600)
    sdists = sorted(tmp.glob("llama_cpp_python-*.tar.gz"))
    if r.returncode or not sdists:
        pytest.skip(f"no llama-cpp-python sdist (set LLAMA_CPP_SRC): {r.stderr[-300:]}")
    with tarfile.open(sdists[0]) as tf:
        keep = [m for m in tf.getmembers() if "/vendor/llama.cpp/" in m.name and (
            m.name.endswith("convert_hf_to_gguf.py") or "/conversion/" in m.name
            or "/gguf-py/" in m.name)]
        tf.extractall(tmp, members=keep, filter="data")
    return next(tmp.glob("*/vendor/llama.cpp"))


@pytest.mark.slow
def test_llama_cpp_converter_runs_the_export_with_our_logits(tmp_path):
    """A Mix'n'Match export with per-layer KV heads and a skipped layer, converted by
    llama.cpp's own convert_hf_to_gguf.py (DeciModel) and run by llama.cpp (f32 weights and KV
    cache): its logits equal matformer's slice of the same request (1e-4)."""
    import subprocess
    import sys

    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    tree = _llama_cpp_tree(tmp_path / "sdist")
    src = tmp_path / "src"
    save_model(tiny_lm(0, distinct=True, random_norms=True, **{**SHAPE, "num_hidden_layers": 4}),
               src)
    _llama_tokenizer(512).save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    request = dict(layer_tiers=[2, 1, 0, 1], layer_kv_heads=[4, 2, 4, 1], skip_layers=[2])
    write_nemotron_nas(src, tmp_path / "nas", **request)
    gguf_path = tmp_path / "m.gguf"
    r = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(tmp_path / "nas"),
                        "--outtype", "f32", "--outfile", str(gguf_path)], cwd=tree,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    slice_checkpoint(src, tmp_path / "ref", **request)
    ids = [1, 5, 9, 200, 33, 7, 480, 2, 64, 3, 17, 300]
    with torch.no_grad():
        ours = load_model(tmp_path / "ref", dtype=torch.float32).eval()(torch.tensor([ids]))
    ours = (ours.logits if hasattr(ours, "logits") else ours)[0].numpy()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=64, n_batch=64, logits_all=True,
                          n_threads=1, verbose=False, seed=0, type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    assert np.abs(theirs - ours).max() < 1e-4, np.abs(theirs - ours).max()
