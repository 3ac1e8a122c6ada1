"""Extraction (`matformer.slice_checkpoint`, `matformer slice`): the sliced checkpoint is a real,
smaller checkpoint whose logits equal the runtime-sliced full model, planned and streamed as the
issue asks; multi-tier repos with a hash-checked manifest."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from matformer import CheckpointError, ConfigError, MatFormerConfig, MatFormerLM, TierError
from matformer.cli import main
from matformer.io.checkpoint import load_model, load_state_dict, save_model
from matformer.io.manifest import MANIFEST_NAME
from matformer.io.source import resolve_source
from matformer.slicing.extract import (
    non_embedding_parameters,
    parse_count,
    plan_budget,
    plan_slice,
    slice_checkpoint,
)
from matformer.tiers import tier_of
from tests.conftest import tiny_lm

CARRIED = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"model_max_length": 256}',
    "special_tokens_map.json": b'{"eos_token": "</s>"}',
    "generation_config.json": b'{"max_new_tokens": 7}',
}



@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, MatFormerLM]:
    """A 4-layer debug model (base width 256), saved sharded, with tokenizer/generation files."""
    cfg = MatFormerConfig.from_preset("debug", num_hidden_layers=4)
    model = tiny_lm(config=cfg, random_norms=True)
    folder = tmp_path_factory.mktemp("src") / "full"
    save_model(model, folder, max_shard_size="200KB", extra_files=CARRIED)
    assert (folder / "model.safetensors.index.json").exists()  # really sharded
    return folder, model


def _ids(cfg: MatFormerConfig) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))


# ---- uniform tiers ---------------------------------------------------------------------------


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_tier_slice_loads_in_transformers_with_equal_logits(full, tmp_path, tier) -> None:
    transformers = pytest.importorskip("transformers")
    src, model = full
    out = tmp_path / f"tier{tier}"
    result = slice_checkpoint(src, out, tier=tier)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["intermediate_size"] == 256 >> tier
    assert cfg["matformer_base_intermediate_size"] == 256
    assert cfg["matformer_tier"] == tier
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert result.tier == tier and result.widths == [256 >> tier] * 4
    for name, content in CARRIED.items():
        assert (out / name).read_bytes() == content
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = _ids(model.config)
    with torch.no_grad(), model.at_width(tier=tier):
        ours = model(x)
    with torch.no_grad():
        ref = hf(x).logits
    assert (ours - ref).abs().max().item() <= 1e-5
    # Our loader reads it as a tier-t checkpoint with no runtime slicing.
    loaded = load_model(out)
    assert loaded.stored_widths == [256 >> tier] * 4 and loaded.tier == tier


def test_reads_only_what_it_writes(full, tmp_path) -> None:
    """Streaming reads prefixes: bytes read == tensor bytes written, less than the source."""
    src, _ = full
    result = slice_checkpoint(src, tmp_path / "t3", tier=3)
    written = sum(v.numel() * v.element_size() for v in load_state_dict(tmp_path / "t3").values())
    source = sum(v.numel() * v.element_size() for v in load_state_dict(src).values())
    assert result.bytes_read == written < source


# ---- Mix'n'Match -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [dict(layer_tiers=[3, 2, 2, 1]), dict(widths=[40, 96, 128, 256])],
    ids=["layer-tiers", "free-widths"],
)
def test_mix_slice_equals_runtime_mix(full, tmp_path, kwargs) -> None:
    src, model = full
    out = tmp_path / "mix"
    result = slice_checkpoint(src, out, **kwargs)
    cfg = json.loads((out / "config.json").read_text())
    widths = result.widths
    assert cfg["intermediate_size"] == widths
    assert cfg["matformer_base_intermediate_size"] == 256
    assert cfg["matformer_tier"] is None  # a per-layer list is no uniform tier
    loaded = load_model(out)
    assert loaded.stored_widths == widths
    x = _ids(model.config)
    with torch.no_grad(), model.at_width(widths=widths):
        ref = model(x)
    with torch.no_grad():
        assert (loaded(x) - ref).abs().max().item() <= 1e-6


# ---- further slicing -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_further_slicing_is_bit_exact(tmp_path, dtype) -> None:
    cfg = MatFormerConfig.from_preset("debug", num_hidden_layers=4)
    model = tiny_lm(config=cfg, random_norms=True).to(dtype)
    src = tmp_path / "full"
    save_model(model, src, max_shard_size="100KB")
    slice_checkpoint(src, tmp_path / "t1", tier=1, max_shard_size="100KB")
    for kwargs in (dict(tier=3), dict(layer_tiers=[3, 2, 2, 1])):
        a, b = tmp_path / "direct", tmp_path / "twice"
        slice_checkpoint(src, a, **kwargs)
        slice_checkpoint(tmp_path / "t1", b, **kwargs)
        assert (a / "config.json").read_text() == (b / "config.json").read_text()
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        sd = load_state_dict(b)
        assert next(iter(sd.values())).dtype == dtype
    # and tier 1 -> tier 1 is a copy
    slice_checkpoint(tmp_path / "t1", tmp_path / "t1again", tier=1)
    a, b = load_state_dict(tmp_path / "t1"), load_state_dict(tmp_path / "t1again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_width_the_source_does_not_hold_is_a_clear_error(full, tmp_path) -> None:
    src, _ = full
    t2 = tmp_path / "t2"
    slice_checkpoint(src, t2, tier=2)
    with pytest.raises(TierError, match=r"stores tier 2, width 64; tier 1 .* needs width 128"):
        slice_checkpoint(t2, tmp_path / "bad", tier=1)
    with pytest.raises(TierError, match="needs width 128"):
        slice_checkpoint(t2, tmp_path / "bad", layer_tiers=[3, 2, 2, 1])
    with pytest.raises(TierError, match="outside 1..256"):
        slice_checkpoint(src, tmp_path / "bad", widths=[64, 64, 64, 512])
    with pytest.raises(TierError, match="4 entries|needs 4"):
        slice_checkpoint(src, tmp_path / "bad", layer_tiers=[1, 2])
    with pytest.raises(ConfigError, match="one of"):
        slice_checkpoint(src, tmp_path / "bad", tier=1, budget="10K")
    with pytest.raises(CheckpointError, match="source folder"):
        slice_checkpoint(src, src, tier=1)
    assert not (tmp_path / "bad").exists()  # nothing written on a refused request


# ---- skip layers -------------------------------------------------------------------------


def test_skip_layers_drops_and_renumbers(full, tmp_path) -> None:
    src, model = full
    out = tmp_path / "skip"
    result = slice_checkpoint(src, out, tier=2, skip_layers=[1])
    assert result.keep_layers == [0, 2, 3]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["matformer_tier"] == 2
    sd = load_state_dict(out)
    assert not any(k.startswith("model.layers.3.") for k in sd)
    # The reference: the full model with layer 1 removed, run at tier 2.
    ref_cfg = model.config.with_widths(256)
    ref_cfg.num_hidden_layers = 3
    ref = MatFormerLM(ref_cfg).eval()
    full_sd = model.state_dict()
    new_sd = {}
    for k in ref.state_dict():
        if k.startswith("model.layers."):
            parts = k.split(".")
            parts[2] = str([0, 2, 3][int(parts[2])])
            new_sd[k] = full_sd[".".join(parts)]
        else:
            new_sd[k] = full_sd[k]
    ref.load_state_dict(new_sd)
    x = _ids(model.config)
    with torch.no_grad():
        assert (load_model(out)(x) - ref.set_widths(tier=2)(x)).abs().max().item() <= 1e-6
    # per-layer lists may name all source layers or only the kept ones
    a = slice_checkpoint(src, tmp_path / "a", layer_tiers=[3, 0, 2, 1], skip_layers=[1])
    b = slice_checkpoint(src, tmp_path / "b", layer_tiers=[3, 2, 1], skip_layers=[1])
    assert a.widths == b.widths == [32, 64, 128]
    with pytest.raises(ConfigError, match="does not exist"):
        slice_checkpoint(src, tmp_path / "bad", skip_layers=[4])
    with pytest.raises(ConfigError, match="drops all"):
        slice_checkpoint(src, tmp_path / "bad", skip_layers=[0, 1, 2, 3])


# ---- budget planner ------------------------------------------------------------------------


def _changes(ws: list[int]) -> int:
    return sum(a != b for a, b in zip(ws, ws[1:], strict=False))


@pytest.mark.parametrize("preset", ["850m", "small"])
def test_budget_planner_follows_the_least_slope_heuristic(preset) -> None:
    cfg = MatFormerConfig.from_preset(preset)
    base, L = cfg.base, cfg.num_hidden_layers
    uniform = {t: non_embedding_parameters(cfg, [base >> t] * L) for t in range(4)}
    lo, hi = uniform[3], uniform[0]
    for budget in [lo + (hi - lo) * k // 23 for k in range(24)] + list(uniform.values()) + [hi * 2]:
        ws, why = plan_budget(cfg, budget)
        p = non_embedding_parameters(cfg, ws)
        assert p <= budget
        assert all(a <= b for a, b in zip(ws, ws[1:], strict=False)), ws  # non-decreasing
        assert _changes(ws) <= 1
        tiers = [tier_of(base, w) for w in ws]
        assert None not in tiers and max(tiers) - min(tiers) <= 1  # adjacent granularities
        # uniform when the budget is exactly a uniform size
        for t, n in uniform.items():
            if budget == n:
                assert ws == [base >> t] * L
        # maximal: one more wide layer (or the next granularity) would exceed the budget
        if ws != [base] * L:
            k = sum(w == ws[-1] for w in ws)
            if k < L:
                bigger = [ws[0]] * (L - k - 1) + [ws[-1]] * (k + 1)
            else:
                bigger = [ws[0]] * (L - 1) + [ws[0] * 2]
            assert non_embedding_parameters(cfg, bigger) > budget
        assert "chose:" in why and "non-decreasing" in why and f"{p:,}" in why
    with pytest.raises(TierError, match="below the smallest submodel"):
        plan_budget(cfg, lo - 1)


def test_budget_respects_skipped_layers_and_source_widths(full, tmp_path) -> None:
    src, model = full
    cfg = model.config
    budget = non_embedding_parameters(cfg.with_widths(256), [64, 64, 128]) + 10  # 3 layers
    ws, why = plan_budget(cfg, budget, skip_layers=[0])
    assert ws == [64, 64, 128] and "dropped" in why
    lines: list[str] = []
    result = slice_checkpoint(src, tmp_path / "b", budget=str(budget), skip_layers=[0], log=lines.append)
    assert result.widths == ws and any("chose:" in line for line in lines)
    # a tier-2 source can't offer tier 1 or 0 layers: the plan stays within what it holds
    slice_checkpoint(src, tmp_path / "t2", tier=2)
    t2_cfg = MatFormerConfig.from_json_file(tmp_path / "t2" / "config.json")
    ws2, _ = plan_budget(t2_cfg, 10**9)
    assert ws2 == [64] * 4
    assert parse_count("1.5M") == 1_500_000 and parse_count("250k") == 250_000
    with pytest.raises(ConfigError):
        parse_count("lots")


def test_plan_uses_config_only() -> None:
    cfg = MatFormerConfig.from_preset("850m")
    plan = plan_slice(cfg, tier=2, skip_layers=[3, 5])
    assert plan.config.num_hidden_layers == 14
    assert plan.config.intermediate_size == 1536 and plan.config.matformer_tier == 2
    assert plan.config.matformer_base_intermediate_size == 6144


# ---- sharding ------------------------------------------------------------------------------


def test_sharded_output_round_trips(full, tmp_path) -> None:
    src, model = full
    out = tmp_path / "sharded"
    slice_checkpoint(src, out, layer_tiers=[2, 2, 1, 0], max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    sd = load_state_dict(out)
    full_sd = model.state_dict()
    for k, v in sd.items():
        ref = full_sd[k]
        if ".mlp." in k:
            m = [64, 64, 128, 256][int(k.split(".")[2])]
            ref = ref[:, :m] if "down_proj" in k else ref[:m]
        assert torch.equal(v, ref), k


# ---- multi-tier repos ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo(full, tmp_path_factory) -> Path:
    src, _ = full
    root = tmp_path_factory.mktemp("repo") / "multi"
    result = slice_checkpoint(src, root, tiers=[1, 2])
    assert result.manifest == root / MANIFEST_NAME and set(result.parts) == {1, 2}
    return root


def test_manifest_lists_each_tier_with_sizes_and_hashes(repo) -> None:
    import hashlib

    m = json.loads((repo / MANIFEST_NAME).read_text())
    assert m["schema_version"] == 1 and m["base_intermediate_size"] == 256
    assert set(m["tiers"]) == {"1", "2"}
    for t, entry in m["tiers"].items():
        assert entry["intermediate_size"] == 256 >> int(t) and entry["folder"] == f"tier-{t}"
        names = {f["path"] for f in entry["files"]}
        assert f"tier-{t}/config.json" in names and f"tier-{t}/tokenizer.json" in names
        for f in entry["files"]:
            data = (repo / f["path"]).read_bytes()
            assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()


def test_load_model_picks_one_tier_of_a_manifest_repo(full, repo) -> None:
    _, model = full
    x = _ids(model.config)
    for tier, stored in ((2, 64), (1, 128), (3, 64)):  # tier 3: tier-2 files, sliced at run time
        loaded = load_model(repo, tier=tier)
        assert loaded.stored_widths == [stored] * 4 and loaded.tier == tier
        with torch.no_grad(), model.at_width(tier=tier):
            assert (loaded(x) - model(x)).abs().max().item() <= 1e-6
    with pytest.raises(TierError, match="wider than all"):
        load_model(repo, tier=0)
    with pytest.raises(TierError, match="pass tier="):
        load_model(repo)


def test_manifest_hash_mismatch_is_a_clear_error(repo, tmp_path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(repo, bad)
    shard = bad / "tier-2" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tier-2/model.safetensors: sha256 .* does not match"):
        load_model(bad, tier=2)
    assert load_model(bad, tier=1).stored_widths == [128] * 4  # other tiers unaffected
    (bad / "tier-2" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="size"):
        resolve_source(bad, tier=2)
    m = json.loads((bad / MANIFEST_NAME).read_text())
    m["tiers"]["1"]["files"][0]["path"] = "tier-1/../../etc/passwd"
    (bad / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="not a plain relative path"):
        resolve_source(bad, tier=1)


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_slice(full, tmp_path, capsys) -> None:
    src, _ = full
    assert main(["slice", str(src), "-o", str(tmp_path / "t2"), "--tier", "2"]) == 0
    assert "tier 2 (width 64)" in capsys.readouterr().out
    assert json.loads((tmp_path / "t2" / "config.json").read_text())["matformer_tier"] == 2
    assert main(["slice", str(src), "-o", str(tmp_path / "b"), "--budget", "90K"]) == 0
    out = capsys.readouterr().out
    assert "chose:" in out and "why:" in out
    assert main(["slice", str(src), "-o", str(tmp_path / "w"), "--widths", "32,64,64,128",
                 "--skip-layers", "0", "--max-shard-size", "50KB"]) == 0
    assert json.loads((tmp_path / "w" / "config.json").read_text())["intermediate_size"] == [64, 64, 128]
    capsys.readouterr()
    assert main(["slice", str(src), "-o", str(tmp_path / "x"), "--widths", "32,64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert main(["slice", str(tmp_path / "t2"), "-o", str(tmp_path / "x"), "--tier", "1"]) == 2
    assert "needs width 128" in capsys.readouterr().err
    assert main(["slice", str(src), "-o", str(tmp_path / "m"), "--tiers", "2,3"]) == 0
    assert (tmp_path / "m" / MANIFEST_NAME).exists()


# ---- streaming memory ----------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from matformer.slicing.extract import slice_checkpoint
    src, small, out = sys.argv[1:4]
    slice_checkpoint(small, out + "-warm", tier=1)  # imports and first-use allocations

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    headroom = int(sys.argv[4])
    # A hard cap on the address space: current size + headroom. Anything that maps or loads the
    # whole checkpoint (bigger than the headroom) fails with MemoryError/OSError.
    limit = status("VmSize") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM)
    except OSError:
        pass
    rss0 = status("VmRSS")
    r = slice_checkpoint(src, out, tier=1)
    hwm = status("VmHWM")
    # The naive path (load every tensor, then slice) does not fit under the same limit.
    import glob
    from safetensors.torch import load_file
    try:
        held = [load_file(f) for f in sorted(glob.glob(src + "/*.safetensors"))]
        naive = "fit"
    except (MemoryError, RuntimeError, OSError) as e:
        naive = type(e).__name__
    print(json.dumps({"rss0": rss0, "hwm": hwm, "read": r.bytes_read, "naive": naive}))
    """
)


def test_streaming_memory_is_bounded_by_the_largest_tensor(tmp_path) -> None:
    # ~170 MB of float32 weights; largest tensor (embedding / lm_head) 16.8 MB.
    cfg = MatFormerConfig(vocab_size=8192, hidden_size=512, intermediate_size=2048,
                          num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=64)
    with torch.device("meta"):
        meta = MatFormerLM(cfg)
    sd = {k: torch.full(v.shape, 0.5) for k, v in meta.state_dict().items()}
    largest = max(v.numel() * 4 for v in sd.values())
    total = sum(v.numel() * 4 for v in sd.values())
    model = MatFormerLM(MatFormerConfig.from_preset("debug"))
    save_model(model, tmp_path / "small")
    with torch.device("meta"):
        big = MatFormerLM(cfg)
    big.load_state_dict(sd, assign=True)
    save_model(big, tmp_path / "big", max_shard_size="50MB")
    del sd, big
    headroom = 4 * largest  # the memory limit set on the process: far below the checkpoint
    assert total > 2.5 * headroom
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "big"), str(tmp_path / "small"),
         str(tmp_path / "out"), str(headroom)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = r["hwm"] - r["rss0"]
    assert growth < 1.5 * largest, (growth, largest, total)
    assert r["naive"] != "fit"  # the limit is real: loading everything fails under it
    out = load_state_dict(tmp_path / "out")
    assert out["model.layers.7.mlp.down_proj.weight"].shape == (512, 1024)
    assert r["read"] < total


def test_fake_hub_multi_tier_repo_fetches_one_tier_and_checks_hashes(repo, tmp_path) -> None:
    """Through the real huggingface_hub client against the loopback fake Hub (tests/fake_hub.py):
    only the manifest and tier 2's files are downloaded; a file altered on the Hub is refused."""
    import os

    from tests.fake_hub import FakeHub

    files = {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    code = ("import sys; from matformer import load_model, MatFormerError\n"
            "try:\n    m = load_model(sys.argv[1], tier=2); print(m.stored_widths)\n"
            "except MatFormerError as e:\n    print('ERR', e); sys.exit(2)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with FakeHub() as hub:
        hub.add_repo("acme/multi", files)
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1")
        r = subprocess.run([sys.executable, "-c", code, "acme/multi"], capture_output=True,
                           text=True, env=env, timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.strip() == "[64, 64, 64, 64]"
        tier2 = sorted(f for f in files if f.startswith("tier-2/"))
        assert sorted(hub.requests("GET")) == sorted([MANIFEST_NAME, *tier2])
        bad = dict(files)
        shard = "tier-2/model.safetensors"
        bad[shard] = bad[shard][:-1] + bytes([bad[shard][-1] ^ 1])
        hub.add_repo("acme/tampered", bad)
        r = subprocess.run([sys.executable, "-c", code, "acme/tampered"], capture_output=True,
                           text=True, env=env, timeout=180)
        assert r.returncode == 2 and "does not match the manifest" in r.stdout, r.stdout + r.stderr
