"""Checkpoint folders: round trips, the tier label, sharding, interop with transformers and
huggingface_hub, the loader checklist of the spec §4, atomic saves, and `matformer info`."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import weakref
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matformer import MatFormerConfig, MatFormerLM
from matformer.errors import CheckpointError, ConfigError, MatFormerError, TierError
from matformer.io.checkpoint import (
    checkpoint_info,
    expected_shapes,
    load_model,
    load_state_dict,
    plan_shards,
    save_model,
    write_checkpoint,
)
from tests.conftest import tiny_lm

DEBUG = MatFormerConfig.from_preset("debug")  # hidden 64, FFN 256, 2 layers, vocab 512



def ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, DEBUG.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


# ---- round trips and the tier label --------------------------------------------------------


def test_round_trip_is_bit_identical_with_equal_config(tmp_path):
    m = tiny_lm()
    save_model(m, tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors"]
    sd = m.state_dict()
    assert_same_tensors(load_state_dict(tmp_path / "ck"), sd)
    m2 = load_model(tmp_path / "ck")
    assert_same_tensors(m2.state_dict(), sd)
    assert m2.config.to_dict() == m.config.to_dict()
    assert torch.equal(m2(ids()), m(ids()))


def test_full_width_model_running_at_tier_2_writes_tier_0(tmp_path):
    m = tiny_lm()
    m.set_widths(tier=2)  # computes with 64 of 256 neurons; stores all 256
    save_model(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["matformer_tier"] == 0
    assert cfg["intermediate_size"] == 256 and cfg["matformer_base_intermediate_size"] == 256
    loaded = load_model(tmp_path / "ck")
    assert loaded.stored_widths == [256, 256] and loaded.widths == [256, 256]
    loaded.set_widths(tier=2)
    assert torch.equal(loaded(ids()), m(ids()))


def test_model_holding_tier_2_weights_writes_tier_2_and_base(tmp_path):
    small = MatFormerLM(DEBUG.with_widths(64))  # B=256, stores 64 = 256 >> 2
    save_model(small, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert (cfg["matformer_tier"], cfg["intermediate_size"], cfg["matformer_base_intermediate_size"]) == (2, 64, 256)
    m = load_model(tmp_path / "ck", tier=2)  # absolute tier == stored: no slicing
    assert m.widths == [64, 64] and m.stored_widths == [64, 64]
    m = load_model(tmp_path / "ck", tier=3)  # narrower: runtime slicing
    assert m.widths == [32, 32] and m.stored_widths == [64, 64]
    with pytest.raises(TierError, match="this checkpoint stores tier 2, width 64; tier 1 needs width 128 — load the full"):
        load_model(tmp_path / "ck", tier=1)
    with pytest.raises(TierError):
        load_model(tmp_path / "ck", widths=100)


def test_per_layer_widths_round_trip(tmp_path):
    m = MatFormerLM(DEBUG.with_widths([256, 64]))
    save_model(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["intermediate_size"] == [256, 64] and cfg["matformer_tier"] is None
    assert cfg["matformer_base_intermediate_size"] == 256
    m2 = load_model(tmp_path / "ck", widths=[128, 64])
    assert m2.widths == [128, 64]
    assert_same_tensors(m2.state_dict(), m.state_dict())


def test_dtype_conversion_and_bf16_storage(tmp_path):
    m = tiny_lm().to(torch.bfloat16)
    save_model(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m2 = load_model(tmp_path / "ck")
    assert m2.lm_head.weight.dtype == torch.bfloat16
    assert_same_tensors(m2.state_dict(), m.state_dict())
    m3 = load_model(tmp_path / "ck", dtype="float32")
    assert m3.lm_head.weight.dtype == torch.float32 and m3.config.torch_dtype == "float32"


def test_tied_embeddings_are_written_once(tmp_path):
    m = tiny_lm(tie_word_embeddings=True)
    save_model(m, tmp_path / "ck")
    sd = load_state_dict(tmp_path / "ck")
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    m2 = load_model(tmp_path / "ck")
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert torch.equal(m2(ids()), m(ids()))


def test_expected_shapes_match_the_model():
    for cfg in (DEBUG, DEBUG.with_widths([256, 64]),
                MatFormerConfig.from_preset("debug", tie_word_embeddings=True)):
        sd = MatFormerLM(cfg).state_dict()
        if cfg.tie_word_embeddings:
            sd.pop("lm_head.weight")
        assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in sd.items()}


# ---- sharding --------------------------------------------------------------------------------


def test_plan_shards_greedy_decimal_and_oversized_alone():
    specs = [("a", "F32", (100,)), ("b", "F32", (100,)), ("c", "F32", (1000,)), ("d", "F32", (10,))]
    plan = plan_shards(specs, "1kB")  # 1000 bytes, decimal
    assert [[n for n, _, _ in s] for s in plan] == [["a", "b"], ["c"], ["d"]]
    assert len(plan_shards(specs, "1KiB")) == 3
    with pytest.raises(CheckpointError, match="max_shard_size"):
        plan_shards(specs, "lots")


def test_sharded_save_names_index_and_stale_shards_removed(tmp_path):
    m = tiny_lm()
    ck = tmp_path / "ck"
    save_model(m, ck, max_shard_size="200KB")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    nbytes = sum(v.numel() * v.element_size() for v in m.state_dict().values())
    assert index["metadata"]["total_size"] == nbytes
    assert sorted(index["weight_map"]) == sorted(m.state_dict())
    assert_same_tensors(load_state_dict(ck), m.state_dict())
    (ck / "notes.txt").write_text("kept")
    save_model(m, ck)  # one shard now: model.safetensors, no index, no stale shards
    assert sorted(os.listdir(ck)) == ["config.json", "model.safetensors", "notes.txt"]
    assert (ck / "notes.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folders left


def test_extra_files_are_written_with_the_checkpoint(tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {}}')
    save_model(tiny_lm(), tmp_path / "ck", extra_files={"tokenizer.json": tok,
                                                           "generation_config.json": b"{}"})
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == '{"model": {}}'
    assert (tmp_path / "ck" / "generation_config.json").read_bytes() == b"{}"
    with pytest.raises(CheckpointError, match="plain file name"):
        save_model(tiny_lm(), tmp_path / "ck2", extra_files={"../x": b""})


def test_write_checkpoint_streams_one_tensor_at_a_time(tmp_path):
    src = tiny_lm().state_dict()
    specs = [(k, "F32", tuple(v.shape)) for k, v in src.items()]
    calls: list[str] = []
    previous: list[weakref.ref] = []

    def produce(name):
        # The writer must have dropped the tensor it was given before asking for the next one.
        assert all(r() is None for r in previous), "two produced tensors alive at once"
        calls.append(name)
        t = src[name].clone()
        previous.append(weakref.ref(t))
        return t

    write_checkpoint(tmp_path / "ck", DEBUG, specs, produce, max_shard_size="150KB")
    assert calls == list(src)  # each once, in file order
    assert_same_tensors(load_state_dict(tmp_path / "ck"), src)


def test_write_checkpoint_refuses_a_config_that_does_not_describe_the_tensors(tmp_path):
    sd = MatFormerLM(DEBUG.with_widths(64)).state_dict()
    specs = [(k, "F32", tuple(v.shape)) for k, v in sd.items()]
    with pytest.raises(CheckpointError, match="mlp.gate_proj.weight.*intermediate_size=256"):
        write_checkpoint(tmp_path / "ck", DEBUG, specs, sd.__getitem__)
    assert not (tmp_path / "ck").exists()


def test_saving_over_the_folder_it_was_loaded_from(tmp_path):
    ck = tmp_path / "ck"
    save_model(tiny_lm(0), ck, max_shard_size="200KB")
    m = load_model(ck)  # tensors are views of the files in ck
    before = m(ids())
    with torch.no_grad():
        m.model.norm.weight.mul_(2)  # copy-on-write: the file is untouched
    save_model(m, ck)
    after = m(ids())  # still runs: the old files were swapped out, not truncated under it
    assert not torch.equal(after, before)
    assert_same_tensors(load_state_dict(ck), m.state_dict())


# ---- interop -------------------------------------------------------------------------------


def _hf_config(cfg: MatFormerConfig):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                       max_position_embeddings=cfg.max_position_embeddings,
                       tie_word_embeddings=cfg.tie_word_embeddings)


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_what_we_save_with_equal_logits(tmp_path, tied):
    from transformers import LlamaForCausalLM

    m = tiny_lm(tie_word_embeddings=tied)
    save_model(m, tmp_path / "ck", max_shard_size="300KB")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, m(ids()), rtol=1e-5, atol=1e-5)


def test_transformers_sharded_save_pretrained_loads_bit_exactly(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    hf = LlamaForCausalLM(_hf_config(DEBUG))
    hf.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ref = hf.state_dict()
    assert_same_tensors(load_state_dict(tmp_path / "hf"), ref)
    m = load_model(tmp_path / "hf")
    assert m.config.base == DEBUG.intermediate_size and m.config.stored_tier == 0
    assert_same_tensors(m.state_dict(), ref)
    with torch.no_grad():
        torch.testing.assert_close(m(ids()), hf(ids()).logits, rtol=1e-5, atol=1e-5)


def test_huggingface_hub_save_torch_state_dict_loads_bit_exactly(tmp_path):
    from huggingface_hub import save_torch_state_dict

    sd = tiny_lm(5).state_dict()
    (tmp_path / "hh").mkdir()
    save_torch_state_dict(sd, tmp_path / "hh", max_shard_size="150KB")
    assert (tmp_path / "hh" / "model.safetensors.index.json").exists()
    assert_same_tensors(load_state_dict(tmp_path / "hh"), sd)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.safetensors",
                                  "model-00001-of-00001.safetensors"])
def test_the_three_single_file_names_load(tmp_path, name):
    from safetensors.torch import save_file

    m = tiny_lm(2)
    save_model(m, tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    save_file(m.state_dict(), tmp_path / "ck" / name, metadata={"format": "pt"})
    assert_same_tensors(load_model(tmp_path / "ck").state_dict(), m.state_dict())
    assert_same_tensors(load_state_dict(tmp_path / "ck" / name), m.state_dict())


def test_rope_theta_read_from_transformers_rope_parameters(tmp_path):
    m = tiny_lm()
    save_model(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path / "ck").config.rope_theta == 5000.0


# ---- the loader checklist (spec §4) ---------------------------------------------------------


@pytest.fixture
def sharded(tmp_path) -> Path:
    save_model(tiny_lm(), tmp_path / "ck", max_shard_size="200KB")
    return tmp_path / "ck"


def _edit_index(folder: Path, edit) -> None:
    p = folder / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    edit(idx["weight_map"])
    p.write_text(json.dumps(idx))


@pytest.mark.parametrize("bad", ["../model-00001-of-00004.safetensors", "/etc/passwd.safetensors",
                                 "sub/model.safetensors", "a\\b.safetensors", "C:model.safetensors",
                                 "model.bin", "..", ""])
def test_index_shard_names_must_be_plain_files(sharded, bad):
    _edit_index(sharded, lambda wm: wm.__setitem__("model.norm.weight", bad))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json") as e:
        load_state_dict(sharded)
    assert "plain file name" in str(e.value) or "does not end in .safetensors" in str(e.value) \
        or "non-empty" in str(e.value)


def test_nothing_outside_the_folder_is_opened(tmp_path, sharded):
    # A valid safetensors file outside the folder, named by a traversal: refused, not read.
    save_model(tiny_lm(), tmp_path / "outside")
    _edit_index(sharded, lambda wm: wm.__setitem__("model.norm.weight", "../outside/model.safetensors"))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_state_dict(sharded)


def test_index_naming_a_missing_shard(sharded):
    (sharded / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00004.safetensors', which is missing"):
        load_model(sharded)


def test_tensor_absent_from_its_shard(sharded):
    _edit_index(sharded, lambda wm: wm.__setitem__("model.norm.weight", "model-00001-of-00004.safetensors"))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in model-00001-of-00004.safetensors, but"):
        load_state_dict(sharded)


def test_tensor_in_two_shards(sharded):
    from safetensors.torch import load_file, save_file

    p1, p2 = sharded / "model-00001-of-00004.safetensors", sharded / "model-00002-of-00004.safetensors"
    a = load_file(p2)
    a.update({k: v for k, v in list(load_file(p1).items())[:1]})
    save_file(a, p2, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="is in two shards"):
        load_state_dict(sharded)


def test_shard_tensor_missing_from_index_is_reported(sharded):
    _edit_index(sharded, lambda wm: wm.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="'model.norm.weight'.* not in the index"):
        load_state_dict(sharded)


def test_stale_shard_files_are_never_globbed(sharded):
    from safetensors.torch import save_file

    save_file({"junk": torch.zeros(3)}, sharded / "model-00009-of-00009.safetensors")
    save_file({"junk": torch.zeros(3)}, sharded / "model.safetensors")
    assert "junk" not in load_state_dict(sharded)


def test_a_broken_index_is_reported_not_skipped(sharded):
    save_model(tiny_lm(), sharded.parent / "single")
    os.link(sharded.parent / "single" / "model.safetensors", sharded / "model.safetensors")
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="index.json: not valid JSON"):
        load_model(sharded)


def test_shapes_that_disagree_with_config(tmp_path):
    save_model(tiny_lm(), tmp_path / "ck")
    p = tmp_path / "ck" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["intermediate_size"], cfg["matformer_tier"] = 128, 1
    p.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' "
                                              r"has shape \[256, 64\], config.json expects \[128, 64\]"):
        load_model(tmp_path / "ck")


def test_a_tier_label_that_disagrees_with_the_sizes(tmp_path):
    save_model(tiny_lm(), tmp_path / "ck")
    p = tmp_path / "ck" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["matformer_tier"] = 2  # the historic bug: full-width weights labelled with the compute tier
    p.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="matformer_tier=2 disagrees with the stored sizes"):
        load_model(tmp_path / "ck")


def test_missing_base_means_dense_tier_0(tmp_path):
    save_model(tiny_lm(), tmp_path / "ck")
    p = tmp_path / "ck" / "config.json"
    cfg = json.loads(p.read_text())
    del cfg["matformer_base_intermediate_size"], cfg["matformer_tier"]
    p.write_text(json.dumps(cfg))
    m = load_model(tmp_path / "ck", tier=1)
    assert m.base_width == 256 and m.widths == [128, 128]


def test_missing_and_unexpected_tensors(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_lm().state_dict()
    save_model(tiny_lm(), tmp_path / "ck")
    save_file({k: v for k, v in sd.items() if k != "model.norm.weight"}, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight'.* missing"):
        load_model(tmp_path / "ck")
    save_file({**sd, "model.extra.weight": torch.zeros(2)}, tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensors \\['model.extra.weight'\\]"):
        load_model(tmp_path / "ck")


def test_pickle_checkpoints_are_refused_unless_opted_in(tmp_path):
    m = tiny_lm()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(m.config.to_json_string())
    torch.save(m.state_dict(), tmp_path / "ck" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickles can run arbitrary code"):
        load_model(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint_info(tmp_path / "ck")
    m2 = load_model(tmp_path / "ck", allow_pickle=True)
    assert_same_tensors(m2.state_dict(), m.state_dict())


def test_no_weights_and_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_state_dict(tmp_path / "empty")
    save_model(tiny_lm(), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "nowhere")


# ---- crash safety ----------------------------------------------------------------------------


def _crash_run(tmp_path: Path, iterations: int) -> None:
    """Fork a process that saves A and B over one folder in a loop; SIGKILL it at a random
    moment; the folder must then load and be exactly A or exactly B."""
    ck = tmp_path / "ck"
    a, b = tiny_lm(10), tiny_lm(11)
    sa, sb = a.state_dict(), b.state_dict()
    save_model(a, ck)
    rng = random.Random(0)
    seen = set()
    interrupted = 0  # kills that landed inside a save (its temporary folder was left behind)
    for _ in range(iterations):
        pid = os.fork()
        if pid == 0:  # child: never returns into pytest
            try:
                while True:
                    save_model(b, ck, max_shard_size="100KB")  # sharded
                    save_model(a, ck)  # single file
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        interrupted += any(p.name.startswith(".ck.matformer-") for p in tmp_path.iterdir())
        got = load_state_dict(ck)
        if all(torch.equal(got[k], sa[k]) for k in sa) and set(got) == set(sa):
            seen.add("A")
        else:
            assert set(got) == set(sb) and all(torch.equal(got[k], sb[k]) for k in sb), "a mix"
            seen.add("B")
    save_model(a, ck)  # cleans the temporary folders of the killed saves
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert interrupted > 0, "no kill landed inside a save; the test proves nothing"
    if iterations >= 100:
        assert seen == {"A", "B"}


def test_save_killed_at_random_points_leaves_old_or_new(tmp_path):
    _crash_run(tmp_path, iterations=15)


@pytest.mark.slow
def test_save_killed_at_random_points_many_times(tmp_path):
    _crash_run(tmp_path, iterations=300)


# ---- matformer info ------------------------------------------------------------------------


def test_checkpoint_info_fields(tmp_path):
    m = MatFormerLM(DEBUG.with_widths(128))
    save_model(m, tmp_path / "ck", max_shard_size="200KB")
    info = checkpoint_info(tmp_path / "ck")
    assert info["intermediate_size"] == 128 and info["matformer_base_intermediate_size"] == 256
    assert info["matformer_tier"] == 1
    assert info["runnable_tiers"][:3] == [1, 2, 3] and 0 not in info["runnable_tiers"]
    counts = m.num_parameters_at()
    assert info["num_parameters"] == counts
    assert info["dtype"] == "F32"
    names = [f["name"] for f in info["files"]]
    assert names[0] == "model.safetensors.index.json" and len(names) > 2
    assert all(f["size"] == (tmp_path / "ck" / f["name"]).stat().st_size for f in info["files"])



def test_cli_info_text_and_json_without_torch(tmp_path, run_cli):
    save_model(tiny_lm(), tmp_path / "ck", max_shard_size="200KB")
    r = run_cli("info", str(tmp_path / "ck"), "--json", fresh=True)
    assert r.code == 0, r.err
    assert "IMPORTED" not in r.err
    info = json.loads(r.out)
    for key in ("intermediate_size", "matformer_base_intermediate_size", "matformer_tier", "files",
                "num_parameters", "dtype", "runnable_tiers"):
        assert key in info
    r = run_cli("info", str(tmp_path / "ck"), fresh=True)
    assert r.code == 0 and "tier 0 (width 256)" in r.out and "IMPORTED" not in r.err


def test_cli_info_errors_are_one_or_two_lines(tmp_path, run_cli):
    save_model(tiny_lm(), tmp_path / "ck")
    raw = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    r = run_cli("info", str(tmp_path / "ck"), fresh=True)
    assert r.code == 2
    assert "Traceback" not in r.err and 1 <= len(r.err.strip().splitlines()) <= 2
    assert "model.safetensors" in r.err and "truncated" in r.err


def test_errors_are_our_type():
    assert issubclass(CheckpointError, MatFormerError)


# ---- property-based: mutated index entries only ever raise our error type --------------------

_index_value = st.one_of(
    st.sampled_from(["model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors",
                     "model-00004-of-00004.safetensors", "model-00005-of-00004.safetensors",
                     "../model-00001-of-00004.safetensors", "/tmp/x.safetensors", "x.bin", "", ".",
                     "model.safetensors", "config.json"]),
    st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2), st.text(max_size=8),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_index_raises_only_checkpoint_error(tmp_path_factory, data):
    folder = _pristine(tmp_path_factory)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    names = sorted(wm)
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["set", "drop", "add", "rename", "whole", "meta"]))
        if op == "set":
            wm[data.draw(st.sampled_from(names))] = data.draw(_index_value)
        elif op == "drop" and wm:
            wm.pop(data.draw(st.sampled_from(sorted(wm))), None)
        elif op == "add":
            wm[data.draw(st.text(max_size=12))] = data.draw(_index_value)
        elif op == "rename" and wm:
            k = data.draw(st.sampled_from(sorted(wm)))
            wm[k + data.draw(st.text(min_size=1, max_size=3))] = wm.pop(k)
        elif op == "whole":
            idx["weight_map"] = data.draw(st.none() | st.lists(st.integers(), max_size=2) | st.just({}))
        else:
            idx["metadata"] = data.draw(st.none() | st.just({"total_size": -1}) | st.text(max_size=4))
    work = tmp_path_factory.mktemp("mut")
    for p in folder.iterdir():
        os.link(p, work / p.name)
    (work / "model.safetensors.index.json").unlink()
    (work / "model.safetensors.index.json").write_text(json.dumps(idx))
    try:
        m = load_model(work)
    except MatFormerError as e:
        assert "Traceback" not in str(e)
        return
    # Accepted: then it must be exactly the original model (metadata is advisory).
    assert_same_tensors(m.state_dict(), load_model(folder).state_dict())


_PRISTINE: dict[str, Path] = {}


def _pristine(factory) -> Path:
    if "p" not in _PRISTINE:
        folder = factory.mktemp("pristine") / "ck"
        save_model(tiny_lm(), folder, max_shard_size="200KB")
        assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 4
        _PRISTINE["p"] = folder
    return _PRISTINE["p"]


def test_write_errors_are_our_type_and_leave_the_old_checkpoint(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="not a folder|cannot create"):
        save_model(tiny_lm(), tmp_path / "file" / "ck")
    save_model(tiny_lm(0), tmp_path / "ck")

    class Boom(RuntimeError):
        pass

    def produce(name):
        raise Boom  # a failure half-way through a save
    sd = tiny_lm(1).state_dict()
    with pytest.raises(Boom):
        write_checkpoint(tmp_path / "ck", DEBUG, [(k, "F32", tuple(v.shape)) for k, v in sd.items()], produce)
    assert_same_tensors(load_state_dict(tmp_path / "ck"), tiny_lm(0).state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "file"]


# ---- atomic single-file writes ---------------------------------------------------------------


def test_atomic_write_replaces_whole_and_leaves_nothing_behind(tmp_path):
    from matformer.io.atomic import atomic_write

    p = tmp_path / "f.json"
    atomic_write(p, "old ✓")
    atomic_write(p, b"new")
    assert p.read_bytes() == b"new" and [x.name for x in tmp_path.iterdir()] == ["f.json"]
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, "x")  # cannot replace a folder: nothing changed, no temp file
    assert p.read_bytes() == b"new" and [x.name for x in tmp_path.iterdir()] == ["f.json"]
    assert not [x for x in tmp_path.parent.iterdir() if x.name.startswith(f".{tmp_path.name}.tmp")]
