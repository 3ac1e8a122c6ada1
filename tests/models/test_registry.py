"""The model-family registry (models/registry.py): families are found from config.json and from
objects, and a new family is one package + one `register(Family(...))`: the checkpoint writer,
loader, `checkpoint_info`, slicing and `matformer info` then work for it with no other change.

The toy family below lives in a package written into a temporary folder (its own config
subclassing `NestedConfig`, its own model mixing in `WidthSetting`, its own shape arithmetic);
nothing in `src/matformer` knows its names.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
import torch

from matformer.errors import ConfigError
from matformer.io.checkpoint import checkpoint_info, load_model, save_model
from matformer.io.source import read_config_file, resolve_source
from matformer.models import registry
from matformer.models.lm.config import MatFormerConfig
from matformer.models.registry import (
    GEMMA3N,
    LM,
    VIT,
    Family,
    config_from_dict,
    expected_shapes,
    family,
    family_of,
    family_of_config,
    family_of_model,
    parameter_counts,
)
from matformer.models.vit.config import MatViTConfig
from matformer.slicing.extract import slice_checkpoint

TOY_CONFIG = '''
from dataclasses import dataclass, field
from typing import Any, ClassVar

from matformer.models.nesting import NESTED_KEYS, NestedConfig, check_positive_int


@dataclass
class ToyConfig(NestedConfig):
    hidden_size: int = 8
    num_hidden_layers: int = 2
    intermediate_size: int | list[int] = 16
    num_attention_heads: int | list[int] = 4
    num_key_value_heads: int | list[int] | None = None
    head_dim: int = 2
    torch_dtype: str = "float32"
    initializer_range: float = 0.02
    matformer_base_intermediate_size: int | None = None
    matformer_tier: int | None = None
    matformer_base_num_key_value_heads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    MODEL_TYPE: ClassVar[str] = "toy"
    ARCHITECTURE: ClassVar[str] = "ToyModel"
    NESTED_ARCHITECTURE: ClassVar[str] = "NestedToyModel"
    KNOWN: ClassVar[frozenset[str]] = NESTED_KEYS | {"hidden_size", "num_key_value_heads"}
    REQUIRED: ClassVar[tuple[str, ...]] = ("hidden_size", "num_hidden_layers", "intermediate_size")
    tie_word_embeddings = False

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_positive_int("hidden_size", self.hidden_size)
        self.intermediate_size = self._per_layer("intermediate_size")
        self.num_attention_heads = self._per_layer("num_attention_heads")
        self.num_key_value_heads = self._per_layer("num_key_value_heads")
        self._check_nested()


def expected_shapes(config, widths=None, kv_heads=None):
    h, hd = config.hidden_size, config.head_dim
    ws = config.layer_widths if widths is None else list(widths)
    gs = config.layer_kv_heads if kv_heads is None else list(kv_heads)
    out = {"embed.weight": (h, 3)}
    for i, (w, g) in enumerate(zip(ws, gs, strict=True)):
        out[f"blocks.{i}.mix.weight"] = (g * hd, h)
        out[f"blocks.{i}.mix_out.weight"] = (h, g * hd)
        out[f"blocks.{i}.up.weight"] = (w, h)
        out[f"blocks.{i}.down.weight"] = (h, w)
    return out


def parameter_counts(config, widths=None, kv_heads=None):
    counts = {"embedding": 0, "non_embedding": 0}
    for name, shape in expected_shapes(config, widths, kv_heads).items():
        n = 1
        for d in shape:
            n *= d
        counts["embedding" if name.startswith("embed.") else "non_embedding"] += n
    counts["total"] = counts["embedding"] + counts["non_embedding"]
    return counts
'''

TOY_MODEL = '''
import torch
from torch import nn

from matformer.models.nesting import WidthSetting


class Block(nn.Module):
    def __init__(self, config, w, g):
        super().__init__()
        hd = config.head_dim
        self.mix = nn.Linear(config.hidden_size, g * hd, bias=False)
        self.mix_out = nn.Linear(g * hd, config.hidden_size, bias=False)
        self.up = nn.Linear(config.hidden_size, w, bias=False)
        self.down = nn.Linear(w, config.hidden_size, bias=False)
        self.width = self.stored_width = w
        self.kv_heads = self.stored_kv_heads = g
        self.hd = hd

    def forward(self, x):
        a = self.kv_heads * self.hd
        x = x + torch.tanh(x @ self.mix.weight[:a].T) @ self.mix_out.weight[:, :a].T
        return x + torch.relu(x @ self.up.weight[: self.width].T) @ self.down.weight[:, : self.width].T


class ToyModel(WidthSetting, nn.Module):
    def __init__(self, config):
        nn.Module.__init__(self)
        self.config = config
        self.embed = nn.Linear(3, config.hidden_size, bias=False)
        self.blocks = nn.ModuleList(Block(config, w, g) for w, g in
                                    zip(config.layer_widths, config.layer_kv_heads, strict=True))

    def _width_slots(self):
        return [(b, b) for b in self.blocks]

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return x
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The `toyfam` package written to a temporary folder and registered as family 'toy';
    unregistered (and forgotten by Python) after the test."""
    pkg = tmp_path / "pkgs" / "toyfam"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A toy model family."""\n')
    (pkg / "config.py").write_text(textwrap.dedent(TOY_CONFIG))
    (pkg / "model.py").write_text(textwrap.dedent(TOY_MODEL))
    monkeypatch.syspath_prepend(str(pkg.parent))
    config = importlib.import_module("toyfam.config")
    fam = registry.register(Family(
        name="toy", model_types=("toy",), architectures=("ToyModel", "NestedToyModel"),
        config_class=config.ToyConfig, model_path="toyfam.model:ToyModel", task="toy-task",
        layer_prefix="blocks.", embedding_prefixes=("embed.",),
        shapes=config.expected_shapes, counts=config.parameter_counts,
    ))
    try:
        yield fam, config.ToyConfig
    finally:
        registry.unregister("toy")
        for name in ("toyfam", "toyfam.config", "toyfam.model"):
            sys.modules.pop(name, None)


def test_a_new_family_is_one_package_and_one_register_call(toy, tmp_path, run_cli) -> None:
    fam, ToyConfig = toy
    cfg = ToyConfig(matformer_base_num_key_value_heads=4)
    assert family_of_config(cfg) is fam and family_of(cfg.to_dict()) is fam
    torch.manual_seed(0)
    model = fam.model_class()(cfg)
    assert family_of_model(model) is fam
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(cfg)

    # save / load / info through the registry, nothing else told about "toy"
    save_model(model, tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["model_type"] == "toy"
    assert isinstance(read_config_file(tmp_path / "full" / "config.json"), ToyConfig)
    assert resolve_source(tmp_path / "full").family is fam
    x = torch.randn(5, 3)
    back = load_model(tmp_path / "full")
    assert type(back) is type(model) and torch.equal(back(x), model(x))
    narrow = load_model(tmp_path / "full", tier=1, kv_heads=2)
    with model.at_width(tier=1, kv_heads=2):
        assert narrow.widths == [8, 8] and torch.allclose(narrow(x), model(x))
    info = checkpoint_info(tmp_path / "full")
    assert info["family"] == "toy" and info["stored_widths"] == [16, 16]
    assert info["num_parameters"] == parameter_counts(cfg)
    code, out, _ = run_cli("info", tmp_path / "full")
    assert code == 0 and "2 x 8, toy" in out

    # slicing: per-layer names renumbered through the family's layer prefix
    slice_checkpoint(tmp_path / "full", tmp_path / "cut", widths=[8, 4], kv_heads=2,
                     skip_layers=None)
    cut = load_model(tmp_path / "cut")
    assert cut.stored_widths == [8, 4] and cut.stored_kv_heads == [2, 2]
    with model.at_width(widths=[8, 4], kv_heads=2):
        assert torch.allclose(cut(x), model(x))
    slice_checkpoint(tmp_path / "full", tmp_path / "one", skip_layers=[0])
    assert list(load_model(tmp_path / "one").state_dict()) == [
        "embed.weight", "blocks.0.mix.weight", "blocks.0.mix_out.weight", "blocks.0.up.weight",
        "blocks.0.down.weight"]


def test_unregistered_family_is_read_as_the_default(toy, tmp_path) -> None:
    fam, ToyConfig = toy
    d = ToyConfig().to_dict()
    registry.unregister("toy")
    assert family_of(d) is LM  # the LM reader then says what is missing
    with pytest.raises(ConfigError, match="model_type='toy' is not supported"):
        config_from_dict(d)
    registry.register(fam)  # the fixture unregisters it again


def test_builtin_families_from_config_json_and_objects() -> None:
    lm, vit = MatFormerConfig.from_preset("debug"), MatViTConfig.from_preset("debug")
    assert family_of(lm.to_dict()) is LM and family_of(vit.to_dict()) is VIT
    assert family_of({"model_type": "gemma3n_text"}) is GEMMA3N and not GEMMA3N.loadable
    assert family_of(None) is LM and family_of({"model_type": "mistral"}).name == "mistral"
    assert family_of_config(lm) is LM and family_of_config(vit) is VIT
    assert family("vit") is VIT and LM.text and not VIT.text
    assert LM.layer_of("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj.weight")
    assert VIT.layer_of("vit.encoder.layer.3.output.dense.bias") == (3, "output.dense.bias")
    assert LM.layer_of("model.norm.weight") is None
    assert VIT.layer_name(1, "output.dense.bias") == "vit.encoder.layer.1.output.dense.bias"
    assert LM.is_embedding("lm_head.weight") and VIT.is_embedding("classifier.bias")
    assert parameter_counts(vit)["total"] == sum(_prod(s) for s in expected_shapes(vit).values())
    with pytest.raises(ConfigError, match="unknown model family 'qwen'"):
        family("qwen")
    with pytest.raises(ConfigError, match="does not load"):
        config_from_dict({"model_type": "gemma3n"}, source="x/config.json")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(VIT)
    with pytest.raises(ValueError, match="already read"):
        registry.register(Family(name="vit2", model_types=("vit",)))


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
