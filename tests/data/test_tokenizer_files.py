"""A source's tokenizer travels intact (issue 24): convert, train --init-from, a prepared token
folder, slice and export keep its files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja, generation_config.json) byte for byte, so its
special tokens, ids, max length and chat template; training documents end with the
tokenizer's own EOS; tokenizers are compared by content (a transformers-saved tokenizer.json and
our compact copy of it are the same tokenizer).

The source is a tiny transformers Llama whose tokenizer is saved by transformers itself, with
SmolLM2's conventions: `<|endoftext|>`, `<|im_end|>` (EOS, id 1: not our `</s>` = 2),
`<|im_start|>`, a chat template and model_max_length 2048."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer.cli import main as cli_main
from matformer.data import text as D
from matformer.data import token_files
from matformer.data import tokenizer_files as TF
from matformer.errors import DataError

transformers = pytest.importorskip("transformers")

TEXT = "".join(f"The fox number {i} jumps over {i % 9} lazy dogs.\n\n" for i in range(300))
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
            "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TRAVELLING = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
              "generation_config.json")  # what transformers 5 writes (no special_tokens_map.json)


def smol_tokenizer():
    """A byte-level BPE with SmolLM2's special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_hf_tokenizer(tok, folder: Path) -> None:
    """Saved by transformers (its own tokenizer.json layout, chat_template.jinja)."""
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>", model_max_length=2048)
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokfiles")
    folder = root / "src"
    tok = smol_tokenizer()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config = transformers.GenerationConfig(bos_token_id=2, eos_token_id=[1, 0])
    model.save_pretrained(folder)
    save_hf_tokenizer(tok, folder)
    docs = TEXT.split("\n\n")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": "\n\n".join(docs[i:i + 10])})
                                              + "\n" for i in range(0, len(docs), 10)))
    return folder


def _same_files(a: Path, b: Path) -> None:
    assert all((a / name).is_file() for name in TRAVELLING)
    for name in TF.TOKENIZER_FILES:
        if (a / name).is_file():
            assert (b / name).read_bytes() == (a / name).read_bytes(), f"{b / name} changed"


def test_the_source_is_what_transformers_writes(src):
    """The fixture really is a transformers-saved tokenizer (not our compact one)."""
    assert (src / "chat_template.jinja").read_text() == TEMPLATE
    saved = json.loads((src / "tokenizer_config.json").read_text())
    assert saved["eos_token"] == "<|im_end|>" and saved["model_max_length"] == 2048
    assert (src / "tokenizer.json").read_text() != D.load_tokenizer(src).to_str()


def test_specials_eos_and_template_are_read_from_the_files(src, tmp_path):
    tok = D.load_tokenizer(src)
    assert TF.special_ids(tok) == {"bos": 2, "eos": 1, "pad": 1, "unk": 0}
    assert TF.eos_id(tok) == 1
    assert TF.stop_ids(tok, 1) == [1, 0]  # the EOS, then generation_config's other id
    assert TF.chat_template(tok) == TEMPLATE
    assert TF.model_max_length(tok) == 2048
    # the document separator is this EOS (id 1), not our </s> (id 2)
    ids = D.tokenize(tok, ["fox one", "fox two"])
    assert [int(i) for i, t in enumerate(ids) if t == 1] == [
        len(tok.encode("fox one").ids), len(ids) - 1]
    assert 2 not in ids.tolist()
    # a tokenizer trained here keeps </s>; one with no EOS at all is a one-line error
    assert TF.eos_id(D.train_tokenizer([TEXT], 300)) == D.EOS_ID
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text(smol_tokenizer().to_str())
    with pytest.raises(DataError, match="tokenizer.json: the tokenizer names no end-of-seq"):
        TF.eos_id(D.load_tokenizer(bare))
    (bare / "config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))  # the model's
    assert TF.eos_id(D.load_tokenizer(bare)) == 1


def test_prepared_folder_keeps_the_files_and_eos(src, tmp_path, one_thread):
    out = tmp_path / "tok"
    token_files.prepare(src.parent / "corpus.jsonl", out, tokenizer=src, val_fraction=0.1)
    _same_files(src, out)
    tok, train, _, _ = token_files.load(out)
    assert TF.eos_id(tok) == 1 and int(train[-1]) == 1
    # a fresh model trained from that folder's tokenizer: its files, and its specials' ids
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(out), "--preset", "debug", "--steps", "1",
                     "--batch-size", "2", "--seq-len", "16", "--eval-every", "1000",
                     "--save-every", "1000", "--eval-windows", "1", "--quiet",
                     "--out", str(run)]) == 0
    _same_files(src, run)
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 1)


def test_convert_train_slice_export_keep_the_tokenizer(src, tmp_path, one_thread):
    """The whole route of docs/CONVERT.md, tokenizer files compared byte for byte at each step;
    the trained model's config takes its specials from them (no ids past the embedding)."""
    mat = tmp_path / "mat"
    assert cli_main(["convert", str(src), "-o", str(mat), "--calibration",
                     str(src.parent / "corpus.jsonl"), "--samples", "4", "--seq-len", "32"]) == 0
    _same_files(src, mat)
    run = tmp_path / "run"
    assert cli_main(["train", "--init-from", str(mat), "--data", str(src.parent / "corpus.jsonl"),
                     "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every",
                     "1000", "--save-every", "1000", "--eval-windows", "2", "--quiet",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(run)]) == 0
    _same_files(src, run)
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 1, 1)
    hf = transformers.AutoTokenizer.from_pretrained(run)
    assert (hf.eos_token_id, hf.pad_token_id, hf.model_max_length) == (1, 1, 2048)
    assert hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                  add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    tiers = tmp_path / "tiers"
    assert cli_main(["slice", str(run), "-o", str(tiers), "--tiers", "0,1"]) == 0
    for t in (0, 1):
        _same_files(src, tiers / f"tier-{t}")
    from matformer.io.gguf_reader import GGUFFile

    path = tmp_path / "m.gguf"
    assert cli_main(["export", str(run), "-o", str(path), "--tier", "1", "--type", "f32"]) == 0
    with GGUFFile(path) as f:
        assert f.get("tokenizer.chat_template") == TEMPLATE
        assert f.get("tokenizer.ggml.eos_token_id") == 1
        assert f.get("tokenizer.ggml.bos_token_id") == 2


def test_compare_is_by_content_not_bytes(src, tmp_path, one_thread):
    """`eval --compare` of a transformers-saved tokenizer against our compact copy of it is
    accepted; a different tokenizer is refused naming the difference."""
    from matformer.evaluation.compare import compare

    compact = tmp_path / "compact"
    shutil.copytree(src, compact)
    (compact / "tokenizer.json").write_text(D.load_tokenizer(src).to_str())
    assert (compact / "tokenizer.json").read_bytes() != (src / "tokenizer.json").read_bytes()
    got = compare([src, compact], tiers=[0], data=src.parent / "corpus.jsonl", seq_len=16,
                  max_tokens=32)
    assert got.losses[0] == got.losses[1]
    other = tmp_path / "other"
    shutil.copytree(src, other)
    (other / "tokenizer.json").write_text(D.train_tokenizer([TEXT], 300).to_str())
    with pytest.raises(DataError, match="tokenizer differs .*vocabularies differ"):
        compare([src, other], tiers=[0], data=src.parent / "corpus.jsonl", seq_len=16,
                max_tokens=32)


def test_written_back_unchanged(src, tmp_path):
    """save_tokenizer of a tokenizer read from a folder writes that folder's files back."""
    names = D.save_tokenizer(D.load_tokenizer(src), tmp_path / "copy")
    assert set(TRAVELLING) <= set(names)
    _same_files(src, tmp_path / "copy")
    assert np.array_equal(D.tokenize(D.load_tokenizer(tmp_path / "copy"), [TEXT[:200]]),
                          D.tokenize(D.load_tokenizer(src), [TEXT[:200]]))
