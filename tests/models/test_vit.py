"""MatViT against transformers' ViTForImageClassification, and the nesting contract on both axes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from matformer.data.images import (
    BatchSampler,
    load_digits,
    load_image_folder,
    load_split,
    stratified_split,
)
from matformer.errors import CheckpointError, ConfigError, DataError, TierError
from matformer.evaluation.vision import cross_retrieval, evaluate_vit, nearest_neighbour_accuracy
from matformer.models.vit.config import MatViTConfig, expected_shapes, parameter_counts
from matformer.models.vit.model import MatViT

transformers = pytest.importorskip("transformers")


def _random_model(seed: int = 0, **overrides) -> MatViT:
    """Every parameter drawn at random (biases, norms, class token too), so nothing is left at
    an init value that would hide a missing or misplaced tensor."""
    torch.manual_seed(seed)
    model = MatViT(MatViTConfig.from_preset("debug", **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
    return model


def _save(folder, config: MatViTConfig, state: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(config.to_json_string())


def _hf_from_folder(folder, attn: str = "sdpa"):
    """transformers reads our file names as is (its own legacy-name conversion, no renaming by us)."""
    hf, info = transformers.ViTForImageClassification.from_pretrained(
        str(folder), attn_implementation=attn, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return hf.eval()


def _pixels(cfg: MatViTConfig, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)


def _cut(state: dict[str, torch.Tensor], hd: int, widths: list[int], heads: list[int]) -> dict[str, torch.Tensor]:
    """The first widths[i] FFN neurons and heads[i] heads of layer i, copied out (the slice)."""
    out = {}
    for k, v in state.items():
        if ".encoder.layer." in k:
            i = int(k.split(".")[3])
            m, n = widths[i], heads[i] * hd
            if "intermediate.dense" in k:
                v = v[:m]
            elif k.endswith(f"layer.{i}.output.dense.weight"):
                v = v[:, :m]
            elif ".attention.attention." in k:
                v = v[:n]
            elif k.endswith("attention.output.dense.weight"):
                v = v[:, :n]
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_pytorch_tanh", "qkv_bias": False}],
                         ids=["vit", "tanh-gelu-no-qkv-bias"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_width_logits_match_transformers(tmp_path, overrides, attn) -> None:
    model = _random_model(**overrides)
    _save(tmp_path, model.config, model.state_dict())
    hf = _hf_from_folder(tmp_path, attn)
    x = _pixels(model.config)
    with torch.no_grad():
        logits, emb = model(x), model.embed(x)
        out = hf(x, output_hidden_states=True)
        ref_emb = hf.vit.layernorm(out.hidden_states[-1])[:, 0]
    assert logits.shape == (3, 10)
    assert (logits - out.logits).abs().max().item() <= 1e-5
    assert (emb - ref_emb).abs().max().item() <= 1e-5
    labels = torch.tensor([0, 3, 9])
    with torch.no_grad():
        assert abs(model.loss(x, labels).item() - hf(x, labels=labels).loss.item()) <= 1e-5


@pytest.mark.parametrize("tier,kv_heads", [(1, None), (2, None), (3, None), (0, 2), (2, 1), (1, 3)])
def test_uniform_cut_is_a_transformers_vit_equal_to_the_runtime_setting(tmp_path, tier, kv_heads) -> None:
    """Cut a tier (and/or the first g heads) out by copying prefixes into a transformers ViT built
    at that size: its logits equal ours running at that setting through views."""
    model = _random_model(1)
    cfg = model.config
    m, g = cfg.base >> tier, kv_heads or cfg.base_kv_heads
    small_cfg = cfg.with_widths(m, g)
    assert small_cfg.matformer_tier == tier and small_cfg.to_dict()["architectures"] == ["ViTForImageClassification"]
    L = cfg.num_hidden_layers
    _save(tmp_path, small_cfg, _cut(model.state_dict(), cfg.head_dim, [m] * L, [g] * L))
    hf = _hf_from_folder(tmp_path)
    assert hf.config.intermediate_size == m and hf.config.num_attention_heads == g
    x = _pixels(cfg)
    with torch.no_grad(), model.at_width(tier=tier, kv_heads=kv_heads):
        ours = model(x)
    with torch.no_grad():
        ref = hf(x).logits
        full = model(x)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - full).abs().max().item() > 1e-3  # the setting really changed the computation


def test_unused_neurons_and_heads_get_exactly_zero_gradient() -> None:
    model = _random_model(2).train()
    cfg = model.config
    hd = cfg.head_dim
    model.set_widths(layer_tiers=[2, 1], layer_kv_heads=[1, 3])
    model.loss(_pixels(cfg, 4), torch.tensor([1, 2, 3, 4])).backward()
    for layer, m, g in zip(model.layers, [cfg.base >> 2, cfg.base >> 1], [1, 3], strict=True):
        up, down = layer.intermediate.dense, layer.output.dense
        assert up.weight.grad[m:].abs().max() == 0 and up.bias.grad[m:].abs().max() == 0
        assert down.weight.grad[:, m:].abs().max() == 0
        assert up.weight.grad[:m].abs().max() > 0 and down.weight.grad[:, :m].abs().max() > 0
        n = g * hd
        for proj in (layer.attention.attention.query, layer.attention.attention.key,
                     layer.attention.attention.value):
            assert proj.weight.grad[n:].abs().max() == 0 and proj.bias.grad[n:].abs().max() == 0
            assert proj.weight.grad[:n].abs().max() > 0
        out = layer.attention.output.dense.weight.grad
        assert out[:, n:].abs().max() == 0 and out[:, :n].abs().max() > 0


def test_mix_n_match_equals_a_model_storing_those_widths() -> None:
    """Per-layer widths and heads at run time equal a MatViT built storing exactly those."""
    model = _random_model(3)
    cfg = model.config
    widths, heads = [cfg.base >> 3, cfg.base >> 1], [4, 2]
    small = MatViT(cfg.with_widths(widths, heads)).eval()
    assert small.config.to_dict()["architectures"] == ["MatViTForImageClassification"]
    assert small.config.to_dict()["matformer_tier"] is None
    small.load_state_dict(_cut(model.state_dict(), cfg.head_dim, widths, heads))
    x = _pixels(cfg)
    with torch.no_grad(), model.at_width(widths=widths, layer_kv_heads=heads):
        assert model.widths == widths and model.layer_kv_heads == heads and model.tier is None
        a = model(x)
    with torch.no_grad():
        b = small(x)
    assert (a - b).abs().max().item() <= 1e-5
    assert model.widths == [cfg.base] * 2 and model.layer_kv_heads == [4, 4]  # at_width restored the setting
    # The small model runs its own stored setting, and refuses more than it stores.
    assert small.widths == widths and small.layer_kv_heads == heads
    with pytest.raises(TierError, match="needs width"):
        small.set_widths(tier=1)
    with pytest.raises(TierError, match="stores 2 KV heads in layer 1; kv_heads 3 needs 3"):
        small.set_widths(kv_heads=3)


def test_bad_width_requests_are_clear_errors() -> None:
    model = _random_model()
    with pytest.raises(TierError, match="outside 1..4"):
        model.set_widths(kv_heads=5)
    with pytest.raises(TierError, match="not both"):
        model.set_widths(kv_heads=2, layer_kv_heads=[2, 2])
    with pytest.raises(TierError, match="2 layers"):
        model.set_widths(layer_tiers=[1, 1, 1])
    with pytest.raises(TierError, match="exactly one"):
        model.set_widths(tier=1, widths=64)
    with pytest.raises(DataError, match=r"\(batch, 1, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8))
    assert model.widths == [128, 128] and model.layer_kv_heads == [4, 4]  # a failed request changes nothing


def test_parameter_counts_and_shapes_match_the_modules() -> None:
    cfg = MatViTConfig.from_preset("debug")
    model = MatViT(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(cfg)
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())
    small_cfg = cfg.with_widths([32, 64], [1, 2])
    small = MatViT(small_cfg)
    assert {k: tuple(v.shape) for k, v in small.state_dict().items()} == expected_shapes(small_cfg)
    assert model.num_parameters_at([32, 64], [1, 2]) == parameter_counts(small_cfg)
    assert parameter_counts(small_cfg)["total"] == sum(p.numel() for p in small.parameters())


def test_config_round_trip_and_transformers_reads_it() -> None:
    cfg = MatViTConfig.from_preset("tiny", id2label={i: f"digit {i}" for i in range(10)},
                                   extra={"hidden_dropout_prob": 0.0, "encoder_stride": 2})
    d = json.loads(cfg.to_json_string())
    assert d["model_type"] == "vit" and d["architectures"] == ["ViTForImageClassification"]
    assert d["matformer_base_intermediate_size"] == 512 and d["matformer_tier"] == 0
    assert d["matformer_base_num_key_value_heads"] == 4 and d["head_dim"] == 16
    assert d["label2id"]["digit 3"] == 3 and d["encoder_stride"] == 2
    again = MatViTConfig.from_dict(d)
    assert again.to_dict() == d
    hf = transformers.ViTConfig.from_dict(d)
    assert (hf.image_size, hf.patch_size, hf.num_channels, hf.num_labels) == (8, 2, 1, 10)
    assert hf.id2label[3] == "digit 3"
    # A plain transformers ViT config (no MatFormer keys) is a tier-0 MatViT.
    plain = MatViTConfig.from_dict(transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1,
                                                          hidden_size=32, num_attention_heads=4,
                                                          intermediate_size=64).to_dict())
    assert plain.base == 64 and plain.stored_tier == 0 and plain.num_labels == 2


def test_truth_rule_and_config_errors() -> None:
    cfg = MatViTConfig.from_preset("debug")
    assert cfg.with_widths(32).to_dict()["matformer_tier"] == 2
    assert cfg.with_widths(96).to_dict()["matformer_tier"] is None  # 3/4 of B is no tier
    bad = MatViTConfig.from_dict({**cfg.with_widths(32).to_dict(), "matformer_tier": 1})
    with pytest.raises(ConfigError, match="matformer_tier=1 disagrees"):
        bad.check_tier_label()
    base = cfg.to_dict()
    for change, message in [
        ({"patch_size": 3}, "not divisible by patch_size"),
        ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
        ({"num_labels": 3}, "disagrees with id2label"),
        ({"intermediate_size": [64, 64, 64]}, "3 entries but num_hidden_layers=2"),
        ({"intermediate_size": 256}, "more than matformer_base_intermediate_size=128"),
        ({"model_type": "llama"}, "not a ViT"),
        ({"image_size": None}, "image_size must be a positive integer"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            MatViTConfig.from_dict({**base, **change}, source="x/config.json")
        assert str(e.value).startswith("x/config.json: ") and "\n" not in str(e.value)
    d = dict(base)
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="required key 'hidden_size'"):
        MatViTConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown ViT preset"):
        MatViTConfig.from_preset("huge")


# ---- data ------------------------------------------------------------------------------------

def test_digits_split_is_stratified_fixed_and_normalised() -> None:
    digits = load_digits()
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.max() == 1.0
    a, b = load_split("digits", 8, 1), load_split(None, 8, 1)
    assert len(a.train) + len(a.heldout) == 1797
    assert np.array_equal(a.heldout.labels, b.heldout.labels)
    assert np.array_equal(a.heldout.images, b.heldout.images)
    counts = np.bincount(a.heldout.labels)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class (~180 images per class)
    assert abs(a.train.images.mean()) < 1e-5 and abs(a.train.images.std() - 1) < 1e-4
    train_idx, heldout_idx = stratified_split(digits.labels)
    assert len(np.intersect1d(train_idx, heldout_idx)) == 0
    assert len(train_idx) + len(heldout_idx) == 1797
    norm = a.normalisation
    assert np.allclose(digits.images[heldout_idx], a.heldout.images * norm.std[0] + norm.mean[0], atol=1e-6)
    with pytest.raises(DataError, match="class 1 has 1 image"):
        stratified_split(np.array([0, 0, 1, 2, 2]))
    rgb = load_split("digits", 16, 3)
    assert rgb.train.images.shape[1:] == (3, 16, 16) and len(rgb.normalisation.mean) == 3


def test_image_folder(tmp_path) -> None:
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for name, value in (("cats", 40), ("dogs", 200)):
        (tmp_path / name).mkdir()
        for i in range(5):
            arr = np.clip(rng.normal(value, 5, (12, 10, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    gray = load_image_folder(tmp_path, 8, 1)
    assert gray.images.shape == (10, 1, 8, 8) and gray.class_names == ["cats", "dogs"]
    assert list(gray.labels) == [0] * 5 + [1] * 5
    assert gray.images[:5].mean() < 0.25 < 0.7 < gray.images[5:].mean()
    rgb = load_split(tmp_path, 4, 3, heldout_fraction=0.4)
    assert rgb.train.images.shape == (6, 3, 4, 4) and sorted(rgb.heldout.labels) == [0, 0, 1, 1]
    (tmp_path / "dogs" / "9.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="9.png: cannot read as an image"):
        load_image_folder(tmp_path, 8, 1)
    (tmp_path / "birds").mkdir()
    with pytest.raises(DataError, match="birds: no images"):
        load_image_folder(tmp_path, 8, 1)
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "missing", 8, 1)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="found 1 class"):
        load_image_folder(tmp_path / "one", 8, 1)


def test_batch_sampler_resumes_the_same_batches() -> None:
    a = BatchSampler(10, seed=3)
    first = [a.next(4) for _ in range(2)]
    state = a.state()
    rest = [a.next(4) for _ in range(3)]
    b = BatchSampler(10, seed=3)
    b.load_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(rest, [b.next(4) for _ in range(3)], strict=True))
    # One epoch visits every item once.
    epoch = np.concatenate(first + [rest[0][:2]])
    assert sorted(epoch.tolist()) == list(range(10))
    with pytest.raises(DataError, match="num_items=10"):
        BatchSampler(11, seed=3).load_state(state)


# ---- evaluation --------------------------------------------------------------------------------

def test_nearest_neighbour_accuracy_against_a_direct_computation() -> None:
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(0)
    gallery, queries = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    gl, ql = np.arange(60) % 4, np.arange(25) % 4
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(gallery.numpy(), gl)
    expected = float((knn.predict(queries.numpy()) == ql).mean())
    assert nearest_neighbour_accuracy(queries, ql, gallery, gl) == pytest.approx(expected)
    # Leave-one-out: query i never retrieves item i (a plain 1-NN would score 100% here).
    assert nearest_neighbour_accuracy(gallery, gl, gallery, gl) == 1.0
    loo = nearest_neighbour_accuracy(gallery, gl, gallery, gl, leave_one_out=True)
    direct = []
    for i in range(60):
        sims = [float(F.cosine_similarity(gallery[i], gallery[j], dim=0)) if j != i else -2.0
                for j in range(60)]
        direct.append(gl[int(np.argmax(sims))] == gl[i])
    assert loo == pytest.approx(float(np.mean(direct)))


def test_evaluate_vit_rows_against_direct_computation() -> None:
    model = _random_model(4)
    split = load_split("digits", 8, 1)
    heldout = split.heldout.subset(np.arange(64))
    model.set_widths(tier=1)
    report = evaluate_vit(model, heldout, kv_heads=[2], repeats=1)
    assert model.widths == [64, 64] and model.layer_kv_heads == [4, 4]  # setting restored
    names = [r.name for r in report.results]
    assert names[0] == "tier 0 (width 128)" and "tier 3 (width 16)" in names
    assert "tier 1 (width 64), 2 heads" in names
    assert any(r.kind == "mix" for r in report.results)
    ref = report.results[0]
    assert ref.agreement == 1.0 and ref.non_embedding_params == parameter_counts(model.config)["non_embedding"]
    x = torch.as_tensor(heldout.images)
    model.set_widths()
    with torch.no_grad():
        full_emb, full_pred = model.embed(x), model(x).argmax(1)
        with model.at_width(tier=2, kv_heads=2):
            small_emb, small_pred = model.embed(x), model(x).argmax(1)
    row = next(r for r in report.results if r.name == "tier 2 (width 32), 2 heads")
    labels = torch.as_tensor(heldout.labels)
    assert row.top1 == pytest.approx(float((small_pred == labels).float().mean()))
    assert row.agreement == pytest.approx(float((small_pred == full_pred).float().mean()))
    assert row.retrieval == pytest.approx(cross_retrieval_direct(small_emb, full_emb, heldout.labels))
    assert row.non_embedding_params == parameter_counts(model.config, [32, 32], [2, 2])["non_embedding"]


def cross_retrieval_direct(queries: torch.Tensor, gallery: torch.Tensor, labels: np.ndarray) -> float:
    hits = 0
    for i in range(len(queries)):
        sims = F.cosine_similarity(queries[i][None], gallery, dim=1)
        sims[i] = float("-inf")
        hits += int(labels[int(sims.argmax())] == labels[i])
    return hits / len(queries)


def test_cross_retrieval_between_two_models() -> None:
    a, b = _random_model(5), _random_model(6)
    heldout = load_split("digits", 8, 1).heldout.subset(np.arange(50))
    x = torch.as_tensor(heldout.images)
    with torch.no_grad():
        expected = cross_retrieval_direct(a.embed(x), b.embed(x), heldout.labels)
    assert cross_retrieval(a, b, heldout) == pytest.approx(expected)


# ---- checkpoints ---------------------------------------------------------------------------------

def test_save_load_through_io_and_transformers_reads_it(tmp_path) -> None:
    from matformer import load_model, save_model

    model = _random_model(7)
    model.set_widths(tier=2, kv_heads=2)  # runtime setting: never reaches the metadata
    save_model(model, tmp_path / "full")
    d = json.loads((tmp_path / "full" / "config.json").read_text())
    assert d["model_type"] == "vit" and d["matformer_tier"] == 0 and d["intermediate_size"] == 128
    assert d["num_attention_heads"] == 4 and d["matformer_base_num_key_value_heads"] == 4
    loaded = load_model(tmp_path / "full")
    assert isinstance(loaded, MatViT) and loaded.widths == [128, 128]
    x = _pixels(model.config)
    model.set_widths()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        hf = _hf_from_folder(tmp_path / "full")
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-5
    small = load_model(tmp_path / "full", tier=2, kv_heads=1)
    assert small.widths == [32, 32] and small.layer_kv_heads == [1, 1]
    with torch.no_grad(), model.at_width(tier=2, kv_heads=1):
        assert torch.equal(small(x), model(x))
    # A checkpoint cut to tier 1 refuses tier 0, naming what it stores.
    cut = MatViT(model.config.with_widths(64)).eval()
    cut.load_state_dict(_cut(model.state_dict(), model.config.head_dim, [64, 64], [4, 4]))
    save_model(cut, tmp_path / "t1")
    assert json.loads((tmp_path / "t1" / "config.json").read_text())["matformer_tier"] == 1
    with pytest.raises(TierError, match="stores tier 1, width 64; tier 0 needs width 128"):
        load_model(tmp_path / "t1", tier=0)


# ---- training ------------------------------------------------------------------------------------

def _train_cfg(out, **kw):
    from matformer.training import TrainConfig

    base = dict(out=str(out), arch="vit", preset="debug", steps=6, batch_size=16, eval_every=3,
                save_every=3, log_every=3, lr=3e-3, quiet=True)
    return TrainConfig(**{**base, **kw})


def test_train_vit_resume_is_bit_exact(tmp_path, one_thread) -> None:
    import shutil

    from matformer import load_model
    from matformer.training import train

    result = train(_train_cfg(tmp_path / "a"))
    assert set(result.final_top1) == {0, 1, 2, 3} and result.train_images == 96
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "train_config.json"} <= files
    # A run stopped after its step-3 checkpoint, resumed, ends where the uninterrupted one did.
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000003",
                    tmp_path / "b" / "checkpoints" / "step-0000003")
    train(_train_cfg(tmp_path / "b", resume=True))
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    with pytest.raises(CheckpointError, match="settings differ.*preset: saved 'debug', now 'tiny'"):
        train(_train_cfg(tmp_path / "b", resume=True, steps=9, preset="tiny"))


def test_runtime_tier_training_leaves_the_tail_bit_identical(tmp_path, one_thread) -> None:
    from matformer import load_model
    from matformer.training import train

    train(_train_cfg(tmp_path, objective="single", tier=2, steps=4))
    trained = load_model(tmp_path)
    init = MatViT(trained.config)
    init.reset_parameters(seed=0)
    m = trained.config.base >> 2
    changed = {}
    for (name, a), b in zip(trained.state_dict().items(), init.state_dict().values(), strict=True):
        if "intermediate.dense" in name:
            assert torch.equal(a[m:], b[m:]), name  # weights and biases of the unused neurons
            changed[name] = not torch.equal(a[:m], b[:m])
        elif name.endswith(".output.dense.weight") and "attention" not in name:
            assert torch.equal(a[:, m:], b[:, m:]), name
            changed[name] = not torch.equal(a[:, :m], b[:, :m])
    assert changed and all(changed.values())


def test_train_vit_refuses_lm_only_settings(tmp_path) -> None:
    from matformer.training import train

    with pytest.raises(ConfigError, match="--fsdp is not supported with --arch vit"):
        train(_train_cfg(tmp_path, fsdp=True))
    with pytest.raises(ConfigError, match="unknown ViT preset '850m'"):
        train(_train_cfg(tmp_path, preset="850m"))
    assert not tmp_path.joinpath("config.json").exists()


# ---- command line --------------------------------------------------------------------------------

def test_cli_train_and_eval_a_matvit(tmp_path, capsys, one_thread) -> None:
    from matformer.cli import main

    out = tmp_path / "run"
    assert main(["train", "--arch", "vit", "--preset", "debug", "--steps", "4", "--batch-size", "16",
                 "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--tiers", "0,2", "--kv-heads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["tier 0 (width 128)", "tier 2 (width 32)"]
    assert "tier 2 (width 32), 2 heads" in names and report["num_images"] == 359
    plot = tmp_path / "vit.png"
    assert main(["eval", str(out), "--no-mix", "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "| tier 3 (width 16) | 4 |" in table and plot.stat().st_size > 10_000
    assert main(["eval", str(out), "--seq-len", "64"]) == 2
    assert "--seq-len does not apply to a MatViT" in capsys.readouterr().err


# ---- slicing -------------------------------------------------------------------------------------

def test_slice_a_uniform_tier_transformers_loads_with_equal_logits(tmp_path, capsys) -> None:
    from matformer import load_model, save_model, slice_checkpoint
    from matformer.cli import main

    model = _random_model(8)
    (tmp_path / "full").mkdir()
    save_model(model, tmp_path / "full",
               extra_files={"preprocessor_config.json": b'{"image_mean": [0.3], "image_std": [0.4]}\n'})
    x = _pixels(model.config)
    for tier, kv_heads in [(2, None), (1, 2)]:
        out = tmp_path / f"t{tier}-{kv_heads}"
        slice_checkpoint(tmp_path / "full", out, tier=tier, kv_heads=kv_heads)
        d = json.loads((out / "config.json").read_text())
        assert d["architectures"] == ["ViTForImageClassification"] and d["matformer_tier"] == tier
        assert (out / "preprocessor_config.json").is_file()  # the normalisation travels along
        hf = _hf_from_folder(out)  # transformers reads our names and config as they are
        with torch.no_grad(), model.at_width(tier=tier, kv_heads=kv_heads):
            ours = model(x)
            assert (hf(x).logits - ours).abs().max().item() <= 1e-5
            assert torch.equal(load_model(out)(x), ours)
    # Mix'n'Match: our loader reads the per-layer config; slicing it again is bit-exact.
    slice_checkpoint(tmp_path / "full", tmp_path / "mix", widths=[32, 128], layer_kv_heads=[4, 1])
    mix = load_model(tmp_path / "mix")
    assert mix.widths == [32, 128] and mix.layer_kv_heads == [4, 1]
    with torch.no_grad(), model.at_width(widths=[32, 128], layer_kv_heads=[4, 1]):
        assert torch.equal(mix(x), model(x))
    assert main(["slice", str(tmp_path / "mix"), "-o", str(tmp_path / "mix2"), "--widths", "16,64"]) == 0
    again = load_model(tmp_path / "mix2")
    with torch.no_grad(), model.at_width(widths=[16, 64], layer_kv_heads=[4, 1]):
        assert torch.equal(again(x), model(x))
    assert main(["slice", str(tmp_path / "t2-None"), "-o", str(tmp_path / "bad"), "--tier", "1"]) == 2
    assert "stores tier 2" in capsys.readouterr().err


def test_info_describes_a_matvit_without_torch(tmp_path) -> None:
    import subprocess
    import sys

    from matformer import save_model

    model = _random_model(9)
    save_model(model, tmp_path)
    code = ("import json, sys; from matformer import checkpoint_info; "
            f"i = checkpoint_info({str(tmp_path)!r}); print(json.dumps(i)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         timeout=300).stdout
    info, torch_loaded = json.loads(out.splitlines()[0]), out.splitlines()[1]
    assert torch_loaded == "False"
    assert info["model_type"] == "vit" and info["num_labels"] == 10 and info["image_size"] == 8
    assert info["num_parameters"]["non_embedding"] == parameter_counts(model.config)["non_embedding"]
    assert info["num_parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["runnable_kv_heads"] == [4, 2, 1] and info["matformer_tier"] == 0
