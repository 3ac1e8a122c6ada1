"""Fuzzing every verb's arguments (hypothesis), in-process through `matformer.cli.main`.

Each verb starts from a valid command on tiny real inputs (a debug checkpoint with its
tokenizer, a prepared token folder, a JSONL corpus, a Gemma 3n checkpoint for `slice`), and
hypothesis adds up to three of the verb's options with values mixing valid ones and hostile ones:
huge and negative integers, NaN/inf, `1e3`, lists where numbers are expected, empty strings,
300-byte names, FIFOs, folders, devices, missing folders, and files of the source checkpoint.

The property (issue 23): the command exits 0, or 2 with a one-line `error:` message (argparse's
usage line may precede it); never a traceback, another status, a hang (an alarm bounds each
example), or a change to any file of the source checkpoint. Bounded: ~20-30 derandomized
examples per verb (the same ones on every run, so CI is stable), about a minute in all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from matformer.cli import main  # noqa: E402

EXAMPLE_SECONDS = 60
"""Wall-clock limit of one example: far above the slowest valid one (~5 s); above is a hang."""

INTS = st.one_of(
    st.integers(-2, 6).map(str),
    st.sampled_from(["1000000000000", "-1000000000000", "1e3", "nan", "inf", "[1, 2]", "", "0x10",
                     "1.5", " 2", "99999999999999999999999", "٣"]),
)
FLOATS = st.one_of(
    st.sampled_from(["0.5", "0.1", "1", "0", "-0.1", "2"]),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "1e-40", "abc", "", "1e3", "[0.5]"]),
)
LISTS = st.one_of(
    st.lists(st.integers(-1, 5), min_size=1, max_size=5).map(lambda v: ",".join(map(str, v))),
    st.sampled_from(["", ",", "1,,2", "a,b", "[1, 2]", "1000000000000", "1e3", "nan", "0",
                     ",".join(["1"] * 200), "-1"]),
)
WORDS = st.one_of(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                          max_size=12),
                  st.sampled_from(["x" * 300, "cpu", "cuda", "cuda:7", "1e3", "meta", "mps"]))
PATHS = st.sampled_from(["{ck}", "{ck}/config.json", "{ck}/tokenizer.json", "{prep}", "{corpus}",
                         "{fifo}", "{dir}", "/dev/null", "/dev/zero", "{devlink}",
                         "{out}/MISSING/x", "", "{out}/" + "n" * 300, "{out}/new", "{out}/new.json",
                         "{out}/new.png", "{out}/new.gguf", "{ck}/model.safetensors.index.json",
                         "acme/not-a-repo-on-loopback", "runs/typo-folder"])
OUTS = st.sampled_from(["{out}/o", "{out}/o", "{out}/o.gguf", "{out}/o.json", "{src}",
                        "{src}/config.json", "{src}/tokenizer.json", "{src}/sub", "{root}",
                        "{fifo}", "{dir}", "/dev/null",
                        "{devlink}", "{out}/MISSING/x", "", "{out}/" + "n" * 300,
                        "{out}/" + "n" * 250])

OPTIONS: dict[str, dict[str, st.SearchStrategy]] = {
    "info": {"src": PATHS, "--tier": INTS, "--revision": WORDS, "--json": st.just(None)},
    "slice": {"-o": OUTS, "--tier": INTS, "--widths": LISTS, "--layer-tiers": LISTS,
              "--budget": st.sampled_from(["1M", "0", "-1", "1e3", "nan", "1e309", "10G", ""]),
              "--tiers": LISTS, "--kv-heads": INTS, "--layer-kv-heads": LISTS,
              "--max-shard-size": st.sampled_from(["1KB", "0", "-1", "inf", "nan", "1e3", "",
                                                   "100000000000000000000000TB", "x"])},
    "export": {"-o": OUTS, "--tier": INTS, "--widths": LISTS, "--layer-tiers": LISTS,
               "--kv-heads": INTS, "--layer-kv-heads": LISTS,
               "--outtype": st.sampled_from(["f32", "f16", "bf16", "q8_0", "q4"])},
    "eval": {"--tier": INTS, "--data": PATHS, "--json-out": OUTS, "--plot": OUTS, "--tiers": LISTS,
             "--widths": LISTS, "--kv-heads": LISTS, "--seq-len": INTS, "--max-tokens": INTS,
             "--batch-size": INTS, "--device": WORDS, "--dtype": WORDS, "--threads": INTS,
             "--compare": PATHS, "--json": st.just(None)},
    "generate": {"--prompt": WORDS, "--prompts-file": PATHS, "--max-new-tokens": INTS,
                 "--tier": INTS, "--widths": LISTS, "--layer-tiers": LISTS, "--kv-heads": INTS,
                 "--draft-tier": INTS,
                 "--draft-tokens": INTS, "--temperature": FLOATS, "--top-k": INTS,
                 "--top-p": FLOATS, "--seed": INTS, "--device": WORDS, "--threads": INTS,
                 "--draft-model": PATHS},
    "train": {"--out": OUTS, "--data": PATHS, "--tier": INTS, "--batch-size": INTS,
              "--seq-len": INTS, "--lr": FLOATS, "--warmup-steps": INTS, "--weight-decay": FLOATS,
              "--grad-clip": FLOATS, "--seed": INTS, "--val-fraction": FLOATS,
              "--eval-windows": INTS, "--trained-tiers": LISTS, "--tier-probs": LISTS,
              "--device": WORDS, "--init-from": PATHS, "--distill": PATHS, "--kv-heads": INTS,
              "--grad-accum": INTS, "--objective": WORDS, "--hidden-size": INTS,
              "--num-layers": INTS, "--num-heads": INTS, "--vocab-size": INTS},
    "prepare-data": {"src": PATHS, "-o": OUTS, "--tokenizer": PATHS, "--vocab-size": INTS,
                     "--tokenizer-sample-bytes": INTS, "--val-fraction": FLOATS,
                     "--split-seed": INTS},
    "convert": {"-o": OUTS, "--calibration": PATHS, "--samples": INTS, "--seq-len": INTS,
                "--batch-size": INTS, "--device": WORDS, "--max-shard-size": WORDS,
                "--importance": st.sampled_from(["reconstruction", "contribution", "x"])},
    "gemma3n": {"-o": OUTS, "--tier": INTS, "--widths": LISTS, "--layer-tiers": LISTS,
                "--skip-layers": LISTS, "--config-csv": PATHS,
                "--config-name": st.sampled_from(["tiny", "x", "", "Main model"])},
}

# A valid command of each verb, on the tiny inputs (fuzzed options come after and override).
BASE = {
    "info": ["info", "{ck}"],
    "slice": ["slice", "{ck}", "-o", "{out}/o"],
    "export": ["export", "{ck}", "-o", "{out}/o.gguf", "--outtype", "f32"],
    "eval": ["eval", "{ck}", "--data", "{prep}", "--seq-len", "16", "--max-tokens", "64",
             "--no-decode", "--no-speculative", "--no-mix", "--tiers", "1", "--threads", "1"],
    "generate": ["generate", "{ck}", "--prompt", "def f", "--max-new-tokens", "3", "--threads", "1"],
    "train": ["train", "--out", "{out}/o", "--data", "{prep}", "--preset", "debug", "--steps", "2",
              "--batch-size", "2", "--seq-len", "16", "--eval-every", "1000", "--save-every",
              "1000", "--eval-windows", "2", "--quiet", "--warmup-steps", "1"],
    "prepare-data": ["prepare-data", "{corpus}", "-o", "{out}/o", "--quiet", "--vocab-size", "300",
                     "--val-fraction", "0.2"],
    "convert": ["convert", "{ck}", "-o", "{out}/o", "--calibration", "{corpus}", "--samples", "2",
                "--seq-len", "16"],
    "gemma3n": ["slice", "{g3n}", "-o", "{out}/o"],
}
POSITIONAL = {"info": ("src", 1), "prepare-data": ("src", 1)}

TEXTS = [f"def f_{i}(x, y):\n    return x * {i} + y  # the quick brown fox {i}\n" for i in range(120)]


@pytest.fixture(scope="module")
def offline():
    """Hub ids (`acme/x`) fail at once instead of retrying a network this machine lacks."""
    constants = pytest.importorskip("huggingface_hub.constants")
    old, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    yield
    constants.HF_HUB_OFFLINE = old


@pytest.fixture(scope="module")
def world(tmp_path_factory, offline) -> dict[str, str]:
    """The tiny real inputs, a FIFO, a folder, a link to a device."""
    import torch

    from matformer import MatFormerConfig, MatFormerLM, save_model
    from matformer.data.text import save_tokenizer, train_tokenizer
    from matformer.data.token_files import prepare

    root = tmp_path_factory.mktemp("fuzz")
    tok = train_tokenizer(TEXTS, 300)
    torch.manual_seed(0)
    ck = root / "ck"
    cfg = MatFormerConfig.from_preset("debug", vocab_size=tok.get_vocab_size())
    save_model(MatFormerLM(cfg), ck, max_shard_size="200KB")
    save_tokenizer(tok, ck)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prep = root / "prep"
    prepare(corpus, prep, tokenizer=ck / "tokenizer.json", val_fraction=0.2, progress=False)
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    (root / "devlink").symlink_to("/dev/null")
    return {"ck": str(ck), "prep": str(prep), "corpus": str(corpus), "fifo": str(root / "fifo"),
            "dir": str(root / "dir"), "devlink": str(root / "devlink"), "root": str(root),
            "g3n": _gemma3n(root)}


def _gemma3n(root: Path) -> str:
    """A tiny Gemma 3n checkpoint (if this transformers has the class) and its config CSV."""
    try:
        from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
    except ImportError:
        return ""
    import torch

    layers, types = 4, ["sliding_attention", "full_attention"] * 2
    cfg = Gemma3nTextConfig(vocab_size=64, vocab_size_per_layer_input=32, hidden_size=16,
                            hidden_size_per_layer_input=4, intermediate_size=[32] * layers,
                            num_hidden_layers=layers, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=8, num_kv_shared_layers=2,
                            laurel_rank=2, sliding_window=4, max_position_embeddings=32,
                            layer_types=types, activation_sparsity_pattern=[0.0] * layers)
    torch.manual_seed(0)
    folder = root / "g3n"
    Gemma3nForCausalLM(cfg).save_pretrained(folder)
    (root / "configs.csv").write_text(
        "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n"
        'tiny,4,0.0,0%,"[16] * 4",\n')
    return str(folder)


def digest(folder: str) -> dict[str, tuple[str, int]]:
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        st_ = p.lstat()
        if stat.S_ISREG(st_.st_mode):
            out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st_.st_ino)
    return out


class Hang(BaseException):
    """Raised by the alarm: an example ran past EXAMPLE_SECONDS."""


@contextlib.contextmanager
def alarm(seconds: int):
    def ring(signum, frame):
        raise Hang(f"no exit after {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_COUNTER = iter(range(10**9))


def run_cli(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), alarm(EXAMPLE_SECONDS):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse: usage + one error line, status 2
            rc = e.code if isinstance(e.code, int) else 1
    return rc, err.getvalue()


def check(verb: str, world: dict[str, str], choice: list[tuple[str, str | None]]) -> None:
    out = Path(world["root"]) / f"ex{next(_COUNTER)}"
    out.mkdir()
    # {src}: what this verb reads, so an output there must be refused (another fixture would be
    # a legitimate target to replace, and replacing it would spoil the later examples)
    src = {"gemma3n": world["g3n"], "train": world["prep"], "prepare-data": world["corpus"]}
    fill = {**world, "out": str(out), "src": src.get(verb, world["ck"])}
    argv = [a.format(**fill) for a in BASE[verb]]  # BASE has only placeholders, no user text
    for opt, value in choice:
        v = value
        for key, path in fill.items():
            v = None if v is None else v.replace("{" + key + "}", path)
        if opt == "src" and verb in POSITIONAL:
            argv[POSITIONAL[verb][1]] = v or ""
        elif v is None:
            argv.append(opt)
        else:
            argv.append(f"{opt}={v}")  # `=`: a value starting with '-' stays a value
    protected = [world["ck"], world["prep"]] + ([world["g3n"]] if world["g3n"] else [])
    before = {f: digest(f) for f in protected}
    before_corpus = Path(world["corpus"]).read_bytes()
    rc, err = run_cli(argv)
    shown = f"{argv}\nrc={rc}\n{err[-3000:]}"
    assert rc in (0, 2), shown
    assert "Traceback" not in err, shown
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        # progress lines or argparse's (wrapped) usage may come first; the error is one line
        errors = [ln for ln in lines if " error: " in ln]
        assert len(errors) == 1 and lines[-1] == errors[0], shown
        assert lines[-1].startswith("matformer"), shown
    for f in protected:
        assert digest(f) == before[f], f"{shown}\nchanged: {f}"
    assert Path(world["corpus"]).read_bytes() == before_corpus, shown
    assert stat.S_ISFIFO(os.lstat(world["fifo"]).st_mode) and os.path.islink(world["devlink"])


def choices(verb: str) -> st.SearchStrategy:
    opts = OPTIONS[verb]
    return st.lists(st.sampled_from(sorted(opts)), max_size=3, unique=True).flatmap(
        lambda names: st.tuples(*(st.tuples(st.just(n), opts[n]) for n in names)).map(list))


FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck), print_blob=False,
                phases=[Phase.explicit, Phase.generate])  # no shrinking: bounded time


SCALE = int(os.environ.get("MATFORMER_FUZZ_SCALE", "1"))
"""More examples for a deeper run by hand (MATFORMER_FUZZ_SCALE=10); CI keeps the bounded 1."""


def fuzz(verb: str, examples: int = 25):
    @settings(FUZZ, max_examples=examples * SCALE)
    @given(choice=choices(verb))
    def test(world, choice):
        if verb == "gemma3n" and not world["g3n"]:
            pytest.skip("transformers has no Gemma3n")
        check(verb, world, choice)

    test.__name__ = f"test_fuzz_{verb.replace('-', '_')}"
    return test


test_fuzz_info = fuzz("info", 40)
test_fuzz_slice = fuzz("slice", 40)
test_fuzz_export = fuzz("export", 40)
test_fuzz_eval = fuzz("eval", 30)
test_fuzz_generate = fuzz("generate", 30)
test_fuzz_train = fuzz("train", 25)
test_fuzz_prepare_data = fuzz("prepare-data", 40)
test_fuzz_convert = fuzz("convert", 25)
test_fuzz_gemma3n_slice = fuzz("gemma3n", 40)


def test_the_valid_base_commands_succeed(world):
    """The starting points are valid: the fuzzing explores around working commands."""
    for verb in BASE:
        if verb == "gemma3n" and not world["g3n"]:
            continue
        out = Path(world["root"]) / f"base-{verb}"
        out.mkdir()
        argv = [a.format(**world, out=str(out)) for a in BASE[verb]]
        rc, err = run_cli(argv)
        assert rc == 0, (verb, err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
