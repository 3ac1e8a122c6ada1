"""transformers `PreTrainedConfig` classes for matformer's families (no torch).

One class per registered causal-LM family (`models.registry`; and MatViT's image
classification), made from its record: `model_type` is the family's per-layer type
(`NestedConfig.nested_model_type`: "matformer" for the Llama-layout `lm`, "matformer_vit"), the
class name its per-layer architecture with `HFConfig` for `For...` (`MatFormerHFConfig`,
`MatViTHFConfig`). The class holds config.json's keys as attributes, as every
transformers config does, and `to_matformer()` is the family's own config read from them, so
every check matformer makes on a config.json (sizes, heads, keys that change the logits) runs
on what transformers loads too: an invalid config is the same one-line `ConfigError`.

It reads a uniform config (`model_type: llama`) as well, which is how a uniform or full elastic
checkpoint is loaded as an elastic model (`MatFormerForCausalLM.from_pretrained(CKPT)`), and it
writes what `NestedConfig.to_dict` writes, so `save_pretrained` gives a checkpoint matformer
loads, whose `model_type` says who can read it (`llama` when uniform, ours when per-layer).

Importing this module registers the classes with `AutoConfig` (see `matformer.hf`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig

from matformer.models.nesting import NestedConfig
from matformer.models.registry import CAUSAL_LM, IMAGE_CLASSIFICATION, Family, families

_BASE_DEFAULTS: dict[str, Any] = PreTrainedConfig().to_dict()
"""The keys every transformers config has, with their defaults (dropped when the family does
not know them and they are at the default: they are transformers', not the checkpoint's)."""
_TRANSFORMERS_ONLY = ("_name_or_path", "transformers_version")


class MatFormerPreTrainedConfig(PreTrainedConfig):
    """Base of the per-family classes (`config_class(family)`): a config.json's keys as
    attributes, and the family's config made from them."""

    model_type = "matformer_base"
    matformer_family: ClassVar[str] = ""
    """The `models.registry` family whose config this is."""

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.matformer_family:  # checked now: a bad config.json fails at load, in one line
            self.to_matformer()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any,
                        **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """transformers' reader; a `model_type` of this family (`llama` for a uniform
        checkpoint loaded to run at other widths) is this class's, not a mismatch to warn of."""
        d, rest = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if cls.matformer_family and d.get("model_type") in cls.family().all_model_types:
            d = {k: v for k, v in d.items() if k != "model_type"}
        return d, rest

    @classmethod
    def family(cls) -> Family:
        return next(f for f in families() if f.name == cls.matformer_family)

    def matformer_dict(self) -> dict[str, Any]:
        """config.json as matformer reads it: this config's keys less transformers' own ones
        left at their defaults."""
        d = dict(PreTrainedConfig.to_dict(self))
        fam_config = self.family().config_class
        assert fam_config is not None
        known = fam_config.KNOWN
        for k in list(d):
            if k in _TRANSFORMERS_ONLY or (k in _BASE_DEFAULTS and k not in known
                                           and d[k] == _BASE_DEFAULTS[k]):
                del d[k]
        d["model_type"] = fam_config.MODEL_TYPE  # ours or the family's: the same family
        return d

    def to_matformer(self) -> NestedConfig:
        """The family's config (`MatFormerConfig`, ...) of these keys."""
        fam_config = self.family().config_class
        assert fam_config is not None
        return fam_config.from_dict(self.matformer_dict(),
                                    source=f"{self.name_or_path or 'config'}: config.json")

    def to_dict(self) -> dict[str, Any]:
        """What matformer writes for this config (`model_type` and `architectures` as the
        stored sizes say), with the transformers version."""
        d = self.to_matformer().to_dict()
        d["transformers_version"] = PreTrainedConfig.to_dict(self).get("transformers_version")
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


_CLASSES: dict[str, type[MatFormerPreTrainedConfig]] = {}
TASKS = (CAUSAL_LM, IMAGE_CLASSIFICATION)
"""The families' tasks that have transformers classes here (`model.py` has one base per task)."""


def _class_name(fam: Family) -> str:
    assert fam.config_class is not None
    arch = fam.config_class.NESTED_ARCHITECTURE  # MatFormerForCausalLM -> MatFormerHFConfig
    return (arch[:arch.rindex("For")] if "For" in arch else arch) + "HFConfig"


def hf_families() -> list[Family]:
    """The registered families transformers gets classes for: loadable ones of a task in
    `TASKS` (every causal LM; MatViT's image classification)."""
    return [f for f in families() if f.loadable and f.task in TASKS]


def config_class(family: Family | str = "lm") -> type[MatFormerPreTrainedConfig]:
    """The transformers config class of a family (made on first use)."""
    fam = family if isinstance(family, Family) else next(
        (f for f in hf_families() if f.name == family), None)
    if fam is None or fam not in hf_families():
        raise ValueError(f"{family!r} is not a registered family with transformers classes; "
                         f"one of {', '.join(f.name for f in hf_families())}")
    if fam.name not in _CLASSES:
        assert fam.config_class is not None
        name = _class_name(fam)
        cls = type(name, (MatFormerPreTrainedConfig,), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"transformers config of matformer's {fam.name!r} family "
                       f"({fam.config_class.__name__}).",
            "model_type": fam.config_class.nested_model_type(),
            "matformer_family": fam.name})
        globals()[name] = cls  # importable by name (pickling, `from matformer.hf.config import`)
        _CLASSES[fam.name] = cls
    return _CLASSES[fam.name]


def register_configs() -> None:
    """`AutoConfig.register` every such family's per-layer `model_type`."""
    for fam in hf_families():
        cls = config_class(fam)
        AutoConfig.register(cls.model_type, cls, exist_ok=True)


register_configs()
MatFormerHFConfig = config_class("lm")
"""The config of the Llama-layout family (`model_type` "matformer")."""
MatViTHFConfig = config_class("vit")
"""The config of MatViT (`model_type` "matformer_vit")."""
