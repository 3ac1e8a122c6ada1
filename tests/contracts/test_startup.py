"""The start-up contract of `import matformer` with transformers (matformer.hf).

- `import matformer` imports neither torch nor transformers (the CLI's `--help` / `info` stay
  cheap; tests/cli/test_cli.py checks the CLI itself), yet transformers' Auto classes know
  matformer's checkpoints once transformers loads: the config classes when `AutoConfig` is
  loaded, the model classes only when `AutoModelForCausalLM` is.
- Without matformer, transformers refuses a Mix'n'Match config ("does not recognize this
  architecture") instead of building every layer at one width; importing matformer after
  transformers registers at once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from matformer.models.lm.config import MatFormerConfig

_BARE = """
import sys
import matformer, matformer.hf
bad = [m for m in ("torch", "transformers") if m in sys.modules]
assert not bad, bad
"""

_ORDERS = """
import sys
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained(sys.argv[1])
    print("LOADED WITHOUT MATFORMER")
except ValueError as e:
    print("STOCK", str(e).splitlines()[0])
import matformer  # after transformers: the config classes register at once
print("CONFIG", type(AutoConfig.from_pretrained(sys.argv[1])).__name__,
      "matformer.hf.model" in sys.modules)
from transformers import AutoModelForCausalLM  # loads modeling_auto: the model classes register
print("MODEL", type(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))).__name__)
"""


def test_import_matformer_imports_neither_torch_nor_transformers() -> None:
    subprocess.run([sys.executable, "-c", _BARE], check=True, capture_output=True, timeout=120)


def test_auto_classes_know_matformer_only_with_it(tmp_path: Path) -> None:
    cfg = MatFormerConfig.from_preset("debug").with_widths([256, 64])
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    out = subprocess.run([sys.executable, "-c", _ORDERS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, check=True).stdout.splitlines()
    assert out[0].startswith("STOCK") and "model type `matformer`" in out[0]
    assert "does not recognize this architecture" in out[0]
    assert out[1] == "CONFIG MatFormerHFConfig False"  # no model classes (torch) for a config
    assert out[2] == "MODEL MatFormerForCausalLM"
