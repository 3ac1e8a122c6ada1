"""The start-up contract of `import matformer` with transformers (matformer.hf).

- `import matformer` imports neither torch nor transformers (the CLI's `--help` / `info` stay
  cheap; tests/cli/test_cli.py checks the CLI itself), yet transformers' Auto classes learn
  matformer's checkpoints once transformers loads: `matformer.hf.install()` watches the import of
  transformers' Auto modules and imports matformer's registering modules right after them (the
  mechanism is checked here on stand-in modules, in this process; tests/hf runs the real
  registration). No matformer module imports transformers at module level (its classes are
  made on first use), so importing every module never loads it.
- Without matformer, transformers refuses a Mix'n'Match config ("does not recognize this
  architecture") instead of building every layer at one width; importing matformer after
  transformers registers at once (a fresh interpreter: config level, which needs no model
  classes).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import matformer.hf
from matformer.models.lm.config import MatFormerConfig

_BARE = """
import sys
import matformer, matformer.hf, matformer.hf.config
bad = [m for m in ("torch", "transformers") if m in sys.modules]
assert not bad, bad
"""

_STOCK = """
import sys
from transformers import AutoConfig
try:
    AutoConfig.from_pretrained(sys.argv[1])
    print("LOADED WITHOUT MATFORMER")
except ValueError as e:
    print("STOCK", str(e).splitlines()[0])
import matformer  # after transformers: the config classes register at once
print("CONFIG", type(AutoConfig.from_pretrained(sys.argv[1])).__name__)
"""


def test_import_matformer_imports_neither_torch_nor_transformers() -> None:
    subprocess.run([sys.executable, "-c", _BARE], check=True, capture_output=True, timeout=120)


def test_no_matformer_module_imports_transformers_at_import() -> None:
    # The classes subclassing transformers' are made on first use, inside functions: importing
    # any module (as the layout contract does with all of them) never loads transformers.
    package = Path(matformer.hf.__file__).parents[1]
    bad = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(package)}: {n}" for n in names
                    if n.split(".")[0] in ("transformers", "peft")]
    assert not bad, bad
    assert any("from transformers import" in p.read_text(encoding="utf-8")
               for p in (package / "hf").glob("*.py"))  # the reader would see one


def test_stock_transformers_refuses_a_mixnmatch_config_and_knows_it_after_import(
        tmp_path: Path) -> None:
    cfg = MatFormerConfig.from_preset("debug").with_widths([256, 64])
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    out = subprocess.run([sys.executable, "-c", _STOCK, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, check=True).stdout.splitlines()
    assert out[0].startswith("STOCK") and "model type `matformer`" in out[0]
    assert "does not recognize this architecture" in out[0]
    assert out[1] == "CONFIG MatFormerHFConfig"


@pytest.fixture
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A package `standin` with a watched module `auto` and the modules run after it: `then`
    (reads what `auto` defined, as the registration reads transformers' Auto classes) and
    `broken` (raises)."""
    pkg = tmp_path / "standin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "auto.py").write_text("REGISTRY = []\nLOADED = True\n")
    (pkg / "then.py").write_text(textwrap.dedent("""
        def register():
            import standin.auto
            assert standin.auto.LOADED  # the watched module ran to its end first
            standin.auto.REGISTRY.append("registered")
    """))
    (pkg / "broken.py").write_text("def register():\n    raise RuntimeError('an unsupported version')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n == "standin" or n.startswith("standin.")]:
        del sys.modules[name]


def test_registration_runs_right_after_the_watched_module_loads(stand_ins, monkeypatch) -> None:
    matformer.hf.install()
    monkeypatch.setitem(matformer.hf.WATCHED, "standin.auto", "standin.then:register")
    assert "standin.then" not in sys.modules
    auto = importlib.import_module("standin.auto")
    assert auto.REGISTRY == ["registered"]


def test_a_failing_registration_warns_and_the_watched_import_still_works(stand_ins,
                                                                        monkeypatch) -> None:
    matformer.hf.install()
    monkeypatch.setitem(matformer.hf.WATCHED, "standin.auto", "standin.broken:register")
    with pytest.warns(UserWarning, match="could not register its classes with transformers"):
        auto = importlib.import_module("standin.auto")
    assert auto.LOADED


def test_modules_loaded_before_install_are_registered_at_once(stand_ins, monkeypatch) -> None:
    importlib.import_module("standin.auto")
    monkeypatch.setitem(matformer.hf.WATCHED, "standin.auto", "standin.then:register")
    matformer.hf.install()
    assert sys.modules["standin.auto"].REGISTRY == ["registered"]
