"""`matformer export`: GGUF files for llama.cpp, read back with gguf's own reader.

The llama.cpp check itself (logits and greedy tokens) is `test_llamacpp_*` below, marked slow
and skipped when llama-cpp-python is not installed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from matformer import MatFormerConfig, MatFormerLM, save_model
from matformer.cli import main
from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.errors import CheckpointError, ConfigError, TierError
from matformer.io.gguf import OUTTYPES, field_value, permute_rope, unpermute_rope
from matformer.slicing.export import export_gguf
from tests.conftest import tiny_lm

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

TEXTS = [f"The quick brown fox {i} jumps over the lazy dog. Hello, world! It's {i * 7} o'clock."
         for i in range(300)]


def _model(folder: Path, tok, seed: int = 0, **overrides) -> MatFormerLM:
    """A debug model whose widths disagree visibly (FFN and head scaled up), saved with `tok`."""
    model = tiny_lm(seed, distinct=True, vocab_size=tok.get_vocab_size(), **overrides)
    save_model(model, folder)
    save_tokenizer(tok, folder)
    return model


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 512)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("src") / "ckpt"
    _model(folder, tok)
    return folder


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _tensors(path: Path) -> dict[str, tuple[np.ndarray, object, tuple[int, ...]]]:
    """name -> (float32 values in numpy row order, GGML type, numpy shape)"""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        vals = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        out[t.name] = (vals.astype(np.float32), t.tensor_type, shape)
    return out


def test_uniform_tier_metadata_tokenizer_and_weights(ckpt, tok, tmp_path):
    out = tmp_path / "t1.gguf"
    res = export_gguf(ckpt, out, tier=1, outtype="f32")
    assert res.arch == "llama" and res.widths == [128, 128]
    r = gguf.GGUFReader(out)
    cfg = MatFormerConfig.from_json_file(ckpt / "config.json")
    want = {
        "general.architecture": "llama", "llama.block_count": 2, "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.feed_forward_length": 128,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16, "llama.attention.key_length": 16,
        "llama.vocab_size": cfg.vocab_size, "general.file_type": 0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    assert {k: field_value(r, k) for k in want} == want
    assert field_value(r, "llama.rope.freq_base") == pytest.approx(cfg.rope_theta)
    assert field_value(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    tokens = field_value(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size
    assert all(tokens[i] == s for s, i in vocab.items())
    types = field_value(r, "tokenizer.ggml.token_type")
    assert types[:3] == [int(gguf.TokenType.CONTROL)] * 3
    assert set(types[3:]) == {int(gguf.TokenType.NORMAL)}
    assert field_value(r, "tokenizer.ggml.merges") == [" ".join(m) for m in tj["model"]["merges"]]
    _check_weights(_tensors(out), _weights(ckpt), [128, 128], heads=4, kv_heads=2)


def _check_weights(got, src, widths, heads, kv_heads, tied=False):
    expect = {"token_embd.weight": src["model.embed_tokens.weight"],
              "output_norm.weight": src["model.norm.weight"]}
    if not tied:
        expect["output.weight"] = src["lm_head.weight"]
    for i, w in enumerate(widths):
        p = f"model.layers.{i}."
        expect.update({
            f"blk.{i}.attn_norm.weight": src[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": src[p + "self_attn.q_proj.weight"],
            f"blk.{i}.attn_k.weight": src[p + "self_attn.k_proj.weight"],
            f"blk.{i}.attn_v.weight": src[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": src[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": src[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": src[p + "mlp.gate_proj.weight"][:w],
            f"blk.{i}.ffn_up.weight": src[p + "mlp.up_proj.weight"][:w],
            f"blk.{i}.ffn_down.weight": src[p + "mlp.down_proj.weight"][:, :w],
        })
    assert sorted(got) == sorted(expect)
    for name, ref in expect.items():
        vals, _, shape = got[name]
        assert shape == ref.shape, name
        if name.endswith("attn_q.weight"):
            vals = unpermute_rope(vals, heads)
        elif name.endswith("attn_k.weight"):
            vals = unpermute_rope(vals, kv_heads)
        np.testing.assert_array_equal(vals, ref, err_msg=name)


def test_mix_n_match_is_deci_with_per_layer_widths(ckpt, tmp_path):
    out = tmp_path / "mix.gguf"
    res = export_gguf(ckpt, out, layer_tiers=[0, 2], outtype="f32")
    assert res.arch == "deci" and res.widths == [256, 64]
    r = gguf.GGUFReader(out)
    assert field_value(r, "general.architecture") == "deci"
    assert field_value(r, "deci.feed_forward_length") == [256, 64]
    assert field_value(r, "deci.attention.head_count") == 4  # heads do not nest here: scalars
    assert field_value(r, "deci.attention.head_count_kv") == 2
    _check_weights(_tensors(out), _weights(ckpt), [256, 64], heads=4, kv_heads=2)


def test_widths_flag_and_tied_embeddings(tok, tmp_path):
    src = tmp_path / "tied"
    _model(src, tok, tie_word_embeddings=True)
    out = tmp_path / "w.gguf"
    export_gguf(src, out, widths=[96, 32], outtype="f32")
    got = _tensors(out)
    assert "output.weight" not in got  # llama.cpp reuses token_embd
    _check_weights(got, _weights(src), [96, 32], heads=4, kv_heads=2, tied=True)


@pytest.mark.parametrize("outtype,qtype,tol", [("f16", Q.F16, 1e-3), ("bf16", Q.BF16, 1e-2),
                                                ("q8_0", Q.Q8_0, 1e-2)])
def test_outtypes_keep_norms_f32(ckpt, tmp_path, outtype, qtype, tol):
    out = tmp_path / f"{outtype}.gguf"
    export_gguf(ckpt, out, tier=0, outtype=outtype)
    got, src = _tensors(out), _weights(ckpt)
    for name, (_, t, _) in got.items():
        assert t == (Q.F32 if name.endswith("norm.weight") else qtype), name
    emb = got["token_embd.weight"][0]
    ref = src["model.embed_tokens.weight"]
    # relative to the largest value of the tensor (q8_0 scales per block of 32)
    assert np.abs(emb - ref).max() <= tol * np.abs(ref).max()
    assert not np.array_equal(emb, ref)  # really stored at lower precision


def test_q8_0_rows_that_are_not_whole_blocks_fall_back_to_f16(ckpt, tmp_path):
    out = tmp_path / "narrow.gguf"
    export_gguf(ckpt, out, tier=4, outtype="q8_0")  # width 16: ffn_down rows of 16 values
    got = _tensors(out)
    assert got["blk.0.ffn_down.weight"][1] == Q.F16
    assert got["blk.0.ffn_gate.weight"][1] == Q.Q8_0  # rows of hidden_size=64


def test_rope_permutation_turns_half_rotation_into_pair_rotation():
    """q rotated by halves (transformers) == unpermute(q' rotated by pairs (llama.cpp)), with
    q' = permute(q): the row order llama.cpp needs for the same attention scores."""
    rng = np.random.default_rng(0)
    heads, hd, pos = 3, 8, 5
    w = rng.standard_normal((heads * hd, 4)).astype(np.float32)
    x = rng.standard_normal(4).astype(np.float32)
    theta = pos / 10000.0 ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(theta), np.sin(theta)

    def halves(q):  # transformers' rotate_half
        a, b = q[: hd // 2], q[hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin])

    def pairs(q):  # ggml's normal rope
        a, b = q[0::2], q[1::2]
        out = np.empty_like(q)
        out[0::2], out[1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    ref = np.concatenate([halves(h) for h in (w @ x).reshape(heads, hd)])
    got = np.concatenate([pairs(h) for h in (permute_rope(w, heads) @ x).reshape(heads, hd)])
    np.testing.assert_allclose(unpermute_rope(got[:, None], heads)[:, 0], ref, rtol=1e-5)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(w, heads), heads), w)


def test_tier_above_stored_is_an_error(tok, tmp_path):
    src = tmp_path / "t1"
    _model(src, tok, intermediate_size=128, matformer_base_intermediate_size=256)
    with pytest.raises(TierError, match="stores tier 1"):
        export_gguf(src, tmp_path / "x.gguf", tier=0)
    assert not (tmp_path / "x.gguf").exists()


def test_bad_requests_are_one_line_errors_and_lose_nothing(ckpt, tmp_path, capsys):
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"an older export")
    with pytest.raises(ConfigError, match="outtype 'q4'"):
        export_gguf(ckpt, out, outtype="q4")
    with pytest.raises(CheckpointError, match="does not exist"):
        export_gguf(ckpt, tmp_path / "no" / "x.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        export_gguf(ckpt, tmp_path)
    assert main(["export", str(ckpt), "-o", str(out), "--tier", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("matformer export: error:") and "\n" not in err
    assert out.read_bytes() == b"an older export"


def test_failure_midway_keeps_the_old_file_and_leaves_no_temp(ckpt, tmp_path, monkeypatch):
    import matformer.slicing.export as ex

    out = tmp_path / "keep.gguf"
    out.write_bytes(b"an older export")
    calls, real = [], ex.produce

    def failing(reader, job):
        calls.append(job.plan.name)
        if len(calls) == 5:
            raise CheckpointError("disk trouble")
        return real(reader, job)

    monkeypatch.setattr(ex, "produce", failing)
    with pytest.raises(CheckpointError, match="disk trouble"):
        export_gguf(ckpt, out, tier=1)
    assert out.read_bytes() == b"an older export"
    assert sorted(os.listdir(tmp_path)) == ["keep.gguf"]
    monkeypatch.undo()
    export_gguf(ckpt, out, tier=1)  # a good export replaces it, with the usual permissions
    assert out.read_bytes()[:4] == b"GGUF"
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_tokenizer_problems_are_named(ckpt, tmp_path):
    import shutil

    src = tmp_path / "c"
    shutil.copytree(ckpt, src)
    (src / "tokenizer.json").unlink()
    with pytest.raises(Exception, match="tokenizer.json"):
        export_gguf(src, tmp_path / "x.gguf")
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match="pre_tokenizer"):
        export_gguf(src, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_and_outtype_list(ckpt, tmp_path, capsys):
    from matformer.cli.export import OUTTYPES as CLI_OUTTYPES

    assert CLI_OUTTYPES == OUTTYPES
    out = tmp_path / "cli.gguf"
    assert main(["export", str(ckpt), "-o", str(out), "--layer-tiers", "1,2",
                 "--outtype", "q8_0"]) == 0
    assert "llama.cpp architecture 'deci'" in capsys.readouterr().out
    assert field_value(gguf.GGUFReader(out), "deci.feed_forward_length") == [128, 64]


# ---- against llama.cpp itself (slow; needs llama-cpp-python) -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("request_", [{"tier": 1}, {"layer_tiers": [0, 2]}])
def test_llamacpp_logits_and_greedy_tokens_match(ckpt, tmp_path, request_):
    pytest.importorskip("llama_cpp")
    from benchmarks.speed import llamacpp as bench

    row = bench.compare(ckpt, tmp_path / "m.gguf", n_new=32, **request_)
    assert row["tokenize_equal"], row
    assert row["max_abs_logit_diff"] < 1e-5, row  # measured 1.2e-6 (float32 KV cache)
    assert row["greedy_equal"], row


_RSS_SCRIPT = """
import resource, sys
import gguf, numpy  # the libraries count in the baseline
from matformer.slicing.export import export_gguf
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
export_gguf(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_memory_stays_about_one_tensor(ckpt, tmp_path):
    """A ~100 MB checkpoint exports (q8_0: float32 copy + encoded copy of each tensor) with a
    peak memory growth of a few of its 4 MB tensors."""
    import shutil
    import subprocess
    import sys

    from safetensors.numpy import save_file

    from matformer.io.checkpoint import expected_shapes

    vocab = MatFormerConfig.from_json_file(ckpt / "config.json").vocab_size
    cfg = MatFormerConfig(vocab_size=vocab, hidden_size=256, intermediate_size=4096,
                          num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal(s, dtype=np.float32) for n, s in
               expected_shapes(cfg).items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(cfg.to_json_string())
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / f, src / f)
    size = (src / "model.safetensors").stat().st_size
    run = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(src), str(tmp_path / "b.gguf"),
                          "q8_0"], capture_output=True, text=True, check=True, timeout=300)
    growth = int(run.stdout.split()[-1])
    assert size > 100e6
    assert growth < 10 * 4 * 4096 * 256, (growth, size)  # < 40 MB for a 100+ MB checkpoint
