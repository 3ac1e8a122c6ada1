"""Gemma 3n in (`matformer.slicing.gemma3n`, `matformer slice` / `info` on Gemma 3n folders): tiny random
Gemma 3n models built by transformers offline, sliced by us, loaded back by transformers and
compared with the full model (cut neurons zeroed) or with a model built by hand from the kept
layers, in float32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Gemma3nAudioConfig,
    Gemma3nConfig,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
    Gemma3nVisionConfig,
)
from transformers.models.gemma3n.modeling_gemma3n import (  # noqa: E402
    Gemma3nAudioEncoder,
    Gemma3nMultimodalEmbedder,
)

from matformer.cli import main  # noqa: E402
from matformer.errors import CheckpointError, ConfigError, TierError  # noqa: E402
from matformer.slicing.gemma3n import (  # noqa: E402
    gemma3n_info,
    parse_expression,
    read_config,
    read_slicing_config,
    slice_gemma3n,
)
from matformer.slicing.gemma3n.config import normalise  # noqa: E402
from matformer.slicing.gemma3n.shapes import parameter_groups, text_shapes  # noqa: E402

L = 10
TYPES = ["sliding_attention", "full_attention"] * 5  # KV stores: 4 (sliding), 5 (full)
STORED = [64] * 4 + [128] + [64] * 5
HP = 8  # hidden_size_per_layer_input
TOKENIZER = {"tokenizer_config.json": b'{"model_max_length": 64}'}
CSV_HEADER = "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n"


def text_config(**over) -> Gemma3nTextConfig:
    kw = dict(vocab_size=144, vocab_size_per_layer_input=64, hidden_size=32,
              hidden_size_per_layer_input=HP, intermediate_size=list(STORED), num_hidden_layers=L,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_kv_shared_layers=4,
              laurel_rank=4, sliding_window=4, max_position_embeddings=64, layer_types=list(TYPES),
              activation_sparsity_pattern=[0.0] * L)
    kw.update(over)
    return Gemma3nTextConfig(**kw)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norm scales, AltUp scales...), so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[Path, Gemma3nForCausalLM]:
    torch.manual_seed(0)
    model = Gemma3nForCausalLM(text_config()).eval()
    randomize(model, 0)
    folder = tmp_path_factory.mktemp("g3n") / "full"
    model.save_pretrained(folder)
    for name, data in TOKENIZER.items():
        (folder / name).write_bytes(data)
    return folder, model


def ids() -> torch.Tensor:
    return torch.randint(0, 144, (2, 11), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids(), use_cache=False).logits


def load(folder: Path) -> Gemma3nForCausalLM:
    return Gemma3nForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---- FFN widths ---------------------------------------------------------------------------


def test_ffn_slice_equals_full_model_with_cut_neurons_zeroed(full, tmp_path, one_thread):
    folder, model = full
    widths = [16, 32, 64, 8, 96, 64, 16, 48, 32, 64]
    r = slice_gemma3n(folder, tmp_path / "mix", widths=widths)
    cfg = json.loads((tmp_path / "mix" / "config.json").read_text())
    assert cfg["intermediate_size"] == widths and cfg["num_kv_shared_layers"] == 4
    sliced = load(tmp_path / "mix")
    assert [layer.mlp.down_proj.weight.shape[1] for layer in sliced.model.layers] == widths
    zeroed = Gemma3nForCausalLM(text_config()).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, w in zip(zeroed.model.layers, widths, strict=True):
            layer.mlp.down_proj.weight[:, w:] = 0
    got, want = logits(sliced), logits(zeroed)
    assert (got - want).abs().max().item() <= 1e-5
    assert (logits(model) - want).abs().max().item() > 1e-3  # the cut really changed the model
    assert (tmp_path / "mix" / "tokenizer_config.json").read_bytes() == TOKENIZER["tokenizer_config.json"]
    assert r.bytes_read < sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_layer_tiers_count_against_each_layers_stored_width(full, tmp_path):
    folder, _ = full
    r = slice_gemma3n(folder, tmp_path / "t", layer_tiers=[1] * L)
    assert r.plan.widths == [s // 2 for s in STORED]  # layer 4 stores 128: tier 1 is 64 there
    r2 = slice_gemma3n(folder, tmp_path / "t2", tier=1)
    assert r2.plan.widths == r.plan.widths


# ---- layers -------------------------------------------------------------------------------


def hand_built(model: Gemma3nForCausalLM, keep: list[int], widths: list[int]) -> Gemma3nForCausalLM:
    """A transformers model of the kept layers, weights copied tensor by tensor by hand."""
    shared = sum(1 for i in keep if i >= L - 4)
    cfg = text_config(num_hidden_layers=len(keep), intermediate_size=widths,
                      layer_types=[TYPES[i] for i in keep], num_kv_shared_layers=shared,
                      activation_sparsity_pattern=[0.0] * len(keep))
    small = Gemma3nForCausalLM(cfg).eval()
    src, dst = model.model, small.model
    with torch.no_grad():
        for j, i in enumerate(keep):
            theirs = src.layers[i].state_dict()
            for name, t in dst.layers[j].state_dict().items():
                s = theirs[name]
                t.copy_(s[: t.shape[0], : t.shape[1]] if t.dim() == 2 else s)
        cols = torch.cat([src.embed_tokens_per_layer.weight[:, i * HP:(i + 1) * HP] for i in keep], 1)
        dst.embed_tokens_per_layer.weight.copy_(cols)
        rows = torch.cat([src.per_layer_model_projection.weight[i * HP:(i + 1) * HP] for i in keep])
        dst.per_layer_model_projection.weight.copy_(rows)
        for name in ("embed_tokens.weight", "norm.weight", "per_layer_projection_norm.weight"):
            dst.get_parameter(name).copy_(src.get_parameter(name))
        for k in range(3):
            dst.altup_projections[k].weight.copy_(src.altup_projections[k].weight)
            dst.altup_unembed_projections[k].weight.copy_(src.altup_unembed_projections[k].weight)
    return small


@pytest.mark.parametrize("skip", [[2, 7], [6, 7, 8, 9], [0, 1, 3]])
def test_layer_skipped_slice_matches_model_built_from_kept_layers(full, tmp_path, skip, one_thread):
    folder, model = full
    keep = [i for i in range(L) if i not in skip]
    widths = [STORED[i] // 2 for i in keep]
    r = slice_gemma3n(folder, tmp_path / "s", skip_layers=skip, widths=widths)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(keep)
    assert cfg["layer_types"] == [TYPES[i] for i in keep]
    assert cfg["num_kv_shared_layers"] == sum(1 for i in keep if i >= 6) == r.plan.num_kv_shared
    sliced = load(tmp_path / "s")
    got, want = logits(sliced), logits(hand_built(model, keep, widths))
    assert (got - want).abs().max().item() <= 1e-5
    out = sliced.generate(ids()[:1], max_new_tokens=4, do_sample=False)  # runs with a KV cache
    assert out.shape == (1, 15)


def test_skipping_a_kv_source_layer_is_refused(full, tmp_path):
    folder, _ = full
    for store in (4, 5):
        with pytest.raises(ConfigError, match=f"layer {store} is where the KV-shared"):
            slice_gemma3n(folder, tmp_path / "x", skip_layers=[store])
    assert not (tmp_path / "x").exists()
    # with every reader of its type skipped too, the store may go
    r = slice_gemma3n(folder, tmp_path / "ok", skip_layers=[5, 7, 9])
    assert r.plan.num_kv_shared == 2
    load(tmp_path / "ok")


def test_activation_sparsity_pattern_follows_the_kept_layers(tmp_path):
    model = Gemma3nForCausalLM(text_config(activation_sparsity_pattern=[0.95] * 3 + [0.0] * 7))
    model.save_pretrained(tmp_path / "sp")
    slice_gemma3n(tmp_path / "sp", tmp_path / "out", skip_layers=[1])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["activation_sparsity_pattern"] == [0.95, 0.95] + [0.0] * 7
    load(tmp_path / "out")


# ---- named configurations -----------------------------------------------------------------


def test_parse_expression_without_eval():
    assert parse_expression("2_048 * 4") == 8192
    assert parse_expression("[2_048 * 4] * 3 + [8_192]") == [8192] * 4
    assert parse_expression("[1, (2 + 3) * 2, 4,]") == [1, 10, 4]
    for bad in ("__import__('os')", "2__048", "[1] * [2]", "[1] + 2", "[[1]]", "[1, 2", "",
                "[1] * 10_000_000", "1e3", "-1"):
        with pytest.raises(ConfigError, match="allowed: integers"):
            parse_expression(bad, "FFN Hidden Dims")


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(CSV_HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    return path


def test_config_csv_row_equals_explicit_request(full, tmp_path):
    folder, _ = full
    csv = write_csv(tmp_path / "configs.csv", [
        'Main model,10,0.0,0%,"[64] * 4 + [128] + [64] * 5",',
        'Config for tiny mix,8,0.0,0%,"[1_6 * 2] * 4 + [2 * 32] * 4","[2, 7]"',
    ])
    row = read_slicing_config(csv, "Config for tiny mix")
    assert row.widths == [32] * 4 + [64] * 4 and row.skip_layers == [2, 7]
    a = slice_gemma3n(folder, tmp_path / "a", config_csv=str(csv), config_name="Config for tiny mix")
    b = slice_gemma3n(folder, tmp_path / "b", widths=row.widths, skip_layers=[2, 7])
    assert a.plan.keep == b.plan.keep
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    main_model = slice_gemma3n(folder, tmp_path / "m", config_csv=str(csv), config_name="Main model")
    assert main_model.plan.widths == STORED and main_model.plan.keep == list(range(L))


def test_config_csv_errors(full, tmp_path):
    folder, _ = full
    csv = write_csv(tmp_path / "c.csv", [
        'bad dims,10,0,0%,"[64 * ] * 10",',
        'wrong count,9,0,0%,"[64] * 10",',
        'too wide,10,0,0%,"[256] * 10",',
    ])
    cases = [("nope", ConfigError, "no configuration named 'nope'"),
             ("bad dims", ConfigError, "FFN Hidden Dims"),
             ("wrong count", ConfigError, "'# Layers' says '9'"),
             ("too wide", TierError, "above the 64")]
    for name, err, msg in cases:
        with pytest.raises(err, match=msg):
            slice_gemma3n(folder, tmp_path / "x", config_csv=str(csv), config_name=name)
    assert not (tmp_path / "x").exists()


def test_published_effective_parameters_are_reproduced():
    """Google's slicing configs list E4B (35 layers, FFN 16_384) as 3.98B and the E2B config (30
    layers, FFN 8_192, layers 20-24 skipped) as 1.91B effective parameters; the same count over
    the transformers-default (E4B) shapes gives those numbers."""
    text = normalise({}, "")

    def effective(widths: list[int], first_shared: int) -> float:
        req, opt = text_shapes(text, widths, first_shared)
        shapes = {"model." + k: v for k, v in {**req, **opt}.items()}
        return round(parameter_groups(shapes, "model.")["effective"] / 1e9, 2)

    assert effective([16_384] * 35, 20) == 3.98
    assert effective([8_192] * 30, 20) == 1.91


# ---- errors and atomicity -----------------------------------------------------------------


def test_bad_requests_are_one_line_cli_errors(full, tmp_path, capsys):
    folder, _ = full
    cases = [
        (["--skip-layers", "5"], "layer 5 is where the KV-shared full_attention layers"),
        (["--widths", ",".join(["256"] * L)], "above the 64"),
        (["--config-csv", str(tmp_path / "none.csv"), "--config-name", "x"], "no such slicing-config"),
        (["--budget", "1M"], "--budget"),
    ]
    for extra, msg in cases:
        assert main(["slice", str(folder), "-o", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_failed_write_leaves_the_previous_slice_untouched(full, tmp_path, monkeypatch):
    folder, _ = full
    out = tmp_path / "out"
    slice_gemma3n(folder, out, tier=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from matformer.io.tensors import TensorReader

    real, calls = TensorReader.read, []

    def flaky(self, job):
        calls.append(job.src)
        if len(calls) == 20:
            raise CheckpointError("disk went away")
        return real(self, job)

    monkeypatch.setattr(TensorReader, "read", flaky)
    with pytest.raises(CheckpointError, match="disk went away"):
        slice_gemma3n(folder, out, tier=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left


def test_chunked_column_reads_equal_exact_reads(full, tmp_path):
    folder, _ = full
    a = slice_gemma3n(folder, tmp_path / "a", skip_layers=[1, 8], widths=[32] * 8)
    b = slice_gemma3n(folder, tmp_path / "b", skip_layers=[1, 8], widths=[32] * 8,
                      reader_options={"exact_run_limit": 0, "chunk_bytes": 300})
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert b.bytes_read > a.bytes_read  # spans include the skipped columns between kept runs


def test_sharded_slice_loads_and_equals_the_one_file_slice(full, tmp_path):
    folder, _ = full
    one = slice_gemma3n(folder, tmp_path / "one", tier=1)
    many = slice_gemma3n(folder, tmp_path / "many", tier=1, max_shard_size="100KB")
    assert one.files == ["config.json", "generation_config.json", "model.safetensors",
                         "tokenizer_config.json"]
    assert "model.safetensors.index.json" in many.files and len(many.files) > 4
    a, b = load(tmp_path / "one").state_dict(), load(tmp_path / "many").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- info ---------------------------------------------------------------------------------


def test_info_counts_effective_parameters_and_imports_no_torch(full, tmp_path):
    folder, model = full
    info = gemma3n_info(folder)
    p = info["parameters"]
    n_all = sum(t.numel() for t in model.parameters())  # tied head counted once
    per_layer = model.model.embed_tokens_per_layer.weight.numel()
    emb = model.model.embed_tokens.weight.numel()
    assert p["total"] == n_all and p["effective"] == n_all - per_layer - emb
    assert info["kv_shared_layers"] == [6, 7, 8, 9]
    assert info["kv_sources"] == {"full_attention": 5, "sliding_attention": 4}
    code = ("import sys; from matformer.cli import main; rc = main(['info', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert "KV sharing       layers 6-9 reuse the keys/values of layer 5 (full), layer 4 (sliding)" in run.stdout
    assert "FFN widths       64 x4, 128, 64 x5" in run.stdout
    assert f"effective params {p['effective']:,}" in run.stdout


# ---- the multimodal layout ----------------------------------------------------------------


@pytest.fixture(scope="module")
def multimodal(full, tmp_path_factory) -> Path:
    """A Gemma3nForConditionalGeneration-layout folder: our text model under
    model.language_model.*, a real tiny audio tower and embedders, and random tensors in the
    vision tower's place (transformers builds the vision tower only through timm, which is not
    installed). The KV-shared layers carry k_proj/v_proj/k_norm as Google's checkpoints do."""
    folder, model = full
    text = text_config()
    audio = Gemma3nAudioConfig(hidden_size=16, conf_num_attention_heads=2, conf_num_hidden_layers=1,
                               sscp_conv_channel_size=[4, 4], input_feat_size=16, vocab_size=8,
                               vocab_offset=136)
    vision = Gemma3nVisionConfig(hidden_size=16, vocab_size=8, vocab_offset=128)
    sd = {"model.language_model." + k.removeprefix("model."): v.clone()
          for k, v in load_file(folder / "model.safetensors").items()}
    g = torch.Generator().manual_seed(5)
    for i in range(6, L):
        for name, shape in (("k_proj.weight", (16, 32)), ("v_proj.weight", (16, 32)), ("k_norm.weight", (16,))):
            sd[f"model.language_model.layers.{i}.self_attn.{name}"] = torch.randn(shape, generator=g)
    towers = {"audio_tower": Gemma3nAudioEncoder(audio),
              "embed_audio": Gemma3nMultimodalEmbedder(audio, text),
              "embed_vision": Gemma3nMultimodalEmbedder(vision, text)}
    for prefix, module in towers.items():
        randomize(module, 3)
        sd.update({f"model.{prefix}.{k}": v.contiguous() for k, v in module.state_dict().items()})
    sd["model.vision_tower.timm_model.conv_stem.conv.weight"] = torch.randn(4, 3, 3, 3, generator=g)
    out = tmp_path_factory.mktemp("mm") / "e4b"
    out.mkdir()
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    cfg = Gemma3nConfig(text_config=text, vision_config=vision, audio_config=audio).to_dict()
    cfg["architectures"] = ["Gemma3nForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_multimodal_slice_cuts_the_text_model_and_copies_the_towers(full, multimodal, tmp_path, one_thread):
    skip, widths = [2, 7], [32] * 8
    slice_gemma3n(multimodal, tmp_path / "mm", skip_layers=skip, widths=widths)
    slice_gemma3n(full[0], tmp_path / "text", skip_layers=skip, widths=widths)
    mm = load_file(tmp_path / "mm" / "model.safetensors")
    text = load_file(tmp_path / "text" / "model.safetensors")
    src = load_file(multimodal / "model.safetensors")
    towers = {k for k in src if not k.startswith("model.language_model.")}
    assert towers and all(torch.equal(mm[k], src[k]) for k in towers)
    lm = {"model." + k.removeprefix("model.language_model."): v for k, v in mm.items() if k not in towers}
    kv_extra = {k for k in lm if k not in text}
    assert kv_extra == {f"model.layers.{j}.self_attn.{n}" for j in (5, 6, 7)
                        for n in ("k_proj.weight", "v_proj.weight", "k_norm.weight")}
    assert all(torch.equal(lm[k], text[k]) for k in text)
    cfg = Gemma3nConfig.from_pretrained(tmp_path / "mm")  # transformers reads the sliced config
    assert cfg.text_config.num_hidden_layers == 8 and cfg.text_config.num_kv_shared_layers == 3
    assert cfg.text_config.intermediate_size == widths
    small = Gemma3nForCausalLM(cfg.text_config).eval()
    missing, unexpected = small.load_state_dict(lm, strict=False)
    assert missing == ["lm_head.weight"] and set(unexpected) == kv_extra  # unused KV of shared layers
    assert small.lm_head.weight is small.model.embed_tokens.weight  # tied: loaded through the embedding
    assert (logits(small) - logits(load(tmp_path / "text"))).abs().max().item() <= 1e-5
    info = gemma3n_info(tmp_path / "mm")
    assert info["multimodal"] and info["parameters"]["audio"] > 0 and info["parameters"]["vision"] > 0
    assert read_config(tmp_path / "mm").text["layer_types"] == [TYPES[i] for i in range(L) if i not in skip]


# ---- Hub ids (issue 16: through io.source.resolve_source) ---------------------------------


@pytest.fixture(scope="module")
def hub(full, multimodal, tmp_path_factory):
    """The loopback fake Hub serving the text-only and the multimodal folder (plus a file no
    slice needs), with huggingface_hub pointed at it in this process."""
    from huggingface_hub import constants

    from tests.fake_hub import FakeHub

    home = tmp_path_factory.mktemp("g3n-hub")

    def files(folder: Path) -> dict[str, bytes]:
        found = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        return {**found, "original/unused.bin": b"\0" * 64}

    mp = pytest.MonkeyPatch()
    with FakeHub() as h:
        h.add_repo("google/gemma-3n-tiny-text", files(full[0]))
        h.add_repo("google/gemma-3n-tiny", files(multimodal))
        mp.setattr(constants, "ENDPOINT", h.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_CACHE", str(home / "hf-cache"))
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_TOKEN_PATH", str(home / "no-token"))
        mp.delenv("HF_TOKEN", raising=False)
        yield h
    mp.undo()


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("repo", ["google/gemma-3n-tiny-text", "google/gemma-3n-tiny"])
def test_hub_id_slice_and_info_equal_the_local_folder(full, multimodal, hub, repo, tmp_path, capsys):
    local = full[0] if repo.endswith("-text") else multimodal
    request = ["--widths", ",".join(["32"] * 8), "--skip-layers", "1,8"]
    hub.log.clear()
    assert main(["slice", repo, "-o", str(tmp_path / "hub"), *request]) == 0, capsys.readouterr().err
    fetched = set(hub.requests("GET"))
    assert main(["slice", str(local), "-o", str(tmp_path / "local"), *request]) == 0
    got, want = folder_bytes(tmp_path / "hub"), folder_bytes(tmp_path / "local")
    assert got == want and "config.json" in got and "model.safetensors" in got
    assert ("tokenizer_config.json" in got) == repo.endswith("-text")  # companions travel
    assert "original/unused.bin" not in set(hub.requests())
    assert fetched == {p.name for p in local.iterdir()}  # every file a slice needs, no other
    capsys.readouterr()

    hub.log.clear()
    assert main(["info", repo, "--json"]) == 0
    from_hub = json.loads(capsys.readouterr().out)
    assert not {"tokenizer_config.json", "original/unused.bin"} & set(hub.requests())
    assert main(["info", str(local), "--json"]) == 0
    from_folder = json.loads(capsys.readouterr().out)
    assert from_hub.pop("source").startswith(repo + "@") and from_folder.pop("source") == str(local)
    assert from_hub == from_folder


def test_a_gemma3n_checkpoint_is_refused_by_the_loaders_in_one_line(full):
    from matformer.io.checkpoint import load_model
    from matformer.io.source import resolve_source

    source = resolve_source(full[0])  # resolved (files, family), but not ours to load
    assert source.family.name == "gemma3n" and source.layout.shards == ["model.safetensors"]
    msg = "Gemma 3n checkpoint; matformer slices and describes it"
    with pytest.raises(ConfigError, match=msg):
        _ = source.config
    with pytest.raises(ConfigError, match=msg):
        load_model(full[0])
