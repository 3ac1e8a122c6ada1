"""Every verb x every kind of SRC (issue 10): a checkpoint folder, a .safetensors file, a Hub
repo id (the loopback fake Hub, in-process), and a multi-tier repo (local and on the Hub) with
--tier. Each cell checks the verb's result against the same verb on the plain folder, so a
source kind that picked the wrong folder, tier or tokenizer shows up as a different number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matformer import CheckpointError, MatFormerConfig, MatFormerLM, TierError
from matformer.cli import main
from matformer.data.text import tokenizer_files, train_tokenizer
from matformer.io.checkpoint import load_model, load_state_dict, save_model
from matformer.io.source import resolve_source
from matformer.slicing.extract import slice_checkpoint
from tests.fake_hub import FakeHub

TEXT = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300))
KINDS = ("folder", "file", "hub", "multi", "hub-multi")
TIER = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A debug-preset checkpoint with its tokenizer, its multi-tier repo (tiers 1, 2), and a
    text file to evaluate on."""
    root = tmp_path_factory.mktemp("sources")
    tok = train_tokenizer([TEXT], 300)
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset("debug", vocab_size=tok.get_vocab_size())
    ck = root / "ck"
    save_model(MatFormerLM(cfg).eval(), ck, extra_files=tokenizer_files(tok, 256))
    slice_checkpoint(ck, root / "repo", tiers=[1, 2])
    (root / "text.txt").write_text(TEXT)
    return {"ck": ck, "repo": root / "repo", "text": root / "text.txt"}


@pytest.fixture(scope="module")
def hub(built):
    """The loopback fake Hub, with huggingface_hub pointed at it in this process."""
    from huggingface_hub import constants

    def files(folder: Path) -> dict[str, bytes]:
        return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    mp = pytest.MonkeyPatch()
    with FakeHub() as h:
        h.add_repo("acme/ck", files(built["ck"]))
        h.add_repo("acme/multi", files(built["repo"]))
        mp.setattr(constants, "ENDPOINT", h.url)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_CACHE", str(built["ck"].parent / "hf-cache"))
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_TOKEN_PATH", str(built["ck"].parent / "no-token"))
        mp.delenv("HF_TOKEN", raising=False)
        yield h
    mp.undo()


def src_of(kind: str, built: dict[str, Path]) -> list[str]:
    """SRC (and --tier) as a user types them for each kind."""
    return {
        "folder": [str(built["ck"])],
        "file": [str(built["ck"] / "model.safetensors")],
        "hub": ["acme/ck"],
        "multi": [str(built["repo"]), "--tier", str(TIER)],
        "hub-multi": ["acme/multi", "--tier", str(TIER)],
    }[kind]


@pytest.fixture(params=KINDS)
def kind(request, hub) -> str:
    return request.param


def test_resolve_source_kinds(built, kind) -> None:
    src = src_of(kind, built)[0]
    s = resolve_source(src, tier=TIER)
    assert s.kind == {"folder": "folder", "file": "file", "multi": "folder"}.get(kind, "hub")
    assert s.multi_tier == kind.endswith("multi")
    assert s.config.stored_tier == (TIER if s.multi_tier else 0)
    assert resolve_source(src, tier=TIER, companions=True).tokenizer_path is not None
    assert resolve_source(s) is s


def test_info(built, kind, capsys) -> None:
    assert main(["info", *src_of(kind, built), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    multi = kind.endswith("multi")
    assert info["matformer_tier"] == (TIER if multi else 0)
    assert info["manifest_tier"] == (TIER if multi else None)
    assert info["stored_widths"] == [256 >> TIER if multi else 256] * 2


def _generated(argv: list[str], capsys) -> str:
    assert main(["generate", *argv, "--prompt", "def f1", "--max-new-tokens", "6"]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr()
    assert f"tier {TIER}" in out.err  # the summary line names the width it ran at
    return out.out


def test_generate(built, kind, capsys) -> None:
    ref = _generated([str(built["ck"]), "--tier", str(TIER)], capsys)
    argv = src_of(kind, built)
    if "--tier" not in argv:
        argv = [*argv, "--tier", str(TIER)]
    assert _generated(argv, capsys) == ref


def _eval(argv: list[str], built, capsys) -> dict[int, float]:
    assert main(["eval", *argv, "--data", str(built["text"]), "--seq-len", "32",
                 "--max-tokens", "256", "--no-decode", "--no-speculative", "--no-mix",
                 "--json"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    return {r["tier"]: r["loss"] for r in report["results"]}


def test_eval(built, kind, capsys) -> None:
    ref = _eval([str(built["ck"]), "--tier", str(TIER)], built, capsys)
    assert set(ref) == {0, TIER}  # --tier: that tier and the stored reference
    argv = src_of(kind, built)
    if "--tier" not in argv:
        argv = [*argv, "--tier", str(TIER)]
    got = _eval(argv, built, capsys)
    assert got[TIER] == pytest.approx(ref[TIER], abs=1e-5)


def test_eval_tiers_of_a_multi_tier_repo_reads_the_tier_folder(built, hub, capsys) -> None:
    """`eval REPO --tiers 2` evaluates tier 2's stored checkpoint (no --tier needed); `--tiers
    1,2` the folder of the widest (tier 1), which runs tier 2 by runtime slicing."""
    ref = _eval([str(built["ck"]), "--tiers", "1,2"], built, capsys)
    for repo in (str(built["repo"]), "acme/multi"):
        assert main(["eval", repo, "--tiers", "2", "--data", str(built["text"]), "--seq-len",
                     "32", "--max-tokens", "256", "--no-decode", "--no-speculative", "--no-mix",
                     "--json"]) == 0, capsys.readouterr().err
        report = json.loads(capsys.readouterr().out)
        assert "tier-2" in report["source"]
        assert report["reference_widths"] == [64, 64]  # the stored tier-2 weights
        assert {r["tier"]: r["loss"] for r in report["results"]}[2] == pytest.approx(ref[2], abs=1e-5)
        both = _eval([repo, "--tiers", "1,2"], built, capsys)
        assert both == pytest.approx({t: ref[t] for t in (1, 2)}, abs=1e-5)


def test_slice(built, kind, tmp_path, capsys) -> None:
    argv = [a for a in src_of(kind, built) if a not in ("--tier", str(TIER))]
    assert main(["slice", *argv, "-o", str(tmp_path / "out"), "--tier", "3"]) == 0
    capsys.readouterr()
    ref = load_state_dict(built["repo"] / "tier-2")  # tier 3 = prefixes of tier 2's tensors
    got = load_state_dict(tmp_path / "out")
    for name, t in got.items():
        r = ref[name]
        r = r[:, : t.shape[1]] if "down_proj" in name else r[: t.shape[0]]
        assert torch.equal(t, r), name
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (built["ck"] / "tokenizer.json").read_bytes()


def test_load_model(built, kind) -> None:
    src = src_of(kind, built)[0]
    ref = load_model(built["ck"], tier=TIER)
    model = load_model(src, tier=TIER)
    assert model.widths == ref.widths == [256 >> TIER] * 2
    x = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max().item() <= 1e-6


def test_multi_tier_repo_loads_by_tier_describes_all_and_holds_the_tokenizer(built, hub, capsys) -> None:
    for src in (str(built["repo"]), "acme/multi"):
        with pytest.raises(TierError, match="pass tier="):
            resolve_source(src)
        assert main(["info", src]) == 0  # info describes the repo and every tier instead
        out = capsys.readouterr().out
        assert "multi-tier repo" in out and "| 1 | tier-1/ | 128 |" in out and "| 2 | tier-2/ | 64 |" in out
        assert main(["info", src, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["multi_tier"] and info["stored_tiers"] == [1, 2]
        assert [t["stored_widths"] for t in info["tiers"]] == [[128, 128], [64, 64]]
        assert main(["info", src, "--tier", "2", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["manifest_tier"] == 2
        s = resolve_source(src, tier=3)  # not stored: the narrowest tier folder holding it
        assert s.tier_entry is not None and s.tier_entry.folder == "tier-2"
        assert s.tokenizer_path == s.folder / "tokenizer.json"
        with pytest.raises(TierError, match="wider than all"):
            resolve_source(src, tier=0)


def test_not_a_source_is_one_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a folder or a .safetensors file"):
        resolve_source(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve_source(tmp_path / "missing" / "x")
    (tmp_path / "empty").mkdir()
    assert main(["info", str(tmp_path / "empty")]) == 2
    assert "no weights found" in capsys.readouterr().err


# ---- train --resume SRC ----------------------------------------------------------------------

TRAIN = ["--preset", "debug", "--save-every", "2", "--eval-every", "2", "--batch-size", "2",
         "--seq-len", "32", "--vocab-size", "300", "--eval-windows", "2", "--quiet"]


@pytest.fixture(scope="module")
def run(built, tmp_path_factory) -> Path:
    """A two-step training run (one checkpoint, at step 2) on the test text."""
    out = tmp_path_factory.mktemp("train") / "run"
    argv = ["train", *TRAIN, "--data", str(built["text"]), "--steps", "2", "--out", str(out),
            "--cache-dir", str(out.parent / "cache")]
    assert main(argv) == 0
    return out


def test_train_resume(built, run, hub, tmp_path, capsys) -> None:
    step = run / "checkpoints" / "step-0000002"
    hub.add_repo("acme/step2", {p.name: p.read_bytes() for p in step.iterdir() if p.is_file()})
    finals = {}
    for kind, src in (("folder", run), ("step folder", step), ("file", step / "model.safetensors"),
                      ("hub", "acme/step2")):
        out = tmp_path / kind.replace(" ", "-")
        argv = ["train", *TRAIN, "--data", str(built["text"]), "--steps", "3", "--out", str(out),
                "--cache-dir", str(run.parent / "cache"), "--resume", str(src)]
        assert main(argv) == 0, (kind, capsys.readouterr().err)
        finals[kind] = load_state_dict(out)
    ref = finals.pop("folder")
    for kind, sd in finals.items():  # the same step-3 model whichever way step 2 was named
        assert all(torch.equal(sd[k], ref[k]) for k in ref), kind
    assert main(["train", *TRAIN, "--steps", "3", "--out", str(tmp_path / "m"),
                 "--resume", str(built["repo"])]) == 2
    # A multi-tier repo holds models, not training state: one clear line.
    assert "no complete checkpoint to resume from" in capsys.readouterr().err
