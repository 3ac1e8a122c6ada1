"""Nothing lost, nothing mixed (issue 18): readers racing writers, saves into awkward places,
hostile metadata, special files. docs/RELIABILITY.md names the test that holds each promise."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from matformer import MatFormerConfig, MatFormerLM
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
from matformer.slicing import slice_checkpoint


def _model(value: float, **overrides) -> MatFormerLM:
    """A debug model whose every weight is `value`: which save a tensor came from is visible."""
    m = MatFormerLM(MatFormerConfig.from_preset("debug", **overrides))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _versions(sd: dict[str, torch.Tensor]) -> set[float]:
    return {float(v.float().unique()[0]) for v in sd.values() if v.numel()}


# ---- readers vs writers ----------------------------------------------------------------------


class _Writer(threading.Thread):
    """Saves two distinguishable versions (all 1.0 / all 2.0) over one folder until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.saves, self.error = path, 0, None
        self.models = [_model(1.0), _model(2.0)]
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                save_model(self.models[self.saves % 2], self.path, max_shard_size="100KB")
                self.saves += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


def _race(path: Path, read, seconds: float = 4.0, max_reads: int = 400) -> tuple[int, int, int]:
    save_model(_model(1.0), path, max_shard_size="100KB")
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
    save_model(_model(1.0), a, max_shard_size="100KB")
    save_model(_model(2.0), b, max_shard_size="100KB")
    shard = sorted(p.name for p in a.glob("model-*.safetensors"))[0]
    os.replace(b / shard, a / shard)
    with pytest.raises(CheckpointChanged, match="different saves"):
        load_state_dict(a)


def test_equal_weights_give_byte_identical_files(tmp_path):
    save_model(_model(1.0), tmp_path / "a", max_shard_size="100KB")
    save_model(_model(1.0), tmp_path / "b", max_shard_size="100KB")
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_a_load_keeps_reading_the_folder_it_opened(tmp_path):
    """The source opened before a save swapped the folder reads the old version whole."""
    ck = tmp_path / "ck"
    save_model(_model(1.0), ck, max_shard_size="100KB")
    source = resolve_source(ck)
    save_model(_model(2.0), ck, max_shard_size="100KB")  # the old folder is deleted after the swap
    with pytest.raises(CheckpointChanged, match="read it again"):
        load_state_dict(source)  # a Source is not re-resolved: a clear error, never a mix
    assert _versions(load_state_dict(ck)) == {2.0}


# ---- where a save writes ---------------------------------------------------------------------


def test_save_writes_through_a_symlink(tmp_path):
    real, link = tmp_path / "real", tmp_path / "latest"
    real.mkdir()
    link.symlink_to(real)
    save_model(_model(1.0), link)
    save_model(_model(2.0), link)
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
        save_model(_model(1.0), target)
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
    save_model(_model(1.0), ck, max_shard_size="100KB")
    save_model(_model(2.0), ck, max_shard_size="200KB")  # fewer shards: stale ones removed
    assert _versions(load_state_dict(ck)) == {2.0}
    assert (ck / "notes.txt").read_text() == "mine"
    assert not [p for p in ck.iterdir() if p.name.startswith(".")]
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(
        p.name for p in ck.glob("model-*.safetensors"))


def test_a_swap_failing_with_ebusy_falls_back_to_per_file(tmp_path, monkeypatch):
    from matformer.io import swap

    ck = tmp_path / "ck"
    save_model(_model(1.0), ck)

    def busy(a, b):
        raise swap._NoSwap("Device or resource busy")

    monkeypatch.setattr(swap, "_exchange", busy)
    save_model(_model(2.0), ck)
    assert _versions(load_state_dict(ck)) == {2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_files_created_during_a_save_are_kept(tmp_path, monkeypatch):
    from matformer.io import swap

    ck = tmp_path / "ck"
    save_model(_model(1.0), ck, extra_files={"log.txt": b"v1"})
    (ck / "notes.txt").write_text("before")
    real = swap._exchange

    def late_writer(a, b):  # another process writes into the folder just before the swap
        (b / "late.txt").write_text("written during the save")
        (b / "notes.txt.new").write_text("after")
        os.replace(b / "notes.txt.new", b / "notes.txt")
        return real(a, b)

    monkeypatch.setattr(swap, "_exchange", late_writer)
    save_model(_model(2.0), ck, extra_files={"log.txt": b"v2"})
    assert (ck / "late.txt").read_text() == "written during the save"
    assert (ck / "notes.txt").read_text() == "after"
    assert (ck / "log.txt").read_bytes() == b"v2"
    assert _versions(load_state_dict(ck)) == {2.0}


def test_concurrent_saves_into_one_folder_all_complete(tmp_path):
    ck, errors = tmp_path / "ck", []

    def save(v: float) -> None:
        try:
            for _ in range(3):
                save_model(_model(v), ck, max_shard_size="100KB")
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
        save_model(_model(1.0), tmp_path / "ck", extra_files={name: b"{}"})
    assert not (tmp_path / "ck").exists()


# ---- hostile metadata --------------------------------------------------------------------------


def _edit_config(folder: Path, **changes) -> None:
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def test_a_config_claiming_millions_of_layers_is_refused_before_allocating(tmp_path):
    ck = tmp_path / "ck"
    save_model(_model(1.0), ck)
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
    save_model(_model(1.0), ck)
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
    m = _model(1.0)
    cfg = m.config
    sd = {k: v.to(torch.int32) if k.endswith("norm.weight") else v for k, v in m.state_dict().items()}
    specs = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in sd.items()]
    write_checkpoint(ck, cfg, specs, sd.__getitem__)
    with pytest.raises(CheckpointError, match="I32"):
        load_model(ck)


@pytest.mark.parametrize("what", ["config.json", "model.safetensors.index.json", "manifest"])
def test_deeply_nested_json_is_a_one_line_error(tmp_path, what):
    ck = tmp_path / "ck"
    save_model(_model(1.0), ck, max_shard_size="100KB")
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
    save_model(_model(1.0), ck)
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
    save_model(_model(1.0), tmp_path / "full")
    slice_checkpoint(tmp_path / "full", tmp_path / "repo", tiers=[1, 2])
    return tmp_path / "repo"


def test_files_dropped_into_a_tier_folder_are_not_loaded(tmp_path):
    repo = _repo(tmp_path)
    save_model(_model(2.0), tmp_path / "other", max_shard_size="100KB")
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
    save_model(_model(1.0), ck)
    for t in (64, 5000, 10**6):
        with pytest.raises(MatFormerError) as e:
            load_model(ck, tier=t)
        assert len(str(e.value)) < 400


def test_header_and_map_come_from_one_file(tmp_path):
    """A file replaced between reading its header and mapping it is caught (identity check)."""
    from matformer.io.safetensors import mmap_tensors, read_header

    ck = tmp_path / "ck"
    save_model(_model(1.0), ck)
    h = read_header(ck / "model.safetensors")
    save_model(_model(2.0), ck)
    with pytest.raises(CheckpointChanged):
        mmap_tensors(h)
    assert struct.unpack("<Q", (ck / "model.safetensors").read_bytes()[:8])[0] == h.header_len
