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

The classes are made on first use and importing this module imports no transformers;
`register_configs()` (called by the import hook of `matformer.hf` once transformers' AutoConfig
has loaded) registers them with `AutoConfig`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ClassVar

from matformer.models.nesting import NestedConfig
from matformer.models.registry import CAUSAL_LM, IMAGE_CLASSIFICATION, Family, families

_TRANSFORMERS_ONLY = ("_name_or_path", "transformers_version")
_AUTO_CONFIG = "transformers.models.auto.configuration_auto"
_state: dict[str, Any] = {"base": None, "building": False}


def built_once(state: dict[str, Any], key: str, define: Callable[[], Any], auto_module: str,
               register: Callable[[], None]) -> Any:
    """`state[key]`, made by `define()` on first use with `state["building"]` set meanwhile
    (transformers' import inside `define` may fire the import hook, which waits for us), then
    registered with transformers' Auto classes (`register()`) when `auto_module` is already
    imported (else the import hook registers it when it is)."""
    if state[key] is None:
        state["building"] = True
        try:
            state[key] = define()
        finally:
            state["building"] = False
        if auto_module in sys.modules:
            register()
    return state[key]


def base_config_class() -> type:
    """`MatFormerPreTrainedConfig`, the base of the per-family classes, defined on first use:
    it subclasses transformers' `PreTrainedConfig`, and importing this module must not import
    transformers (the layout contract imports every module; a user may never load transformers)."""
    return built_once(_state, "base", _define, _AUTO_CONFIG, register_configs)


def _define() -> type:
    from transformers import PreTrainedConfig

    base_defaults: dict[str, Any] = PreTrainedConfig().to_dict()
    # The keys every transformers config has, with their defaults (dropped when the family does
    # not know them and they are at the default: they are transformers', not the checkpoint's).
    return type("MatFormerPreTrainedConfig", (_Mixin, PreTrainedConfig), {
        "__module__": __name__, "__qualname__": "MatFormerPreTrainedConfig",
        "__doc__": _Mixin.__doc__, "model_type": "matformer_base",
        "transformers_base": PreTrainedConfig, "base_defaults": base_defaults})


class _Mixin:
    """Base of the per-family classes (`config_class(family)`): a config.json's keys as
    attributes, and the family's config made from them. (The methods of
    `MatFormerPreTrainedConfig`, which adds transformers' `PreTrainedConfig` as its base.)"""

    matformer_family: ClassVar[str] = ""
    """The `models.registry` family whose config this is."""
    transformers_base: ClassVar[Any]
    base_defaults: ClassVar[dict[str, Any]]

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
        d = dict(self.transformers_base.to_dict(self))
        fam_config = self.family().config_class
        assert fam_config is not None
        known = fam_config.KNOWN
        for k in list(d):
            if k in _TRANSFORMERS_ONLY or (k in self.base_defaults and k not in known
                                           and d[k] == self.base_defaults[k]):
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
        d["transformers_version"] = self.transformers_base.to_dict(self).get(
            "transformers_version")
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


_CLASSES: dict[str, type] = {}
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


def config_class(family: Family | str = "lm") -> type:
    """The transformers config class of a family (made on first use)."""
    fam = family if isinstance(family, Family) else next(
        (f for f in hf_families() if f.name == family), None)
    if fam is None or fam not in hf_families():
        raise ValueError(f"{family!r} is not a registered family with transformers classes; "
                         f"one of {', '.join(f.name for f in hf_families())}")
    base = base_config_class()  # first: making the base may register (and so make) this one
    if fam.name not in _CLASSES:
        assert fam.config_class is not None
        name = _class_name(fam)
        cls = type(name, (base,), {
            "__module__": __name__, "__qualname__": name,
            "__doc__": f"transformers config of matformer's {fam.name!r} family "
                       f"({fam.config_class.__name__}).",
            "model_type": fam.config_class.nested_model_type(),
            "matformer_family": fam.name})
        _CLASSES[fam.name] = cls  # importable by name (pickling): this module's __getattr__
    return _CLASSES[fam.name]


def register_configs() -> None:
    """`AutoConfig.register` every such family's per-layer `model_type` (what the import hook
    of `matformer.hf` calls once transformers' AutoConfig has loaded)."""
    if _state["building"]:
        return  # fired by our own import of transformers: base_config_class registers after
    from transformers import AutoConfig

    for fam in hf_families():
        cls = config_class(fam)
        AutoConfig.register(cls.model_type, cls, exist_ok=True)


def __getattr__(name: str) -> Any:
    """The classes by name, made on first use: `MatFormerPreTrainedConfig`, and each family's
    (`MatFormerHFConfig` for `lm`, `MatViTHFConfig` for `vit`, ...)."""
    if name == "MatFormerPreTrainedConfig":
        return base_config_class()
    for fam in hf_families():
        if _class_name(fam) == name:
            return config_class(fam)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
