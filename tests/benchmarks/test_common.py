"""benchmarks/common.py (the preamble every benchmark shares) and the package's import contract:
every script imports as a module from the repository root, without editing sys.path."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest

from benchmarks import common

BENCH = Path(common.__file__).resolve().parent
SCRIPTS = sorted(f"benchmarks.{p.parent.name}.{p.stem}" for p in BENCH.glob("*/*.py")
                 if p.stem not in ("__init__", "common"))


def test_results_folder_is_the_one_docs_cite() -> None:
    assert common.RESULTS == BENCH / "results" and (common.RESULTS / "decode.json").is_file()


def test_write_json_creates_parents_and_ends_with_a_newline(tmp_path) -> None:
    path = common.write_json(tmp_path / "a" / "b.json", {"x": 1, "p": Path("/q")})
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"x": 1, "p": "/q"}


def test_parser_takes_the_docstrings_first_line_or_all_of_it() -> None:
    doc = "One line.\n\n    python -m benchmarks.speed.x --quick\n"
    assert common.parser(doc).description == "One line."
    full = common.parser(doc, full_doc=True)
    assert full.description == doc and "--quick" in full.format_help()


def test_hardware_names_the_machine() -> None:
    hw = common.hardware("cpu")
    assert hw["nproc"] >= 1 and hw["torch"] and hw["cpu"] and "gpu" not in hw
    assert common.device_name("cpu")


def test_no_script_edits_sys_path() -> None:
    offenders = [str(p.relative_to(BENCH)) for p in BENCH.rglob("*.py")
                 if re.search(r"sys\.path\.(insert|append)|sys\.path\s*[+]?=", p.read_text())]
    assert not offenders


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_imports_as_a_module(name: str) -> None:
    mod = importlib.import_module(name)
    assert callable(getattr(mod, "main", None)), f"{name} has no main()"
