"""Nothing lost, nothing mixed (issue 18): readers racing writers, saves into awkward places,
hostile metadata, special files. docs/RELIABILITY.md names the test that holds each promise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from matformer.errors import CheckpointChanged, CheckpointError, ConfigError, MatFormerError
from matformer.io.checkpoint import (
    checkpoint_info,
    load_model,
    load_state_dict,
    save_model,
    write_checkpoint,
)
from matformer.io.safetensors import st_dtype
from matformer.io.source import resolve_source
from matformer.io.swap import REPLACE, check_save_target, save_target
from matformer.slicing.extract import slice_checkpoint
from tests.conftest import tiny_lm


def _versions(sd: dict[str, torch.Tensor]) -> set[float]:
    return {float(v.float().unique()[0]) for v in sd.values() if v.numel()}


# ---- readers vs writers ----------------------------------------------------------------------


class _Writer(threading.Thread):
    """Saves two distinguishable versions (all 1.0 / all 2.0) over one folder until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.saves, self.error = path, 0, None
        self.models = [tiny_lm(None, fill=1.0), tiny_lm(None, fill=2.0)]
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                save_model(self.models[self.saves % 2], self.path, max_shard_size="100KB")
                self.saves += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _race(path: Path, read, seconds: float = 4.0, max_reads: int = 400) -> tuple[int, int, int]:
    save_model(tiny_lm(None, fill=1.0), path, max_shard_size="100KB")
    writer = _Writer(path)
    writer.start()
    whole = changed = reads = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and reads < max_reads:
            reads += 1
            try:
                versions = read()
            except CheckpointChanged:
                changed += 1
                continue
            assert len(versions) == 1, f"a load mixed two saves: {versions}"
            whole += 1
    finally:
        writer.stop.set()
        writer.join(60)
    assert writer.error is None, writer.error
    assert writer.saves >= 3, "the writer did not get to replace the checkpoint while reading"
    return whole, changed, writer.saves


def test_loads_racing_saves_see_one_version_or_a_clear_error(tmp_path):
    ck = tmp_path / "ck"
    whole, changed, saves = _race(ck, lambda: _versions(load_state_dict(ck)))
    print(f"load_state_dict: {whole} whole loads, {changed} CheckpointChanged, {saves} saves")
    assert whole > 0
    # load_model goes through the same path; and info never mixes headers of two saves.
    whole2, _, _ = _race(tmp_path / "ck2", lambda: _versions(dict(load_model(tmp_path / "ck2")
                                                                  .state_dict())), seconds=2.0)
    assert whole2 > 0


def test_slicing_a_source_being_replaced_writes_one_version(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"

    def read() -> set[float]:
        slice_checkpoint(src, out, tier=1, max_shard_size="100KB")
        return _versions(load_state_dict(out))

    whole, _, _ = _race(src, read, seconds=4.0, max_reads=60)
    assert whole > 0


def test_a_load_refuses_shards_of_two_saves(tmp_path):
    """Shards copied together from two saves (or a per-file replacement caught half-way): the
    save ids differ, the load says so instead of mixing."""
    a, b = tmp_path / "a", tmp_path / "b"
    save_model(tiny_lm(None, fill=1.0), a, max_shard_size="100KB")
    save_model(tiny_lm(None, fill=2.0), b, max_shard_size="100KB")
    shard = sorted(p.name for p in a.glob("model-*.safetensors"))[0]
    os.replace(b / shard, a / shard)
    with pytest.raises(CheckpointChanged, match="different saves"):
        load_state_dict(a)


def test_equal_weights_give_byte_identical_files(tmp_path):
    save_model(tiny_lm(None, fill=1.0), tmp_path / "a", max_shard_size="100KB")
    save_model(tiny_lm(None, fill=1.0), tmp_path / "b", max_shard_size="100KB")
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_a_load_keeps_reading_the_folder_it_opened(tmp_path):
    """The source opened before a save swapped the folder reads the old version whole."""
    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck, max_shard_size="100KB")
    source = resolve_source(ck)
    save_model(tiny_lm(None, fill=2.0), ck, max_shard_size="100KB")  # the old folder is deleted after the swap
    with pytest.raises(CheckpointChanged, match="read it again"):
        load_state_dict(source)  # a Source is not re-resolved: a clear error, never a mix
    assert _versions(load_state_dict(ck)) == {2.0}


# ---- where a save writes ---------------------------------------------------------------------


def test_save_writes_through_a_symlink(tmp_path):
    real, link = tmp_path / "real", tmp_path / "latest"
    real.mkdir()
    link.symlink_to(real)
    save_model(tiny_lm(None, fill=1.0), link)
    save_model(tiny_lm(None, fill=2.0), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _versions(load_state_dict(real)) == {2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "real"]  # nothing stray


@pytest.mark.parametrize("where", ["cwd", "parent"])
def test_save_into_the_working_folder_or_its_parent_is_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    target = "." if where == "cwd" else ".."
    with pytest.raises(CheckpointError, match="working folder"):
        save_model(tiny_lm(None, fill=1.0), target)
    with pytest.raises(CheckpointError, match="working folder"):
        check_save_target(target)
    assert (work / "notes.txt").read_text() == "keep me" and Path.cwd() == work


def test_folders_that_cannot_be_swapped_get_per_file_replacement(tmp_path, monkeypatch):
    """A mount point (a container volume) cannot be renamed: detected before writing, the save
    replaces file by file, a reader sees one version or CheckpointChanged."""
    from matformer.io import swap

    ck = tmp_path / "vol"
    ck.mkdir()
    (ck / "notes.txt").write_text("mine")
    monkeypatch.setattr(swap, "is_mount_point", lambda p: Path(p) == ck)
    assert save_target(ck) == (ck, REPLACE) and check_save_target(ck) == REPLACE
    save_model(tiny_lm(None, fill=1.0), ck, max_shard_size="100KB")
    save_model(tiny_lm(None, fill=2.0), ck, max_shard_size="200KB")  # fewer shards: stale ones removed
    assert _versions(load_state_dict(ck)) == {2.0}
    assert (ck / "notes.txt").read_text() == "mine"
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in ck.glob("model-*.safetensors"))


def test_a_swap_failing_with_ebusy_falls_back_to_per_file(tmp_path, monkeypatch):
    from matformer.io import swap

    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)

    def busy(a, b):
        raise swap._NoSwap("Device or resource busy")

    monkeypatch.setattr(swap, "_exchange", busy)
    save_model(tiny_lm(None, fill=2.0), ck)
    assert _versions(load_state_dict(ck)) == {2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_files_created_during_a_save_are_kept(tmp_path, monkeypatch):
    from matformer.io import swap

    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck, extra_files={"log.txt": b"v1"})
    (ck / "notes.txt").write_text("before")
    real = swap._exchange

    def late_writer(a, b):  # another process writes into the folder just before the swap
        (b / "late.txt").write_text("written during the save")
        (b / "notes.txt.new").write_text("after")
        os.replace(b / "notes.txt.new", b / "notes.txt")
        return real(a, b)

    monkeypatch.setattr(swap, "_exchange", late_writer)
    save_model(tiny_lm(None, fill=2.0), ck, extra_files={"log.txt": b"v2"})
    assert (ck / "late.txt").read_text() == "written during the save"
    assert (ck / "notes.txt").read_text() == "after"
    assert (ck / "log.txt").read_bytes() == b"v2"
    assert _versions(load_state_dict(ck)) == {2.0}


def test_concurrent_saves_into_one_folder_all_complete(tmp_path):
    ck, errors = tmp_path / "ck", []

    def save(v: float) -> None:
        try:
            for _ in range(3):
                save_model(tiny_lm(None, fill=v), ck, max_shard_size="100KB")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(_versions(load_state_dict(ck))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json",
                                  "model.safetensors", "model-00001-of-00002.safetensors",
                                  "matformer_manifest.json", ".matformer-x"])
def test_reserved_extra_file_names_are_refused(tmp_path, name):
    with pytest.raises(CheckpointError, match="reserved"):
        save_model(tiny_lm(None, fill=1.0), tmp_path / "ck", extra_files={name: b"{}"})
    assert not (tmp_path / "ck").exists()


# ---- hostile metadata --------------------------------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def test_a_config_claiming_millions_of_layers_is_refused_before_allocating(tmp_path):
    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)
    _edit_config(ck, num_hidden_layers=20_000_000)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        checkpoint_info(ck)
    _edit_config(ck, num_hidden_layers=3)
    with pytest.raises(CheckpointError, match="num_hidden_layers=3 but the weights hold 2 layers"):
        checkpoint_info(ck)


@pytest.mark.parametrize("key,value", [
    ("tie_word_embeddings", "false"), ("rms_norm_eps", float("inf")), ("rms_norm_eps", 0),
    ("eos_token_id", "abc"), ("eos_token_id", [2, "x"]), ("bos_token_id", True),
    ("rope_theta", -1), ("hidden_size", 10**40), ("vocab_size", 2**200),
    ("initializer_range", "0.02"), ("torch_dtype", ["x" * 1000]),
])
def test_wrong_typed_config_values_are_refused(tmp_path, key, value):
    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)
    d = json.loads((ck / "config.json").read_text())
    d[key] = value
    if key == "torch_dtype":
        d.pop("dtype", None)
    (ck / "config.json").write_text(json.dumps(d, allow_nan=True))
    with pytest.raises(ConfigError, match=f"{key}|Infinity is not a JSON number") as e:
        load_model(ck)
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_integer_weights_are_not_cast_into_a_float_model(tmp_path):
    ck = tmp_path / "ck"
    m = tiny_lm(None, fill=1.0)
    cfg = m.config
    sd = {k: v.to(torch.int32) if k.endswith("norm.weight") else v for k, v in m.state_dict().items()}
    specs = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in sd.items()]
    write_checkpoint(ck, cfg, specs, sd.__getitem__)
    with pytest.raises(CheckpointError, match="I32"):
        load_model(ck)


@pytest.mark.parametrize("what", ["config.json", "model.safetensors.index.json", "manifest"])
def test_deeply_nested_json_is_a_one_line_error(tmp_path, what):
    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck, max_shard_size="100KB")
    deep = "[" * 200_000 + "]" * 200_000
    if what == "manifest":
        (ck / "config.json").unlink()
        (ck / "matformer_manifest.json").write_text(deep)
    else:
        (ck / what).write_text(deep)
    with pytest.raises(MatFormerError, match="nested too deeply|not valid JSON") as e:
        checkpoint_info(ck, tier=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("what", ["config.json", "model.safetensors"])
def test_fifos_and_devices_in_a_checkpoint_are_refused_without_blocking(tmp_path, what):
    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)
    (ck / what).unlink()
    os.mkfifo(ck / what)
    with pytest.raises(MatFormerError, match="FIFO"):
        load_model(ck)
    (ck / what).unlink()
    (ck / what).symlink_to("/dev/zero")
    with pytest.raises(MatFormerError, match="device"):
        load_model(ck)


def test_a_missing_local_path_shaped_like_a_repo_id_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    t0 = time.monotonic()
    for spec in ("runs/missing", "./org/name", "../x/y"):
        with pytest.raises(CheckpointError, match="no such file or folder"):
            resolve_source(spec)
    assert time.monotonic() - t0 < 2


# ---- the multi-tier manifest -------------------------------------------------------------------


def _repo(tmp_path: Path) -> Path:
    save_model(tiny_lm(None, fill=1.0), tmp_path / "full")
    slice_checkpoint(tmp_path / "full", tmp_path / "repo", tiers=[1, 2])
    return tmp_path / "repo"


def test_files_dropped_into_a_tier_folder_are_not_loaded(tmp_path):
    repo = _repo(tmp_path)
    save_model(tiny_lm(None, fill=2.0), tmp_path / "other", max_shard_size="100KB")
    for p in (tmp_path / "other").glob("model*"):
        os.link(p, repo / "tier-1" / p.name)
    with pytest.raises(CheckpointError, match="does not list"):
        load_model(repo, tier=1)
    assert _versions(load_state_dict(repo, tier=2)) == {1.0}


def _manifest(repo: Path) -> dict:
    return json.loads((repo / "matformer_manifest.json").read_text())


def test_a_tier_listing_only_its_config_is_refused(tmp_path):
    repo = _repo(tmp_path)
    m = _manifest(repo)
    m["tiers"]["1"]["files"] = [f for f in m["tiers"]["1"]["files"] if f["path"].endswith("config.json")]
    (repo / "matformer_manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="names no .safetensors"):
        load_model(repo, tier=1)


@pytest.mark.parametrize("key", ["\u0661", "\u00b2", "1" * 5000, "-1", " 1"])
def test_odd_tier_keys_in_a_manifest_are_refused(tmp_path, key):
    repo = _repo(tmp_path)
    m = _manifest(repo)
    m["tiers"][key] = m["tiers"].pop("1")
    (repo / "matformer_manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="tier keys"):
        load_model(repo, tier=2)


def test_huge_tier_numbers_are_one_line_errors(tmp_path):
    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)
    for t in (64, 5000, 10**6):
        with pytest.raises(MatFormerError) as e:
            load_model(ck, tier=t)
        assert len(str(e.value)) < 400


def test_header_and_tensors_come_from_one_file(tmp_path):
    """Tensors are read from the descriptor their header was validated from: a save that replaces
    the file between reading the header and reading a tensor still gives the first file's bytes
    (never a header of one file with the data of another)."""
    from matformer.io.layout import open_checkpoint
    from matformer.io.tensors import ReadJob, TensorReader

    ck = tmp_path / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)
    with open_checkpoint(resolve_source(ck).layout) as opened, TensorReader(opened) as reader:
        name = next(iter(opened.where))
        save_model(tiny_lm(None, fill=2.0), ck)
        got = reader.read(ReadJob(name))
    assert bool((got == 1.0).all())
    assert bool((load_state_dict(ck)[name] == 2.0).all())


# ---- divergence --------------------------------------------------------------------------------


def _train_cfg(tmp_path: Path, corpus: Path, **kw):
    from matformer.training import TrainConfig

    base = dict(out=str(tmp_path / "run"), data=str(corpus), preset="debug", steps=4,
                batch_size=4, seq_len=32, lr=1e-2, warmup_steps=0, vocab_size=300,
                eval_every=1000, save_every=2, keep_checkpoints=1, eval_windows=4, seed=0,
                cache_dir=str(tmp_path / "cache"), quiet=True, val_fraction=0.1)
    base.update(kw)
    return TrainConfig(**base)


def _finite_checkpoints(out: Path) -> list[bool]:
    from matformer.training.state import checkpoints

    return [all(bool(torch.isfinite(v).all()) for v in load_state_dict(p).values())
            for _, p in checkpoints(out)]


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path, corpus):
    """--lr 1e4 used to run to the end with exit 0 and rotate every finite checkpoint away."""
    from matformer.errors import TrainingDiverged
    from matformer.training import train

    cfg = _train_cfg(tmp_path, corpus, lr=1e4, steps=16)
    with pytest.raises(TrainingDiverged, match="diverged at step") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    kept = _finite_checkpoints(tmp_path / "run")
    assert kept and all(kept)  # rotation (keep 1) never traded a finite checkpoint for NaN
    assert not (tmp_path / "run" / "config.json").exists()  # no NaN final model


def test_skip_nonfinite_skips_the_update_and_saves_finite_weights(tmp_path, corpus, monkeypatch):
    """With --skip-nonfinite a step whose loss is NaN is skipped; the run finishes."""
    from matformer.training import divergence, train

    real, calls = divergence.guard, []

    def nan_at_step_2(run, step, per_tier, norm):
        calls.append(step)
        if step == 2:
            per_tier = per_tier.clone().fill_(float("nan"))
        return real(run, step, per_tier, norm)

    monkeypatch.setattr(divergence, "guard", nan_at_step_2)
    import matformer.training.step as step_module
    monkeypatch.setattr(step_module, "guard", nan_at_step_2, raising=False)
    cfg = _train_cfg(tmp_path, corpus, skip_nonfinite=True, steps=4)
    train(cfg)
    assert 2 in calls
    assert all(_finite_checkpoints(tmp_path / "run"))
    sd = load_state_dict(tmp_path / "run")
    assert all(bool(torch.isfinite(v).all()) for v in sd.values())


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"),
                                        ("--eps", "nan"), ("--tier-probs", "nan,0.5,0.25,0.25"),
                                        ("--granularity-probs", "nan,0.5,0.25,0.25"),
                                        ("--seed", str(10**20)), ("--weight-decay", "inf")])
def test_bad_training_numbers_are_one_line_errors(tmp_path, corpus, capsys, flag, value):
    from matformer.cli import main

    rc = main(["train", "--out", str(tmp_path / "run"), "--data", str(corpus), "--preset",
               "debug", "--steps", "2", "--quiet", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "error:" in err, err
    assert not (tmp_path / "run").exists()


def test_damaged_training_state_on_resume_is_a_one_line_error(tmp_path, corpus):
    from safetensors.torch import load_file, save_file

    from matformer.training import train
    from matformer.training.state import STATE_FILE, checkpoints

    cfg = _train_cfg(tmp_path, corpus, steps=2)
    train(cfg)
    (_, ck), = checkpoints(tmp_path / "run")
    good = (ck / STATE_FILE).read_bytes()
    tensors = load_file(ck / STATE_FILE)
    meta = json.loads(__import__("safetensors").safe_open(str(ck / STATE_FILE), "pt").metadata()[
        "matformer_training"])
    damages = [dict(meta, step="abc"), dict(meta, step=-3), dict(meta, data_position=[1]),
               dict(meta, history=[{"x": 1}])]
    for bad in damages:
        save_file(tensors, ck / STATE_FILE, metadata={"matformer_training": json.dumps(bad)})
        with pytest.raises(CheckpointError, match="training state") as e:
            train(_train_cfg(tmp_path, corpus, steps=4, resume=True))
        assert "\n" not in str(e.value)
    no_rng = {k: v for k, v in tensors.items() if k != "rng.torch"}
    save_file(no_rng, ck / STATE_FILE, metadata={"matformer_training": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="training state"):
        train(_train_cfg(tmp_path, corpus, steps=4, resume=True))
    (ck / STATE_FILE).write_bytes(good)


def test_a_log_line_with_infinity_does_not_break_a_resume(tmp_path):
    from matformer.training.report import LOG_FILE, Reporter

    (tmp_path / LOG_FILE).write_text('{"step": 1}\n{"step": Infinity}\n{"step": NaN}\n{"step": 9}\n')
    Reporter(tmp_path, True, True).start(5)
    assert (tmp_path / LOG_FILE).read_text() == '{"step": 1}\n'


def test_data_that_is_a_fifo_or_a_device_is_refused(tmp_path):
    from matformer.data.text import load_texts
    from matformer.errors import DataError

    os.mkfifo(tmp_path / "pipe.txt")
    for p in (tmp_path / "pipe.txt", Path("/dev/zero")):
        with pytest.raises(DataError, match="not a regular file"):
            load_texts(p)


# ---- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    from matformer.training import train

    tmp = tmp_path_factory.mktemp("trained")
    train(_train_cfg(tmp, corpus, steps=2))
    return tmp / "run"



@pytest.mark.parametrize("args", [
    ["--temperature", "nan"], ["--temperature", "1e-45"], ["--temperature", "inf"],
    ["--seed", str(10**20)], ["--seed", "-1"], ["--device", "foo"], ["--threads", "-1"],
    ["--threads", "100000"],
    ["--tier", "5000"], ["--tier", str(10**30)], ["--widths", "999999999999"],
])
def test_bad_generate_arguments_are_one_line_errors(trained, run_cli, args):
    rc, _, err = run_cli("generate", str(trained), "--prompt", "def f", "--max-new-tokens",
                      "2", *args)
    assert rc == 2 and err.count("\n") == 1 and "error:" in err, err


def test_device_cuda_without_cuda_is_a_one_line_error(trained, run_cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run_cli("eval", str(trained), "--device", "cuda")
    assert rc == 2 and "CUDA is not available" in err


def test_non_utf8_prompts_are_one_line_errors(trained):
    import subprocess
    import sys

    code = "import sys; from matformer.cli import main; sys.exit(main(sys.argv[1:]))"
    base = [sys.executable, "-c", code, "generate", str(trained), "--max-new-tokens", "2"]
    r = subprocess.run(base, input=b"def \xff\xfe f", capture_output=True, timeout=120)
    assert r.returncode == 2 and b"not UTF-8" in r.stderr and r.stderr.count(b"\n") == 1, r.stderr
    r = subprocess.run([*base, "--prompt", os.fsdecode(b"def \xff")], capture_output=True,
                       timeout=120)
    assert r.returncode == 2 and b"not UTF-8" in r.stderr, r.stderr


def _nan_copy(trained: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(trained, dst)
    m = load_model(dst)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    save_model(m, dst)
    return dst


def test_nan_weights_warn_in_generate_and_eval_json_is_strict(trained, tmp_path, run_cli):
    ck = _nan_copy(trained, tmp_path / "nan")
    rc, _, err = run_cli("generate", str(ck), "--prompt", "def f", "--max-new-tokens", "2")
    assert rc == 0 and "non-finite weights" in err
    rc, out, err = run_cli("eval", str(ck), "--json", "--data", str(trained / "config.json"),
                        "--no-decode", "--no-speculative", "--no-mix", "--seq-len", "16")
    assert rc == 0 and "not finite" in err, err
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))


def test_eval_does_not_read_a_data_path_named_by_the_checkpoint(trained, tmp_path, run_cli,
                                                                monkeypatch):
    """A device named by a run's train_config.json is refused unread; a downloaded checkpoint
    (inside the Hub cache) does not choose a local path to read at all."""
    import shutil

    from huggingface_hub import constants

    cache = tmp_path / "hub"
    ck = cache / "models--acme--x" / "snapshots" / ("0" * 40)
    shutil.copytree(trained, ck)
    s = json.loads((ck / "train_config.json").read_text())
    s["data"] = str(Path(s["data"]))  # a real, readable local path
    (ck / "train_config.json").write_text(json.dumps(s))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for what, expected in ((ck, "do not choose local files"), (None, "not a regular file")):
        if what is None:  # the same checkpoint as a local run folder, naming a device
            ck = shutil.copytree(ck, tmp_path / "local")
            s["data"] = "/dev/zero"
            (ck / "train_config.json").write_text(json.dumps(s))
        rc, _, err = run_cli("eval", str(ck), "--no-decode", "--no-speculative", "--no-mix")
        errors = [line for line in err.splitlines() if "error:" in line]  # (progress lines too)
        assert rc == 2 and len(errors) == 1 and expected in errors[0], err


def test_two_concurrent_slices_into_one_folder_both_finish(trained, tmp_path):
    import subprocess
    import sys

    code = "import sys; from matformer.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", code, "slice", str(trained), "-o", str(out),
                               "--tier", str(t)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for t in (1, 2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    assert checkpoint_info(out)["matformer_tier"] in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- property-based fuzz: success or our one-line error, nothing else ---------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
_CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "rms_norm_eps", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id", "torch_dtype", "dtype", "matformer_base_intermediate_size",
                "matformer_tier", "rope_parameters", "rope_scaling", "initializer_range"]
_FUZZ = settings(max_examples=int(os.environ.get("MATFORMER_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_ck(tmp_path_factory) -> Path:
    ck = tmp_path_factory.mktemp("fuzz") / "ck"
    save_model(tiny_lm(None, fill=1.0), ck)
    return ck


@_FUZZ
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _JSON, min_size=1, max_size=3))
def test_fuzzed_config_values_load_or_fail_in_one_line(fuzz_ck, changes):
    good = (fuzz_ck / "config.json").read_text()
    try:
        d = json.loads(good)
        d.update(changes)
        (fuzz_ck / "config.json").write_text(json.dumps(d, allow_nan=True))
        for call in (lambda: checkpoint_info(fuzz_ck), lambda: load_model(fuzz_ck)):
            try:
                call()
            except MatFormerError as e:
                assert "\n" not in str(e) and len(str(e)) < 1000, str(e)
    finally:
        (fuzz_ck / "config.json").write_text(good)


_ARG_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e-45", "1e20", "", "abc", "0", "-1", "cuda", "cpu",
                     "cuda:7", "meta", "1,2", "0,0,0", "4,4"]))
_GENERATE_FLAGS = ["--temperature", "--top-k", "--top-p", "--seed", "--tier", "--widths",
                   "--max-new-tokens", "--device", "--threads", "--draft-tier", "--draft-tokens",
                   "--dtype", "--kv-heads"]


@_FUZZ
@given(args=st.lists(st.tuples(st.sampled_from(_GENERATE_FLAGS), _ARG_VALUES), min_size=1,
                     max_size=3))
def test_fuzzed_generate_arguments_succeed_or_fail_in_one_line(trained, run_cli, args):
    argv = [x for flag, v in args for x in (flag, v)]
    if "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "2"]
    n = dict(args).get("--max-new-tokens")
    if n is not None and n.lstrip("-").isdigit() and int(n) > 4:
        argv += ["--max-new-tokens", "4"]  # the last one wins: keep the example fast
    rc, _, err = run_cli("generate", str(trained), "--prompt", "def f", *argv)
    assert rc in (0, 2), err
    if rc == 2:
        assert "error:" in err.splitlines()[-1] and "Traceback" not in err, err


def test_disk_full_during_a_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """ENOSPC half-way through the shards: a one-line error, the old checkpoint whole, nothing
    temporary left behind (per-file mode too)."""
    import errno

    from matformer.io import checkpoint as C
    from matformer.io import swap

    real, calls = C.write_file, []

    def full(path, *args, **kw):
        calls.append(path)
        if len(calls) % 3 == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kw)

    for mode in ("swap", "replace"):
        ck = tmp_path / mode
        save_model(tiny_lm(None, fill=1.0), ck, max_shard_size="100KB")
        if mode == "replace":
            monkeypatch.setattr(swap, "is_mount_point", lambda p, ck=ck: Path(p) == ck)
        monkeypatch.setattr(C, "write_file", full)
        with pytest.raises(CheckpointError, match="No space left") as e:
            save_model(tiny_lm(None, fill=2.0), ck, max_shard_size="100KB")
        monkeypatch.setattr(C, "write_file", real)
        assert "\n" not in str(e.value)
        assert _versions(load_state_dict(ck)) == {1.0}
        assert not [p for p in ck.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replace", "swap"]


_TRUNCATE_UNDER_A_LOADED_MODEL = r"""
import os, sys, torch
from matformer import load_model
folder = sys.argv[1]
model = load_model(folder)
ids = torch.tensor([[1, 2, 3, 4]])
before = model(ids)
shard = os.path.join(folder, "model.safetensors")
os.truncate(shard, 64)  # a foreign tool rewriting the file in place
after = model(ids)
print(torch.equal(before, after))
"""


def test_a_shard_truncated_in_place_under_a_loaded_model_changes_nothing(tmp_path):
    """Weights are read into the process's own memory, not mapped: a foreign tool that truncates
    a shard in place cannot crash a running model with SIGBUS (a mapped page gone); it keeps
    computing the same logits. In a subprocess, so a regression shows as its signal."""
    save_model(tiny_lm(), tmp_path / "m")
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_UNDER_A_LOADED_MODEL,
                           str(tmp_path / "m")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.strip().splitlines()[-1] == "True"
