"""MatFormerConfig: the config.json, its validation and the tier rules of the spec."""

from __future__ import annotations

import json

import pytest

from matformer import ConfigError, MatFormerConfig
from matformer.models.lm.config import PRESETS


def test_round_trip_keeps_unknown_keys(tmp_path) -> None:
    cfg = MatFormerConfig.from_preset("debug")
    d = cfg.to_dict()
    d["my_custom_key"] = {"nested": [1, 2]}
    d["attention_dropout"] = 0.0
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    back = MatFormerConfig.from_json_file(p)
    assert back.extra["my_custom_key"] == {"nested": [1, 2]}
    assert back.to_dict() == d
    assert back == MatFormerConfig.from_dict(back.to_dict())


def test_written_config_is_a_llama_config_transformers_reads() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = MatFormerConfig.from_preset("debug", rope_theta=5e5, tie_word_embeddings=True)
    d = cfg.to_dict()
    assert d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]
    assert d["matformer_base_intermediate_size"] == 256 and d["matformer_tier"] == 0
    hf = transformers.LlamaConfig.from_dict(d)
    assert hf.rope_parameters["rope_theta"] == 5e5
    assert hf.intermediate_size == 256 and hf.num_key_value_heads == 2
    assert hf.tie_word_embeddings is True


def test_rope_theta_read_from_either_place() -> None:
    base = {k: v for k, v in PRESETS["debug"].items()}
    assert MatFormerConfig.from_dict({**base, "rope_theta": 1234.0}).rope_theta == 1234.0
    tf5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}}
    assert MatFormerConfig.from_dict(tf5).rope_theta == 777.0
    with pytest.raises(ConfigError, match="rope_type 'llama3' needs"):
        MatFormerConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}})
    with pytest.raises(ConfigError, match="rope_parameters.rope_type='longrope'"):
        MatFormerConfig.from_dict({**base, "rope_parameters": {"rope_type": "longrope"}})


def test_dtype_read_from_either_key() -> None:
    base = dict(PRESETS["debug"])
    assert MatFormerConfig.from_dict({**base, "torch_dtype": "bfloat16"}).torch_dtype == "bfloat16"
    assert MatFormerConfig.from_dict({**base, "dtype": "float16"}).torch_dtype == "float16"
    with pytest.raises(ConfigError, match="torch_dtype='int8'"):
        MatFormerConfig.from_dict({**base, "torch_dtype": "int8"})


@pytest.mark.parametrize(
    "override,key",
    [
        ({"hidden_size": -64}, "hidden_size"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"intermediate_size": [64, 64, 64]}, "intermediate_size"),
        ({"intermediate_size": [64, -1]}, "intermediate_size\\[1\\]"),
        ({"intermediate_size": [64, 512], "matformer_base_intermediate_size": 256}, "layer 1"),
        ({"matformer_tier": -1}, "matformer_tier"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ],
)
def test_invalid_values_name_the_key(override, key) -> None:
    with pytest.raises(ConfigError, match=key):
        MatFormerConfig.from_dict({**PRESETS["debug"], **override}, source="x/config.json")


def test_missing_required_key_and_bad_file(tmp_path) -> None:
    d = dict(PRESETS["debug"])
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        MatFormerConfig.from_dict(d)
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        MatFormerConfig.from_json_file(p)
    with pytest.raises(ConfigError, match="no such file"):
        MatFormerConfig.from_json_file(tmp_path / "missing.json")


def test_tier_semantics_describe_the_stored_sizes() -> None:
    cfg = MatFormerConfig.from_preset("debug")  # base 256
    assert cfg.stored_tier == 0
    t2 = cfg.with_widths(64)
    assert (t2.intermediate_size, t2.base, t2.stored_tier, t2.matformer_tier) == (64, 256, 2, 2)
    mix = cfg.with_widths([64, 128])
    assert mix.stored_tier is None and mix.to_dict()["matformer_tier"] is None
    odd = cfg.with_widths(96)  # 256/96 is no power of two: no tier label
    assert odd.to_dict()["matformer_tier"] is None
    # A uniform list collapses to an int (so transformers can read it).
    assert cfg.with_widths([64, 64]).intermediate_size == 64
    # Missing base: the stored width is the base (a dense checkpoint is tier 0).
    plain = {k: v for k, v in PRESETS["debug"].items()}
    c = MatFormerConfig.from_dict({**plain, "intermediate_size": 100})
    assert c.base == 100 and c.stored_tier == 0
    # A tier label that lies about the sizes is reported.
    liar = MatFormerConfig.from_dict({**plain, "intermediate_size": 256, "matformer_tier": 2,
                                      "matformer_base_intermediate_size": 256})
    with pytest.raises(ConfigError, match="matformer_tier=2 disagrees"):
        liar.check_tier_label()
    with pytest.raises(ConfigError, match="matformer_base_intermediate_size"):
        MatFormerConfig.from_dict({**plain, "intermediate_size": 100}).check_tier(3)


def test_presets_are_valid_and_unknown_preset_is_clear() -> None:
    for name in PRESETS:
        MatFormerConfig.from_preset(name)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        MatFormerConfig.from_preset("huge")
