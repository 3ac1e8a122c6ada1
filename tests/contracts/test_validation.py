"""Issue 23: one validation layer for the metadata matformer reads, sizes checked before
allocation, tokenizer identity wherever tokens cross, and flags that are never silently dropped.
Each test names the case of the issue it pins (docs/RELIABILITY.md lists them)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer.data import images as I
from matformer.data import text as D
from matformer.data import token_files
from matformer.data.vocabulary import difference, fingerprint
from matformer.errors import CheckpointError, ConfigError, DataError, MatFormerError
from matformer.io.checkpoint import parse_size
from matformer.io.metadata import Fields
from matformer.models.memory import check_fits
from matformer.slicing.gemma3n.slicing_configs import parse_expression, read_slicing_config
from matformer.training import train
from matformer.training.settings import validate
from matformer.training.state import TrainingState
from tests.conftest import tiny_config


def _tree_hash(folder: Path) -> str:
    """Every file's path and bytes under `folder`: equal before and after = nothing touched."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """A plain and an --fsdp (sharded DCP state) run of 2 steps, a checkpoint at each step
    (about 6 s once per module; every resume, tokenizer and generate test reuses them)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("plain", "fsdp"):
        cfg = tiny_config(root / kind, corpus, steps=2, save_every=1, fsdp=kind == "fsdp")
        train(cfg)
        out[kind] = Path(cfg.out)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    """A prepare-data folder of the corpus with a 300-token BPE."""
    out = tmp_path_factory.mktemp("prep") / "tokens"
    token_files.prepare(corpus, out, vocab_size=300, val_fraction=0.1, progress=False)
    return out


# ---- training_state.json (single-file and sharded) ------------------------------------------


@pytest.mark.parametrize("change", [
    {"data_position": {"epoch": 0, "index": -5}}, {"world_size": 0}, {"step": -1},
    {"step": "3"}, {"step": True}, {"lr": "fast"}, {"tokens_seen": 1.5},
    {"data_position": [1, 2]}, {"history": [{"step": 1, "val_loss": {"0": "low"}}]},
    {"extra": 7},
])
def test_training_state_fields_checked(change):
    meta = {"step": 3, "data_position": {"epoch": 0, "index": 4}, "world_size": 1, "lr": 1e-3,
            "history": [{"step": 1, "val_loss": {"0": 2.5}}], **change}
    with pytest.raises(CheckpointError, match="ck/training_state.json") as e:
        TrainingState.from_meta(meta, "ck/training_state.json")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change", [
    '"data_position": {"epoch": 0, "index": -5',
    '"world_size": 0',
    '"lr": 1e999',
    '"step": -2',
])
def test_fsdp_resume_of_damaged_training_state_json_is_refused_untouched(runs, tmp_path, change):
    """`train --fsdp --resume` of a sharded state whose training_state.json was edited (index
    -5, world_size 0, ...) used to run and rewrite the checkpoint."""
    ck = tmp_path / "ck"
    shutil.copytree(runs["fsdp"] / "checkpoints" / "step-0000001", ck)
    meta_path = ck / "training_state.json"
    meta = json.loads(meta_path.read_text())
    key = change.split('"')[1]
    text = json.dumps({k: v for k, v in meta.items() if k != key})
    meta_path.write_text(text[:-1] + ", " + change + ("}}" if "{" in change else "}"))
    before = _tree_hash(ck)
    cfg = tiny_config(tmp_path / "new", Path(json.loads((ck / "train_config.json").read_text())
                                             ["data"]), steps=2, save_every=1, fsdp=True,
                      resume=str(ck))
    with pytest.raises((CheckpointError, DataError), match=key) as e:
        train(cfg)
    assert "not valid JSON" not in str(e.value)
    assert _tree_hash(ck) == before and not (tmp_path / "new" / "run" / "checkpoints").exists()


def test_saved_data_position_index_past_the_epoch_is_refused():
    s = D.WindowSampler(np.arange(1000) % 50, 10, 0)
    for bad in ({"epoch": 0, "index": -5}, {"epoch": 0, "index": 10**6}, {"epoch": "0", "index": 0}):
        with pytest.raises(DataError, match="data position"):
            s.load_state(bad)
    with pytest.raises(DataError, match="data position"):
        I.BatchSampler(10, 0).load_state({"epoch": 0, "index": 11})


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


@pytest.mark.parametrize("damage", ["metadata", "distcp", "other_model"])
def test_damaged_dcp_state_is_one_line_checkpoint_error(runs, tmp_path, corpus, damage):
    """DCP raises CheckpointException (a BaseException): a one-line CheckpointError now, the
    checkpoint left as it was."""
    ck = tmp_path / "ck"
    shutil.copytree(runs["fsdp"] / "checkpoints" / "step-0000001", ck)
    state = ck / "training_state"
    if damage == "metadata":
        _truncate(state / ".metadata")
    elif damage == "distcp":
        for p in state.glob("*.distcp"):
            _truncate(p)
    else:  # another model's sharded state (other hidden size) under this checkpoint's name
        other = tiny_config(tmp_path / "other", corpus, steps=1, save_every=1, fsdp=True,
                            hidden_size=96, num_heads=4, num_kv_heads=2)
        train(other)
        shutil.rmtree(state)
        shutil.copytree(Path(other.out) / "checkpoints" / "step-0000001" / "training_state", state)
    before = _tree_hash(ck)
    cfg = tiny_config(tmp_path / "new", corpus, steps=2, save_every=1, fsdp=True, resume=str(ck))
    with pytest.raises(CheckpointError, match="training_state") as e:
        train(cfg)
    assert "\n" not in str(e.value) and _tree_hash(ck) == before


# ---- tokens.json and token files ---------------------------------------------------------------


def _damaged_copy(prepared: Path, tmp_path: Path, **meta) -> Path:
    dst = tmp_path / "tok"
    shutil.copytree(prepared, dst)
    d = json.loads((dst / "tokens.json").read_text())
    d.update(meta)
    (dst / "tokens.json").write_text(json.dumps(d))
    return dst


@pytest.mark.parametrize("meta,match", [
    ({"dtype": "float16"}, "dtype"), ({"dtype": "int8"}, "dtype"), ({"dtype": ["uint16"]}, "dtype"),
    ({"train_tokens": "many"}, "train_tokens"), ({"train_tokens": -1}, "train_tokens"),
    ({"train_tokens": 10**30}, "train_tokens"), ({"val_tokens": 3}, "val.bin"),
    ({"vocab_size": 70000}, "dtype"), ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": 301}, "vocab_size"),
])
def test_tokens_json_checked(prepared, tmp_path, meta, match):
    """A float16 dtype over a uint16 file used to train on garbage; bad counts were tracebacks."""
    with pytest.raises(DataError, match=match) as e:
        token_files.load(_damaged_copy(prepared, tmp_path, **meta))
    assert "\n" not in str(e.value)


def test_token_ids_past_the_vocabulary_name_the_file_and_id(prepared, tmp_path):
    dst = _damaged_copy(prepared, tmp_path)
    ids = np.fromfile(dst / "train.bin", dtype=np.uint16)
    ids[7] = 5000
    ids.tofile(dst / "train.bin")
    with pytest.raises(DataError, match=r"train\.bin: token id 5000 is past the vocabulary of 300"):
        token_files.load(dst)


@pytest.mark.parametrize("files", [
    {"dataset_dict.json": [1, 2]}, {"dataset_dict.json": {"splits": []}},
    {"dataset_dict.json": {"splits": ["../x"]}}, {"dataset_dict.json": {"nosplits": 1}},
    {"state.json": [], "dataset_info.json": {}},
    {"state.json": {"_data_files": [{"filename": "../../etc/passwd"}]}, "dataset_info.json": {}},
    {"state.json": {"_data_files": [{"filename": "missing.arrow"}]}, "dataset_info.json": {}},
    {"state.json": {"_data_files": "x"}, "dataset_info.json": {}},
])
def test_malformed_datasets_folders_are_data_errors(tmp_path, files):
    for name, obj in files.items():
        (tmp_path / name).write_text(json.dumps(obj))
    with pytest.raises(DataError):
        token_files.source_files(tmp_path)


# ---- preprocessor_config.json ------------------------------------------------------------------


@pytest.mark.parametrize("std", ["NaN", "Infinity", "1e-40", "1e999", '"0.3"', "-0.5", "[]"])
def test_preprocessor_std_must_be_finite_and_sane(tmp_path, std):
    """image_std NaN/Infinity/1e-40 normalised every image to garbage (chance accuracy)."""
    raw = std if std.startswith("[") else f"[{std}]"
    (tmp_path / I.PREPROCESSOR_FILE).write_text(f'{{"image_mean": [0.5], "image_std": {raw}}}')
    with pytest.raises(DataError, match="preprocessor_config.json") as e:
        I.read_normalisation(tmp_path)
    assert "\n" not in str(e.value)


def test_preprocessor_lengths_must_agree(tmp_path):
    (tmp_path / I.PREPROCESSOR_FILE).write_text('{"image_mean": [0.5, 0.5], "image_std": [0.2]}')
    with pytest.raises(DataError, match="image_std"):
        I.read_normalisation(tmp_path)
    (tmp_path / I.PREPROCESSOR_FILE).write_text('{"image_mean": [0.5], "image_std": [0.2]}')
    assert I.read_normalisation(tmp_path) == I.Normalisation([0.5], [0.2])


def test_png_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    PIL = pytest.importorskip("PIL.Image")
    folder = tmp_path / "imgs"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            PIL.new("L", (8, 8), 30 * i).save(folder / cls / f"{i}.png")
    PIL.new("L", (64, 64)).save(folder / "a" / "bomb.png")
    for limit in (1000, 3000):  # 4096 pixels: over 2x the limit (error) / over the limit (warning)
        monkeypatch.setattr(PIL, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(DataError, match="bomb.png: refused as a decompression bomb"):
            I.load_images(str(folder), 8, 1)


# ---- Gemma 3n slicing-config CSV cells ---------------------------------------------------------


@pytest.mark.parametrize("text", ["5" * 5000, "(" * 2000 + "1" + ")" * 2000, "[2²]", "[٣]",
                                  "[" * 500 + "]" * 500, "1" + " " * 20000])
def test_hostile_csv_cells_are_config_errors(text):
    with pytest.raises(ConfigError) as e:
        parse_expression(text, "cfg.csv: 'E2B' column 'FFN Hidden Dims'")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


def test_hostile_layer_count_cell(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text('name,# Layers,FFN Hidden Dims,Layers Skipped\nx,²,"[1, 2]",\n'
                   'y,' + "9" * 5000 + ',"[1, 2]",\n', encoding="utf-8")
    for name in ("x", "y"):
        with pytest.raises(ConfigError, match="# Layers"):
            read_slicing_config(csv, name)


# ---- sizes before allocation --------------------------------------------------------------------


def test_vocab_size_bounds_before_any_text(tmp_path, corpus):
    """--vocab-size 10**8 aborted the process in a Rust panic (rc -6)."""
    with pytest.raises(ConfigError, match="vocab_size"):
        token_files.prepare(corpus, tmp_path / "t", vocab_size=10**8, progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(ConfigError, match="vocab_size"):
        validate(tiny_config(tmp_path, corpus, vocab_size=10**8))


@pytest.mark.parametrize("shape", [{"hidden_size": 10**9}, {"intermediate_size": 10**10}])
def test_model_too_large_for_memory_is_refused_before_allocation(tmp_path, corpus, shape):
    with pytest.raises(ConfigError, match=r"parameters need about .*nothing was allocated"):
        train(tiny_config(tmp_path, corpus, steps=1, **shape))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_check_fits_unit():
    check_fits(10, 4, "cpu", "small")
    with pytest.raises(ConfigError, match="huge"):
        check_fits(10**15, 16, "cpu", "huge")


@pytest.mark.parametrize("size", ["inf", "9" * 400 + "GB", 2**70, "nan", "-5GB"])
def test_max_shard_size_bounds(size):
    with pytest.raises(CheckpointError, match="max_shard_size"):
        parse_size(size)


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"samples": [4]}, {"seq_len": [16]},
                                {"max_shard_size": "inf"}, {"device": "foo"}, {"device": "1e3"}])
def test_convert_checks_its_numbers_before_reading_anything(tmp_path, kw):
    from matformer.slicing.convert import convert

    with pytest.raises((ConfigError, CheckpointError)):
        convert(tmp_path / "does-not-exist", tmp_path / "o", **kw)


def test_heldout_shape_rejects_lists():
    with pytest.raises(DataError, match="seq_len"):
        D.heldout_shape({"seq_len": [16]})
    assert D.heldout_shape({}) == (D.HELDOUT_SEQ_LEN, D.HELDOUT_WINDOWS)


def test_metadata_fields_unit():
    f = Fields({"a": 1, "b": True, "c": float("nan"), "d": [1.0, 2.0]}, "x.json")
    assert f.integer("a", lo=0) == 1 and f.numbers("d", length=2) == [1.0, 2.0]
    for call in (lambda: f.integer("b"), lambda: f.number("c"), lambda: f.integer("zz"),
                 lambda: f.numbers("d", length=3), lambda: f.choice("a", ("x",))):
        with pytest.raises(DataError, match="x.json"):
            call()


# ---- tokenizer identity --------------------------------------------------------------------------


def test_tokenizer_identity_is_by_content_not_bytes(prepared, tmp_path):
    """A transformers-saved tokenizer.json and our compact copy of the same tokenizer compare
    equal; another vocabulary does not."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    ours = D.load_tokenizer(prepared)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=ours, eos_token="</s>")
    fast.save_pretrained(tmp_path / "hf")
    theirs = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert difference(ours, theirs) is None and fingerprint(ours) == fingerprint(theirs)
    d = json.loads(ours.to_str())
    d["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in d["model"]["merges"]]
    assert difference(ours, Tokenizer.from_str(json.dumps(d))) is None  # "a b" vs ["a", "b"]
    other = D.train_tokenizer(["some other text entirely " * 50], 280)
    assert difference(ours, other) is not None


def test_init_from_with_data_of_another_tokenizer_is_refused(runs, prepared, tmp_path, corpus):
    cfg = tiny_config(tmp_path, corpus, steps=1, init_from=str(runs["plain"]), data=str(prepared))
    same = D.load_tokenizer(runs["plain"]).to_str() == D.load_tokenizer(prepared).to_str()
    assert not same  # the run trained its own 300-token BPE on a different split
    with pytest.raises(DataError, match="differs from .*tokenizer.json"):
        train(cfg)


def test_init_from_refuses_architecture_flags(runs, tmp_path, corpus):
    """`train --init-from CK --hidden-size 128` dropped the flag without a word."""
    cfg = tiny_config(tmp_path, corpus, init_from=str(runs["plain"]), hidden_size=128)
    with pytest.raises(ConfigError, match="--hidden-size: the architecture comes from --init-from"):
        validate(cfg)


def test_distill_teacher_tokenizer_must_match_and_exist(runs, tmp_path, corpus):
    from matformer.training.distill import Teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(runs["plain"], teacher, ignore=shutil.ignore_patterns("checkpoints"))
    student = Teacher(runs["plain"], "cpu").model
    other = D.train_tokenizer(["some other text entirely " * 50], 300).to_str()
    with pytest.raises(ConfigError, match="tokenizer differs"):
        Teacher(teacher, "cpu").check_student(student, other, 16)
    Teacher(teacher, "cpu").check_student(student, D.load_tokenizer(teacher).to_str(), 16)
    (teacher / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        Teacher(teacher, "cpu").check_student(student, other, 16)


def _vit_checkpoint(folder: Path) -> Path:
    from matformer import save_model
    from matformer.models.vit.config import MatViTConfig
    from matformer.models.vit.model import MatViT

    save_model(MatViT(MatViTConfig.from_preset("debug")), folder)
    return folder


def test_matvit_refused_by_convert_and_distill(tmp_path):
    from matformer.slicing.convert import convert
    from matformer.training.distill import Teacher

    vit = _vit_checkpoint(tmp_path / "vit")
    with pytest.raises(ConfigError, match="MatViTConfig"):
        convert(vit, tmp_path / "o")
    with pytest.raises(ConfigError, match="teacher must be a language model"):
        Teacher(vit, "cpu")


# ---- devices and sampling ------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["foo", "1e3", "cuda" if not torch.cuda.is_available() else "tpu",
                                    "meta"])
def test_train_device_flag_is_one_line_error(run_cli, tmp_path, corpus, device):
    rc, _, err = run_cli("train", "--data", str(corpus), "--out", str(tmp_path / "o"),
                   "--steps", "1", "--device", device, "--quiet")
    assert rc == 2 and "--device" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_sampling_from_non_finite_logits_does_what_greedy_does():
    from matformer.inference.decode import Sampler

    logits = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 5.0, 1.0]])
    s = Sampler(temperature=0.8, seed=0)
    got = s.pick(logits)
    assert got[0].item() == logits[0].argmax().item() and got[1].item() in (0, 1, 2)


def test_generate_with_nan_weights_and_temperature_warns_like_greedy(runs, tmp_path, run_cli):
    from matformer import load_model, save_model

    ck = tmp_path / "nan"
    shutil.copytree(runs["plain"], ck, ignore=shutil.ignore_patterns("checkpoints"))
    m = load_model(ck)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    save_model(m, ck)
    for t in ("0", "0.8"):
        rc, _, err = run_cli("generate", str(ck), "--prompt", "def f", "--max-new-tokens", "2",
                       "--temperature", t)
        assert rc == 0 and "non-finite weights" in err and "Traceback" not in err


def test_every_new_error_is_a_matformer_error():
    assert issubclass(CheckpointError, MatFormerError) and dataclasses.is_dataclass(TrainingState)


def test_gemma3n_huge_tier_is_refused_before_allocating(tmp_path):
    """`slice --tier 10**12` of a Gemma 3n computed `1 << 10**12` (a 125 GB integer). About 5 s:
    it builds and saves a tiny transformers Gemma 3n, the only source slice_gemma3n takes."""
    pytest.importorskip("transformers")
    from matformer.errors import TierError
    from matformer.slicing.gemma3n import slice_gemma3n

    folder = _gemma_folder(tmp_path)
    for tier in (10**12, 64, -1):
        with pytest.raises(TierError, match="tier"):
            slice_gemma3n(folder, tmp_path / f"t{tier}", tier=tier)


def _gemma_folder(tmp_path: Path) -> Path:
    from transformers import Gemma3nForCausalLM

    from tests.slicing.test_gemma3n import TOKENIZER, text_config

    folder = tmp_path / "g3n"
    Gemma3nForCausalLM(text_config()).save_pretrained(folder)
    for name, data in TOKENIZER.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("saved", [{"scale": "x", "clean_steps": 0}, {"scale": 0.0, "clean_steps": 0},
                                   {"scale": 1e300, "clean_steps": 0}, {"scale": 2.0, "clean_steps": -1},
                                   [1, 2]])
def test_saved_loss_scale_is_checked(saved):
    from matformer.training.precision import LossScaler

    with pytest.raises(CheckpointError, match="loss_scale"):
        LossScaler(True).load_state(saved)
    s = LossScaler(True)
    s.load_state({"scale": 1024.0, "clean_steps": 3})
    assert (s.scale, s.clean_steps) == (1024.0, 3)
