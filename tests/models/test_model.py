"""The nested model against transformers' LlamaForCausalLM, and the runtime-width contract."""

from __future__ import annotations

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM, TierError
from matformer.models.lm.shapes import expected_shapes, format_count, parameter_counts, parse_count

transformers = pytest.importorskip("transformers")


def _hf_model(cfg: MatFormerConfig, state_dict: dict[str, torch.Tensor]):
    hf_cfg = transformers.LlamaConfig(
        **{k: v for k, v in cfg.to_dict().items() if not k.startswith("matformer")}
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    result = hf.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys
    # A tied model may have lm_head listed as missing; it shares the embedding.
    assert set(result.missing_keys) <= {"lm_head.weight"}
    return hf


@pytest.mark.parametrize(
    "kv_heads,tied",
    [(2, False), (4, False), (2, True), (1, True)],
    ids=["gqa", "mha", "gqa-tied", "mqa-tied"],
)
def test_full_width_logits_match_transformers(kv_heads: int, tied: bool) -> None:
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset("debug", num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    model = MatFormerLM(cfg).eval()
    # Non-trivial norm weights so RMSNorm scaling is exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    hf = _hf_model(cfg, model.state_dict())
    x = torch.randint(0, cfg.vocab_size, (3, 29))
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == (3, 29, cfg.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-5
    # Loss helper agrees with transformers' shifted loss.
    with torch.no_grad():
        assert abs(model.loss(x).item() - hf(x, labels=x).loss.item()) <= 1e-5


def _sliced_state_dict(sd: dict[str, torch.Tensor], widths: list[int]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if ".mlp." in k:
            i = int(k.split(".")[2])
            m = widths[i]
            v = v[:, :m] if "down_proj" in k else v[:m]
        out[k] = v.clone()
    return out


@pytest.mark.parametrize("tier", [0, 1, 2, 3])
def test_runtime_tier_equals_model_built_at_that_width(tier: int) -> None:
    torch.manual_seed(1)
    cfg = MatFormerConfig.from_preset("debug")
    full = MatFormerLM(cfg).eval()
    width = cfg.base >> tier
    small_cfg = cfg.with_widths(width)
    assert small_cfg.matformer_tier == tier
    small = MatFormerLM(small_cfg).eval()
    small.load_state_dict(_sliced_state_dict(full.state_dict(), [width] * cfg.num_hidden_layers))
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad(), full.at_width(tier=tier):
        a = full(x)
    with torch.no_grad():
        b = small(x)
    # Same arithmetic on the same numbers; only the memory layout of the views differs.
    assert (a - b).abs().max().item() <= 1e-5
    # A uniform small model is a plain Llama: transformers agrees too.
    hf = _hf_model(small_cfg, small.state_dict())
    with torch.no_grad():
        assert (hf(x).logits - a).abs().max().item() <= 1e-5


def test_mix_and_match_equals_model_built_with_those_widths() -> None:
    torch.manual_seed(2)
    cfg = MatFormerConfig.from_preset("debug", num_hidden_layers=4)
    full = MatFormerLM(cfg).eval()
    widths = [32, 64, 64, 256]
    small_cfg = cfg.with_widths(widths)
    assert small_cfg.intermediate_size == widths and small_cfg.matformer_tier is None
    small = MatFormerLM(small_cfg).eval()
    small.load_state_dict(_sliced_state_dict(full.state_dict(), widths))
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full.set_widths(widths=widths)
        a = full(x)
        b = small(x)
    assert (a - b).abs().max().item() <= 1e-5
    # Per-layer tiers give the same widths.
    full.set_widths(layer_tiers=[3, 2, 2, 0])
    assert full.widths == widths


def test_cached_incremental_decoding_matches_full_forward() -> None:
    torch.manual_seed(3)
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    for tier in (0, 2):
        model.set_widths(tier=tier)
        with torch.no_grad():
            full = model(x)
            cache = model.new_cache(2, 32)
            parts = [model(x[:, :7], cache=cache)]  # prefill
            parts += [model(x[:, 7:11], cache=cache)]  # a multi-token chunk after a prefix
            for t in range(11, 20):  # one token at a time
                parts.append(model(x[:, t : t + 1], cache=cache))
        assert cache.length == 20
        assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5
    # Crop rolls back: recomputing the last 5 positions gives the same logits.
    with torch.no_grad():
        cache.crop(15)
        again = model(x[:, 15:20], cache=cache)
    assert (again - full[:, 15:20]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tier", [0, 1, 2, 3])
def test_tail_gradients_are_exactly_zero(tier: int) -> None:
    torch.manual_seed(4)
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg)
    model.set_widths(tier=tier)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model.loss(x).backward()
    m = cfg.base >> tier
    for layer in model.model.layers:
        g, u, d = (layer.mlp.gate_proj.weight.grad, layer.mlp.up_proj.weight.grad,
                   layer.mlp.down_proj.weight.grad)
        assert g.shape == (cfg.base, cfg.hidden_size)  # full-size gradient buffer
        assert torch.count_nonzero(g[m:]) == 0
        assert torch.count_nonzero(u[m:]) == 0
        assert torch.count_nonzero(d[:, m:]) == 0
        # The active part is really trained.
        assert torch.count_nonzero(g[:m]) > 0 and torch.count_nonzero(d[:, :m]) > 0


def test_set_widths_copies_no_weight_storage() -> None:
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    captured: list[torch.Tensor] = []
    layer = model.model.layers[0]
    orig = torch.nn.functional.linear

    def spy(x, w, b=None):
        captured.append(w)
        return orig(x, w, b)

    model.set_widths(tier=2)
    torch.nn.functional.linear = spy
    try:
        with torch.no_grad():
            model(torch.randint(0, cfg.vocab_size, (1, 4)))
    finally:
        torch.nn.functional.linear = orig
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    # The FFN weights used at tier 2 are views into the stored tensors, not copies.
    m = cfg.base >> 2

    def used(param: torch.Tensor) -> torch.Tensor:
        hits = [w for w in captured
                if w.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()]
        assert len(hits) == 1, "each FFN weight is used once, as a view of its storage"
        return hits[0]

    gate, up, down = (used(layer.mlp.gate_proj.weight), used(layer.mlp.up_proj.weight),
                      used(layer.mlp.down_proj.weight))
    assert gate.shape == (m, cfg.hidden_size) and gate.data_ptr() == layer.mlp.gate_proj.weight.data_ptr()
    assert up.shape == (m, cfg.hidden_size) and up.data_ptr() == layer.mlp.up_proj.weight.data_ptr()
    assert down.shape == (cfg.hidden_size, m) and down.data_ptr() == layer.mlp.down_proj.weight.data_ptr()


def test_widths_setting_and_context_manager() -> None:
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg)
    assert model.widths == [256, 256] and model.tier == 0
    with model.at_width(tier=3):
        assert model.widths == [32, 32] and model.tier == 3
        with model.at_width(widths=[64, 128]):
            assert model.tier is None
        assert model.widths == [32, 32]
    assert model.widths == [256, 256]
    # The context manager restores even when the body raises.
    with pytest.raises(RuntimeError), model.at_width(tier=1):
        raise RuntimeError("boom")
    assert model.widths == [256, 256]
    model.set_widths(tier=2)
    model.set_widths()
    assert model.widths == [256, 256]


def test_width_requests_that_cannot_run_are_clear_errors() -> None:
    cfg = MatFormerConfig.from_preset("debug")
    sliced = MatFormerLM(cfg.with_widths(64))  # stores tier 2
    with pytest.raises(TierError, match="stores tier 2, width 64; tier 1 needs width 128"):
        sliced.set_widths(tier=1)
    sliced.set_widths(tier=3)
    assert sliced.widths == [32, 32]
    model = MatFormerLM(cfg)
    with pytest.raises(TierError, match="divisible by 2\\^9"):
        model.set_widths(tier=9)
    with pytest.raises(TierError, match="2 layers"):
        model.set_widths(widths=[64, 64, 64])
    with pytest.raises(TierError, match="outside 1..256"):
        model.set_widths(widths=[0, 64])
    with pytest.raises(TierError, match="exactly one"):
        model.set_widths(tier=1, widths=[64, 64])


def test_parameter_counts_split_and_scale_with_width() -> None:
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["embedding"] == 2 * cfg.vocab_size * cfg.hidden_size
    small = MatFormerLM(cfg.with_widths(64))
    assert parameter_counts(cfg, [64, 64])["total"] == sum(p.numel() for p in small.parameters())
    # Model's own view follows the active widths.
    with model.at_width(tier=2):
        assert model.num_parameters_at() == parameter_counts(cfg, [64, 64])
    tied = MatFormerConfig.from_preset("debug", tie_word_embeddings=True)
    assert parameter_counts(tied)["total"] == sum(p.numel() for p in MatFormerLM(tied).parameters())


def test_meta_construction_and_assign_loading_share_storage() -> None:
    cfg = MatFormerConfig.from_preset("debug")
    src = MatFormerLM(cfg)
    sd = src.state_dict()
    with torch.device("meta"):
        model = MatFormerLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(sd, assign=True)
    assert model.model.embed_tokens.weight.data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    x = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_bfloat16_forward_runs_and_stays_close() -> None:
    torch.manual_seed(5)
    cfg = MatFormerConfig.from_preset("debug")
    model = MatFormerLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        ref = model(x)
        model.to(torch.bfloat16)
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.05


def test_shapes_and_counts_match_the_model_at_mixed_widths_and_dropped_layers() -> None:
    # matformer.models.lm.shapes is torch-free arithmetic; the model is the ground truth it must match.
    cfg = MatFormerConfig.from_preset("debug", num_hidden_layers=3)
    mixed = cfg.with_widths([32, 256, 96])  # a tier, the base and a width that is no tier
    model = MatFormerLM(mixed)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(mixed) == shapes
    counts = parameter_counts(cfg, [32, 256, 96])
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # Two widths for a three-layer config: a model with a layer dropped.
    two = MatFormerLM(MatFormerConfig.from_preset("debug", num_hidden_layers=2).with_widths([32, 96]))
    assert parameter_counts(cfg, [32, 96])["total"] == sum(p.numel() for p in two.parameters())
    assert list(expected_shapes(cfg, [32, 96])) == list(two.state_dict())


def test_format_and_parse_count_round_trip() -> None:
    assert [format_count(n) for n in (999, 984_375, 1_234_567, 7_500_000_000)] == [
        "999", "984K", "1.23M", "7.5B"]
    assert parse_count("984K") == 984_000 and parse_count("1.5B") == 1_500_000_000
    assert parse_count(12) == 12
