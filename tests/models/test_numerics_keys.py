"""Every config key that changes a model's numerics is implemented exactly or refused (issue 23):
the keys transformers' config classes define for each supported family are enumerated, and each
must be in models.lm.numerics' IMPLEMENTED or HARMLESS tables or be refused by its checks."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from matformer.errors import ConfigError
from matformer.models.lm import numerics
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM

transformers = pytest.importorskip("transformers")

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "model_type": "llama"}


def _keys(cls) -> set[str]:
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    return params | set(cls().to_dict())


@pytest.mark.parametrize("cls_name", ["LlamaConfig", "MistralConfig", "Qwen2Config",
                                      "Qwen3Config"])
def test_every_transformers_key_is_classified(cls_name):
    keys = _keys(getattr(transformers, cls_name))
    covered = set(numerics.IMPLEMENTED) | set(numerics.HARMLESS)
    unknown = sorted(keys - covered)
    assert not unknown, f"{cls_name} keys neither implemented, harmless nor refused: {unknown}"
    # Implemented entries say how; harmless ones say why.
    reasons = {**numerics.IMPLEMENTED, **numerics.HARMLESS}
    assert all(reasons[k].strip() for k in keys)


@pytest.mark.parametrize("cls_name", ["LlamaConfig", "MistralConfig"])
def test_default_transformers_configs_load(cls_name):
    """Transformers' own default config of a supported family is ours (sliding_window=4096 of
    Mistral's default is refused only when shorter than the positions)."""
    d = json.loads(getattr(transformers, cls_name)(**{**TINY, "max_position_embeddings": 4096})
                   .to_json_string())
    d.pop("model_type", None)
    cfg = MatFormerConfig.from_dict(d, "default.json")
    assert cfg.hidden_size == 32


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "gelu_new"), ("hidden_act", "quick_gelu"), ("hidden_act", 3),
    ("sliding_window", 16), ("use_sliding_window", True), ("attention_bias", "yes"),
    ("mlp_bias", True), ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}),
    ("rope_scaling", {"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
    ("rope_parameters", {"rope_type": "mystery", "rope_theta": 1e4}),
    ("model_type", "gemma"), ("quantization_config", {"bits": 4}),
    ("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0),
    ("logits_scaling", 2.0), ("embedding_multiplier", 12.0), ("layer_norm_eps", 1e-5),
    ("norm_eps", 1e-5), ("partial_rotary_factor", 0.5), ("layer_types", ["sliding_attention"]),
])
def test_numerics_keys_refused(key, value):
    with pytest.raises(ConfigError, match=key) as e:
        MatFormerConfig.from_dict({**TINY, key: value}, "ck/config.json")
    assert "\n" not in str(e.value) and "ck/config.json" in str(e.value)


@pytest.mark.parametrize("key,value", [
    ("sliding_window", None), ("sliding_window", 64), ("sliding_window", 4096),
    ("attention_bias", False), ("mlp_bias", False), ("rope_scaling", None),
    ("pretraining_tp", 2), ("use_cache", False), ("logits_scaling", 1.0),
    ("quantization_config", None), ("model_type", "mistral"),
])
def test_neutral_values_load(key, value):
    assert MatFormerConfig.from_dict({**TINY, key: value}).hidden_size == 32


@pytest.mark.parametrize("act", numerics.ACTIVATIONS)
def test_activation_matches_transformers_exactly(act):
    from transformers.activations import ACT2FN

    x = torch.randn(1000) * 4
    assert torch.equal(numerics.activation(act)(x), ACT2FN[act](x))


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "relu"])
def test_hidden_act_logits_match_transformers(act):
    """A Llama with another activation computes transformers' logits (was: silu silently)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**{**TINY, "hidden_act": act, "head_dim": 8})).eval()
    d = json.loads(hf.config.to_json_string())
    ours = MatFormerLM(MatFormerConfig.from_dict(d)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        theirs, mine = hf(ids).logits, ours(ids)
        mine = mine.logits if hasattr(mine, "logits") else mine
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    # and the round trip keeps it
    assert MatFormerConfig.from_dict(ours.config.to_dict()).extra["hidden_act"] == act


def test_gguf_export_refuses_other_activations():
    from matformer.models.registry import expected_shapes
    from matformer.slicing.export import plan_export

    cfg = MatFormerConfig.from_dict({**TINY, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="hidden_act"):
        plan_export(cfg, expected_shapes(cfg), [64, 64], "f32", "x")
