"""The CLI's start-up contract: --help lists the verbs, and neither --help nor `info` imports
transformers (start-up matters)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from matformer.cli import VERBS, build_parser, main


def test_help_lists_every_verb_that_exists(capsys) -> None:
    parser = build_parser()
    offered = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert offered and offered <= set(VERBS)
    assert main([]) == 0
    out = capsys.readouterr().out
    for verb in offered:
        assert verb in out


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verb_has_help(verb: str, capsys) -> None:
    parser = build_parser()
    if verb not in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        pytest.skip(f"verb {verb} not built yet")
    with pytest.raises(SystemExit) as e:
        main([verb, "-h"])
    assert e.value.code == 0
    assert "usage: matformer " + verb in capsys.readouterr().out


def test_help_does_not_import_transformers_or_torch() -> None:
    code = (
        "import sys\n"
        "from matformer.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("verb", ["info", "generate", "eval", "slice"])
def test_every_checkpoint_verb_takes_tier_and_revision(verb: str) -> None:
    """Each verb reading a checkpoint accepts every kind of SRC the same way (io.source): a Hub
    revision, and --tier to pick a multi-tier repo's folder (slice: the output tier, whose
    folder is then the source's)."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[verb]  # type: ignore[union-attr]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {"--tier", "--revision"} <= flags, flags
