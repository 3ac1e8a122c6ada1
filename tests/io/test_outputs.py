"""The output-path rule (`io.outputs`) for every writer, FIFO/device inputs refused before
reading, and `info` of a missing local-looking path never going to the Hub (issue 23)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from matformer import MatFormerConfig, MatFormerLM, save_model
from matformer.cli import main
from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.errors import ConfigError
from matformer.io.outputs import check_output, write_output

TEXTS = [f"the quick brown fox {i} jumps over the lazy dog; hello world {i * 7}\n"
         for i in range(200)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    """A sharded debug checkpoint (config, index, shards, tokenizer)."""
    import torch

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("src") / "ck"
    cfg = MatFormerConfig.from_preset("debug", vocab_size=tok.get_vocab_size())
    save_model(MatFormerLM(cfg), folder, max_shard_size="100KB")
    save_tokenizer(tok, folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def corpus_file(tmp_path: Path) -> Path:
    """A JSONL corpus of 200 short documents (a plain text file is one document)."""
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".matformer-" in p.name)


# ---- never over an input --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors.index.json",
                                  "model-00001-of-00008.safetensors", "special_tokens_map.json"])
def test_export_never_writes_into_the_source(ckpt, name, capsys):
    pytest.importorskip("gguf")
    before = digest(ckpt)
    rc = main(["export", str(ckpt), "-o", str(ckpt / name), "--outtype", "f32"])
    one_line_error(capsys, rc, "which this command reads")
    assert digest(ckpt) == before


def test_export_refuses_a_hard_link_to_a_source_file(ckpt, tmp_path, capsys):
    pytest.importorskip("gguf")
    os.link(ckpt / "config.json", tmp_path / "x.gguf")
    before = digest(ckpt)
    one_line_error(capsys, main(["export", str(ckpt), "-o", str(tmp_path / "x.gguf")]), "reads")
    assert digest(ckpt) == before


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_eval_json_out_and_plot_never_write_into_the_checkpoint(ckpt, name, capsys):
    before = digest(ckpt)
    one_line_error(capsys, main(["eval", str(ckpt), "--json-out", str(ckpt / name)]), "reads")
    assert digest(ckpt) == before


def test_reports_never_land_in_a_runs_log_or_its_resumable_states(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    (run / "checkpoints").mkdir()
    (run / "train_log.jsonl").write_text("{}\n")
    one_line_error(capsys, main(["eval", str(run), "--plot", str(run / "checkpoints" / "c.png")]),
                   "reads")
    one_line_error(capsys, main(["eval", str(run), "--json-out", str(run / "train_log.jsonl")]),
                   "reads")
    assert not (run / "checkpoints" / "c.png").exists()
    assert (run / "train_log.jsonl").read_text() == "{}\n"


def test_reports_beside_the_checkpoint_are_written_and_rewritten(ckpt, tmp_path, capsys):
    """The demo's pattern: `eval RUN --json-out RUN/eval.json --plot RUN/elastic.png`, run again
    on a rerun; a GGUF exported beside the weights. None is a file the checkpoint consists of,
    so they are written (and replaced) while every checkpoint file stays as it was."""
    pytest.importorskip("gguf")
    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    before = digest(run)
    text = tmp_path / "held_out.txt"
    text.write_text("".join(TEXTS))
    for _ in range(2):
        assert main(["eval", str(run), "--data", str(text), "--seq-len", "16", "--no-mix",
                     "--no-decode", "--no-speculative", "--json-out", str(run / "eval.json"),
                     "--plot", str(run / "elastic.png")]) == 0
    assert main(["export", str(run), "-o", str(run / "t0.gguf"), "--outtype", "f32"]) == 0
    after = digest(run)
    assert {k: after[k] for k in before} == before
    assert {"eval.json", "elastic.png", "t0.gguf"} <= set(after)
    capsys.readouterr()


def test_prepare_data_never_writes_into_its_corpus_or_tokenizer(tmp_path, tok, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(TEXTS))
    save_tokenizer(tok, tmp_path / "tk")
    one_line_error(capsys, main(["prepare-data", str(corpus), "-o", str(corpus / "tok")]),
                   "inside the corpus")
    one_line_error(capsys, main(["prepare-data", str(corpus), "-o", str(tmp_path / "tk" / "o"),
                                 "--tokenizer", str(tmp_path / "tk")]), "tokenizer folder")
    assert sorted(p.name for p in corpus.iterdir()) == ["a.txt"]


# ---- through links, never into special files ---------------------------------------------------


def test_export_writes_through_a_symlink_and_keeps_it(ckpt, tmp_path, capsys):
    pytest.importorskip("gguf")
    (tmp_path / "v3.gguf").write_bytes(b"old")
    (tmp_path / "latest.gguf").symlink_to("v3.gguf")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "latest.gguf"), "--tier", "1"]) == 0
    assert (tmp_path / "latest.gguf").is_symlink()
    assert os.readlink(tmp_path / "latest.gguf") == "v3.gguf"
    assert (tmp_path / "v3.gguf").read_bytes()[:4] == b"GGUF"
    assert leftovers(tmp_path) == []


def special_files(tmp_path: Path) -> dict[str, Path]:
    os.mkfifo(tmp_path / "fifo")
    found = {"fifo": tmp_path / "fifo", "folder": tmp_path}
    try:
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        found["device"] = tmp_path / "null"
    except (PermissionError, OSError):
        found["device"] = Path("/dev/null")
    (tmp_path / "to-null").symlink_to(found["device"])
    found["link to a device"] = tmp_path / "to-null"
    return found


def test_special_files_are_refused_as_outputs(ckpt, tmp_path, capsys):
    pytest.importorskip("gguf")
    for what, path in special_files(tmp_path).items():
        kind = os.stat(path).st_mode
        one_line_error(capsys, main(["export", str(ckpt), "-o", str(path)]), "refusing")
        one_line_error(capsys, main(["eval", str(ckpt), "--json-out", str(path)]), "refusing")
        assert os.stat(path).st_mode == kind, what  # the node is still there, unchanged
    assert leftovers(tmp_path) == []


def test_a_link_to_stdout_is_refused(ckpt, tmp_path):
    """`-o` a link to /proc/self/fd/1: stdout is a pipe here; the link must stay a link."""
    pytest.importorskip("gguf")
    (tmp_path / "out.gguf").symlink_to("/proc/self/fd/1")
    r = subprocess.run([sys.executable, "-m", "matformer.cli", "export", str(ckpt), "-o",
                        str(tmp_path / "out.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "refusing" in r.stderr and (tmp_path / "out.gguf").is_symlink()


def test_bad_names_are_one_line_errors(ckpt, tmp_path, capsys):
    one_line_error(capsys, main(["eval", str(ckpt), "--json-out", str(tmp_path / "NO" / "x.json")]),
                   "does not exist")
    one_line_error(capsys, main(["eval", str(ckpt), "--json-out", str(tmp_path / ("x" * 300))]),
                   "255-byte")
    one_line_error(capsys, main(["eval", str(ckpt), "--json-out", str(tmp_path / ("é" * 130))]),
                   "255-byte")
    with pytest.raises(ConfigError, match="empty"):
        check_output("")


def test_a_250_character_name_is_written(tmp_path, tok, capsys):
    """The temporary name beside a long target stays under 255 bytes (the name is cut)."""
    out = tmp_path / ("r" * 245 + ".json")
    write_output(out, "{}\n")
    assert out.read_text() == "{}\n" and leftovers(tmp_path) == []
    corpus = corpus_file(tmp_path)
    assert main(["prepare-data", str(corpus), "-o", str(tmp_path / ("d" * 250)), "--quiet",
                 "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    assert (tmp_path / ("d" * 250) / "tokens.json").is_file()
    assert leftovers(tmp_path) == []


# ---- full disks, killed writers -----------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, code):
    target = tmp_path / "report.json"
    target.write_text("old")

    def full(fd, data):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ConfigError, match=os.strerror(code)) as e:
        write_output(target, "x" * 1000)
    assert "\n" not in str(e.value)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_export_under_ulimit_f_is_one_line_and_leaves_nothing(ckpt, tmp_path):
    """EFBIG from a real `ulimit -f` (Python ignores SIGXFSZ, so write() fails)."""
    pytest.importorskip("gguf")
    out = tmp_path / "x.gguf"
    r = subprocess.run(["bash", "-c", f'ulimit -f 16; exec "{sys.executable}" -m matformer.cli '
                        f'export "{ckpt}" -o "{out}" --outtype f32'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "cannot write the GGUF file" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_prepare_data_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from matformer.data import token_files

    corpus = corpus_file(tmp_path)

    def full(self, batch):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "train.bin")

    monkeypatch.setattr(token_files._Writer, "write", full)
    rc = main(["prepare-data", str(corpus), "-o", str(tmp_path / "out"), "--quiet",
               "--vocab-size", "300"])
    one_line_error(capsys, rc, "No space left")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_a_killed_writers_temporaries_are_removed_by_the_next_run(ckpt, tmp_path, capsys):
    pytest.importorskip("gguf")
    dead = tmp_path / ".x.gguf.matformer-tmp-999999999-0badcafe"  # no such pid
    dead.write_bytes(b"half a gguf")
    live = tmp_path / f".x.gguf.matformer-tmp-{os.getppid()}-0badcafe"  # a live process
    live.write_bytes(b"being written")
    assert main(["export", str(ckpt), "-o", str(tmp_path / "x.gguf"), "--tier", "1"]) == 0
    assert not dead.exists() and live.exists()
    deadd = tmp_path / ".tok.matformer-tmp-999999999-0badcafe"
    deadd.mkdir()
    (deadd / "train.bin").write_bytes(b"\0" * 10)
    corpus = corpus_file(tmp_path)
    assert main(["prepare-data", str(corpus), "-o", str(tmp_path / "tok"), "--quiet",
                 "--vocab-size", "300", "--val-fraction", "0.3"]) == 0
    assert not deadd.exists()


# ---- inputs: special files refused before reading ----------------------------------------------


def test_prepare_data_tokenizer_fifo_or_device_is_refused_at_once(tmp_path, capsys):
    corpus = corpus_file(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    for tk in (tmp_path / "fifo", Path("/dev/zero")):
        rc = main(["prepare-data", str(corpus), "-o", str(tmp_path / "o"), "--tokenizer", str(tk)])
        one_line_error(capsys, rc, "not a regular file")
    os.mkfifo(tmp_path / "data.jsonl")
    rc = main(["prepare-data", str(tmp_path / "data.jsonl"), "-o", str(tmp_path / "o")])
    one_line_error(capsys, rc, "not a regular file")
    assert not (tmp_path / "o").exists()


def test_gemma3n_config_csv_fifo_is_refused(tmp_path):
    from matformer.slicing.gemma3n.slicing_configs import read_slicing_config

    os.mkfifo(tmp_path / "configs.csv")
    with pytest.raises(ConfigError, match="FIFO"):
        read_slicing_config(tmp_path / "configs.csv", "E2B")


def test_generate_prompts_file_fifo_is_refused(ckpt, tmp_path, capsys):
    os.mkfifo(tmp_path / "prompts")
    rc = main(["generate", str(ckpt), "--prompts-file", str(tmp_path / "prompts")])
    one_line_error(capsys, rc, "not a regular file")


# ---- prepare-data: malformed datasets folders, settings ------------------------------------------


@pytest.mark.parametrize("files", [
    {"dataset_dict.json": "[1, 2]"},
    {"dataset_dict.json": '{"splits": []}'},
    {"dataset_dict.json": '{"splits": ["../x"]}'},
    {"state.json": "[]", "dataset_info.json": "{}"},
    {"state.json": '{"_data_files": [{"filename": 3}]}', "dataset_info.json": "{}"},
    {"state.json": '{"_data_files": []}', "dataset_info.json": "{}"},
    {"state.json": "{not json", "dataset_info.json": "{}"},
])
def test_malformed_datasets_folders_are_one_line_errors(tmp_path, files, capsys):
    src = tmp_path / "ds"
    src.mkdir()
    for name, text in files.items():
        (src / name).write_text(text)
    rc = main(["prepare-data", str(src), "-o", str(tmp_path / "o"), "--vocab-size", "300"])
    one_line_error(capsys, rc, str(src))


@pytest.mark.parametrize("flag", [["--split-seed", "-1"], ["--vocab-size", str(10**8)],
                                  ["--vocab-size", "-5"], ["--val-fraction", "nan"],
                                  ["--val-fraction", "1"]])
def test_prepare_data_bad_settings_are_one_line_errors(tmp_path, flag, capsys):
    corpus = corpus_file(tmp_path)
    rc = main(["prepare-data", str(corpus), "-o", str(tmp_path / "o"), *flag])
    one_line_error(capsys, rc)
    assert not (tmp_path / "o").exists()


# ---- prepare-data streams: bounded memory on one huge line --------------------------------------

RSS_CHILD = """
import json, resource, sys
from matformer.data.token_files import prepare
from matformer.data import text as D
tok = D.read_tokenizer_file(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
meta = prepare(sys.argv[2], sys.argv[3], tokenizer=sys.argv[1], val_fraction=0.5, progress=False)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"grown_kb": grown, "tokens": meta["train_tokens"] + meta["val_tokens"]}))
"""


def test_prepare_data_of_one_huge_line_stays_in_bounded_memory(tmp_path, tok):
    """A 2 MB single-line JSONL document: tokenized whole it costs ~540 MB (the tokenizer needs
    ~270 bytes a character); cut into pieces the growth is a few tens of MB, whatever the length
    (2 MB, not 20: the shared CI cores tokenize ~1 MB/s)."""
    save_tokenizer(tok, tmp_path / "tk")
    words = "lorem ipsum dolor sit amet, consectetur adipiscing elit\n" * 20
    big = (words * (2_000_000 // len(words) + 1))[:2_000_000]
    with open(tmp_path / "big.jsonl", "w") as f:
        f.write(json.dumps({"text": big}) + "\n" + json.dumps({"text": "a small one"}) + "\n")
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(tmp_path / "tk" / "tokenizer.json"),
                        str(tmp_path / "big.jsonl"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAYON_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["grown_kb"] < 150_000, res
    assert res["tokens"] > 300_000


def test_pieces_tokenize_to_the_ids_of_the_whole_text(tok):
    from matformer.data.token_files import pieces

    text = "".join(TEXTS) * 20 + "  spaced   out\n\n\ttabs " + "z" * 3000
    ids = [i for p in pieces([text], size=997) for i in tok.encode(p, add_special_tokens=False).ids]
    assert ids == tok.encode(text, add_special_tokens=False).ids


def test_pieces_cut_at_whitespace_and_keep_every_character():
    from matformer.data.token_files import pieces

    text = "word " * 1000 + "x" * 5000 + "\n\n  tail"
    got = list(pieces([text[:777], text[777:]], size=1000))
    assert "".join(got) == text
    assert all(len(p) <= 1000 for p in got)
    assert all(p.endswith("word") for p in got[:4])  # cut before a whitespace run


# ---- SRC: a missing local-looking path never goes to the Hub -------------------------------------


def test_info_of_a_missing_local_looking_path_makes_no_request(tmp_path):
    from tests.fake_hub import FakeHub

    (tmp_path / "runs").mkdir()
    with FakeHub() as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"))
        for spec in ["runs/typo-folder", "./typo", "a/b/c", "org/model.safetensors",
                     "org/config.json", "~/nothing-here", str(tmp_path / "none")]:
            r = subprocess.run([sys.executable, "-m", "matformer.cli", "info", spec],
                               capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
            assert r.returncode == 2 and "no such file or folder" in r.stderr, (spec, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert hub.log == []


def test_looks_local_rule():
    from matformer.io.source import looks_local

    assert not looks_local("acme/tiny-matformer")
    assert not looks_local("acme/tiny-matformer@main")
    for spec in ("./x", "../x", "/abs", "~/x", "a/b/c", "x.safetensors", "org/x.json"):
        assert looks_local(spec), spec



def test_fifos_beside_the_weights_are_never_waited_on(ckpt, tmp_path, capsys):
    """tokenizer_config.json / train_config.json as FIFOs: export and slice finish (the files are
    optional companions) or say what is wrong in one line; nothing blocks."""
    import shutil

    pytest.importorskip("gguf")
    src = tmp_path / "src"
    shutil.copytree(ckpt, src)
    for name in ("tokenizer_config.json", "train_config.json"):
        (src / name).unlink(missing_ok=True)
        os.mkfifo(src / name)
    assert main(["export", str(src), "-o", str(tmp_path / "x.gguf"), "--tier", "1"]) == 0
    rc = main(["slice", str(src), "-o", str(tmp_path / "s"), "--tier", "1"])
    err = capsys.readouterr().err
    assert rc in (0, 2) and "Traceback" not in err, err


def test_plot_is_written_through_a_temporary_png(tmp_path):
    """matplotlib picks the format from the name's suffix: the temporary name ends in .png."""
    from matformer.cli.flags import write_plot

    seen = []

    def plot(report, path, title):
        seen.append(Path(path))
        Path(path).write_bytes(b"\x89PNG")

    write_plot(plot, None, str(tmp_path / "curve.png"), "t")
    assert seen[0].suffix == ".png" and ".matformer-tmp-" in seen[0].name
    assert (tmp_path / "curve.png").read_bytes() == b"\x89PNG" and leftovers(tmp_path) == []
