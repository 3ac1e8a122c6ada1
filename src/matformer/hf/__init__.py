"""matformer models as transformers-native classes: `AutoModelForCausalLM.from_pretrained(CKPT)`.

`import matformer` makes transformers' Auto classes know matformer's per-layer checkpoints
(`model_type` "matformer" and each family's `matformer_<type>`; no `trust_remote_code`), while
`import matformer` itself imports neither torch nor transformers (`matformer --help` and
`matformer info` stay cheap). Libraries that plug into transformers usually register at import
(flash-linear-attention's `fla.models`, hf_olmo: `AutoConfig.register` / `AutoModelForCausalLM
.register` at module level), which would cost every matformer import the seconds of importing
torch and transformers. Here the registration waits for transformers instead:

- `install()` (called by `matformer/__init__`) puts a finder on `sys.meta_path` that watches two
  transformers modules. When `transformers.models.auto.configuration_auto` has finished loading,
  `matformer.hf.config.register_configs()` runs (the config classes: AutoConfig, AutoTokenizer
  then read our config.json); when `transformers.models.auto.modeling_auto` has,
  `matformer.hf.model.register_models()` (the model classes: AutoModelForCausalLM, pipeline).
  Modules already loaded when matformer is imported are registered at once.
- The classes themselves are made on first use: importing `matformer.hf.config` or
  `matformer.hf.model` imports no transformers (the layout contract imports every module).
- A registration that fails (a transformers this code does not support) warns once and leaves
  transformers working; only matformer's classes are then missing.

What is registered: for every registered causal-LM family (`models.registry`), a
`PreTrainedConfig` and a `PreTrainedModel` + `GenerationMixin` (`model.py`), generic over the
registry, so a new family gets them from its registry entry; for MatViT, a config and an
`AutoModelForImageClassification` class. A uniform checkpoint keeps its own
`model_type` (`llama`): Auto classes build transformers' own class for it (equal logits); to run
one at another width, load it with the class of its family (`MatFormerForCausalLM.from_pretrained`,
then `set_widths` / `at_width`). See docs/DEPLOY.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

CONFIG_MODULE = "matformer.hf.config"
MODEL_MODULE = "matformer.hf.model"
WATCHED = {
    "transformers.models.auto.configuration_auto": f"{CONFIG_MODULE}:register_configs",
    "transformers.models.auto.modeling_auto": f"{MODEL_MODULE}:register_models",
}
"""transformers module -> 'module:function' of matformer called once it has loaded."""

# public name -> module of this package that defines it (imported on first use)
_EXPORTS = {
    "config_class": CONFIG_MODULE,
    "register_configs": CONFIG_MODULE,
    "model_class": MODEL_MODULE,
    "register_models": MODEL_MODULE,
    "MatFormerCache": MODEL_MODULE,
    "MatFormerHFConfig": CONFIG_MODULE,
    "MatFormerForCausalLM": MODEL_MODULE,
    "MatViTHFConfig": CONFIG_MODULE,
    "MatViTForImageClassification": MODEL_MODULE,
}


def _register(target: str) -> None:
    """Call `target` ('module:function', which registers classes); a failure warns, never
    raises into the import of transformers that triggered it."""
    module, _, function = target.partition(":")
    try:
        getattr(importlib.import_module(module), function)()
    except Exception as e:  # noqa: BLE001 - any failure here must not break transformers
        warnings.warn(f"matformer: could not register its classes with transformers ({e}); "
                      f"AutoModelForCausalLM will not know matformer checkpoints (matformer.hf "
                      f"is written for transformers>=5.25)", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the real loader of a watched module, then registers."""

    def __init__(self, loader: importlib.abc.Loader, then: str) -> None:
        self.loader = loader
        self.then = then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        # What the import system does once this returns, done first: the registering module
        # may reach the watched one as an attribute of its package.
        parent, _, child = module.__name__.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)
        _register(self.then)


_MARK = "matformer_hf_finder"
"""Attribute marking our finder, whichever copy of this module made it (a test that forgets
matformer's modules and imports them again must find the first one, not add a second)."""


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it asks the other finders and wraps the
    loader of the spec they return."""

    matformer_hf_finder = True

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        then = WATCHED.get(fullname)
        if then is None:
            return None
        for finder in sys.meta_path:
            if getattr(finder, _MARK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, then)
                return spec
        return None


def install() -> None:
    """Register matformer's classes with transformers when (or, if already so, now that)
    transformers' Auto modules are loaded; imports neither torch nor transformers itself."""
    if not any(getattr(f, _MARK, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for watched, then in WATCHED.items():
        if watched in sys.modules:
            _register(then)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'matformer.hf' has no attribute {name!r}")
