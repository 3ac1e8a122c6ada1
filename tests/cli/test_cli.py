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
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("verb", ["info", "generate", "eval", "slice"])
def test_every_checkpoint_verb_takes_tier_and_revision(verb: str) -> None:
    """Each verb reading a checkpoint accepts every kind of SRC the same way (io.source): a Hub
    revision, and --tier to pick a multi-tier repo's folder (slice: the output tier, whose
    folder is then the source's)."""
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[verb]  # type: ignore[union-attr]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {"--tier", "--revision"} <= flags, flags


WIDTH_ARGS = {"generate": ["CKPT"], "eval": ["CKPT"], "slice": ["SRC", "-o", "OUT"],
              "export": ["SRC", "-o", "OUT.gguf"]}


@pytest.mark.parametrize("verb", sorted(WIDTH_ARGS))
def test_every_width_verb_takes_the_five_width_flags(verb: str) -> None:
    """One flag generator: --tier, --layer-tiers, --widths, --kv-heads, --layer-kv-heads on every
    verb that takes a width, read back as one WidthRequest."""
    from matformer.cli.flags import width_request
    from matformer.tiers import WidthRequest

    parser = build_parser()
    pos = WIDTH_ARGS[verb]
    args = parser.parse_args([verb, *pos, "--layer-tiers", "2,1", "--kv-heads", "1"])
    assert width_request(args) == WidthRequest(layer_tiers=[2, 1], kv_heads=1)
    args = parser.parse_args([verb, *pos, "--widths", "64", "--layer-kv-heads", "2,1"])
    assert width_request(args) == WidthRequest(widths=64, layer_kv_heads=[2, 1])
    args = parser.parse_args([verb, *pos, "--tier", "3"])
    assert width_request(args) == WidthRequest(tier=3)
    assert width_request(parser.parse_args([verb, *pos])) == WidthRequest()


@pytest.mark.parametrize("verb", ["generate", "slice", "export"])
def test_width_flags_of_one_axis_exclude_each_other(verb: str, capsys) -> None:
    parser = build_parser()
    for extra in (["--tier", "1", "--widths", "8"], ["--kv-heads", "1", "--layer-kv-heads", "1"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([verb, *WIDTH_ARGS[verb], *extra])
        assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_generate_has_the_draft_width_flags_and_draft_tier_auto() -> None:
    from matformer.cli.flags import width_request
    from matformer.tiers import WidthRequest

    parser = build_parser()
    args = parser.parse_args(["generate", "CKPT", "--draft-layer-tiers", "3,2",
                              "--draft-kv-heads", "1", "--layer-tiers", "1,0"])
    assert width_request(args, "draft-") == WidthRequest(layer_tiers=[3, 2], kv_heads=1)
    assert width_request(args) == WidthRequest(layer_tiers=[1, 0])
    args = parser.parse_args(["generate", "CKPT", "--draft-tier", "auto"])
    assert args.draft_tier == "auto" and width_request(args, "draft-") == WidthRequest()
    assert width_request(parser.parse_args(["generate", "CKPT", "--draft-tier", "2"]),
                         "draft-") == WidthRequest(tier=2)
    for flag in ("--draft-widths", "--draft-layer-kv-heads"):
        assert parser.parse_args(["generate", "CKPT", flag, "4,4"]) is not None


def test_eval_sets_have_their_own_flags_and_kv_heads_keeps_its_old_list() -> None:
    """eval: --kv-heads G is one count like on every verb; --kv-heads-list is the set, and the
    old spelling --kv-heads G1,G2 still means the set; --widths and --layer-kv-heads repeat."""
    from matformer.cli.eval import head_counts
    from matformer.cli.flags import width_request
    from matformer.errors import ConfigError
    from matformer.tiers import WidthRequest

    parser = build_parser()
    args = parser.parse_args(["eval", "CKPT", "--kv-heads", "2"])
    assert head_counts(args) == [2] and width_request(args) == WidthRequest(kv_heads=2)
    assert head_counts(parser.parse_args(["eval", "CKPT", "--kv-heads-list", "1,2,4"])) == [1, 2, 4]
    old = parser.parse_args(["eval", "CKPT", "--kv-heads", "2,1"])
    assert head_counts(old) == [2, 1]
    with pytest.raises(ConfigError, match="one head count"):
        width_request(old)
    assert head_counts(parser.parse_args(["eval", "CKPT"])) is None
    two = parser.parse_args(["eval", "CKPT", "--widths", "8,8", "--widths", "16,16",
                             "--tiers", "0,1", "--tier", "1"])
    assert two.widths == ["8,8", "16,16"] and two.tiers == "0,1" and two.tier == 1
    with pytest.raises(ConfigError, match="given 2 times"):
        width_request(two)
