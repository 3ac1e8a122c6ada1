"""`generate --chat` (inference.chat): the prompt is the tokenizer's chat template rendered as
transformers' apply_chat_template renders it, the reply stops at the template's end-of-turn
token and generation_config's EOS ids, and the greedy reply is transformers' own (a tiny random
Llama with a tiny tokenizer and template here; SmolLM2 in the slow test of
tests/cli/test_smollm2.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matformer.data import text as D
from matformer.errors import DataError
from matformer.inference.chat import chat_prompt, end_of_turn, user_turn
from matformer.inference.text import generate_text
from tests.data.test_tokenizer_files import save_hf_tokenizer, smol_tokenizer

transformers = pytest.importorskip("transformers")

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}")
CONVERSATIONS = [user_turn("What is the capital of France?"),
                 user_turn("Hi there", system="You are terse."),
                 [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "ünï {json} 'q'"}]]


def hf_llama(folder: Path, *, force: int | None = None):
    """A tiny random transformers Llama saved with the SmolLM2-like tokenizer. `force`: weights
    that make token `force` the greedy choice at every step (attention and FFN outputs zero, so
    the last hidden state is the token's embedding; its first coordinate is positive for every
    token and only `force`'s head row reads it)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=1, pad_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if force is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.model.embed_tokens.weight[:, 0] = 1.0
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[force, 0] = 10.0
    model.generation_config = transformers.GenerationConfig(bos_token_id=2, eos_token_id=[1, 0])
    model.save_pretrained(folder)
    save_hf_tokenizer(smol_tokenizer(), folder)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "m"
    hf_llama(path)
    return path


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "turns"])
def test_prompt_equals_apply_chat_template(folder, messages):
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    got = chat_prompt(D.load_tokenizer(folder), messages, config_eos=1)
    assert got.text == ref.apply_chat_template(messages, add_generation_prompt=True,
                                               tokenize=False)
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert got.ids == list(want)
    assert got.end_of_turn == 1 and got.stop == [1, 0]  # <|im_end|>, then generation_config's


def test_end_of_turn_is_the_templates_not_the_eos(tmp_path):
    """Llama 3's layout: the turn ends with <|eot_id|>, EOS is another token; both stop."""
    from tokenizers import AddedToken

    tok = smol_tokenizer()
    tok.add_special_tokens([AddedToken("<|start|>", special=True),
                            AddedToken("<|eot_id|>", special=True)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|endoftext|>")
    fast.chat_template = LLAMA3
    fast.save_pretrained(tmp_path)
    eot = tok.token_to_id("<|eot_id|>")
    ours = D.load_tokenizer(tmp_path)
    assert end_of_turn(ours, LLAMA3) == eot
    got = chat_prompt(ours, CONVERSATIONS[0], config_eos=[0, eot])
    assert got.stop == [eot, 0]
    assert got.ids == list(fast.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True,
                                                    tokenize=True)["input_ids"])
    assert got.ids[0] == tok.token_to_id("<|im_start|>")  # {{ bos_token }}, added once


def test_greedy_reply_equals_transformers(folder, one_thread):
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    msgs = user_turn("What is the capital of France?")
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                            eos_token_id=[1, 0], pad_token_id=1)[0, len(ids):].tolist()
    with open("/dev/null", "w") as sink:
        got = generate_text(folder, "What is the capital of France?", 8, chat=True, out=sink)
    assert got.tokens == want


def test_reply_stops_at_end_of_turn(tmp_path, run_cli, one_thread):
    """A model whose greedy choice is always <|im_end|> answers nothing and stops there, as
    transformers' generate does; a model that always says <|im_start|> runs to the limit."""
    stops = tmp_path / "stops"
    ref = hf_llama(stops, force=1)
    hf_tok = transformers.AutoTokenizer.from_pretrained(stops)
    ids = hf_tok.apply_chat_template(user_turn("hi"), add_generation_prompt=True,
                                     tokenize=True)["input_ids"]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert want[0, len(ids):].tolist() == [1]
    code, out, err = run_cli("generate", stops, "--chat", "hi", "--max-new-tokens", "5")
    assert code == 0, err
    assert out == "\n" and "1 tokens" in err and "stopped by eos" in err, err
    runs = tmp_path / "runs"
    hf_llama(runs, force=2)
    code, out, err = run_cli("generate", runs, "--chat", "--prompt", "hi", "--max-new-tokens",
                             "5", "--system", "Be brief.")
    assert code == 0 and "5 tokens" in err, err


def test_no_template_and_bad_flags_are_one_line_errors(tmp_path, run_cli, folder):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        (plain / name).write_bytes((folder / name).read_bytes())
    D.save_tokenizer(D.train_tokenizer(["a b c " * 50], 300), plain)
    code, out, err = run_cli("generate", plain, "--chat", "hi")
    assert code == 2 and "has no chat template" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("generate", folder, "--system", "x", "--prompt", "hi")
    assert code == 2 and "--system needs --chat" in err
    code, _, err = run_cli("generate", folder, "--chat", "hi", "--prompt", "there")
    assert code == 2 and "not both" in err
    with pytest.raises(DataError, match="chat message 0"):
        chat_prompt(D.load_tokenizer(folder), [{"role": "user"}])
    json.loads((folder / "generation_config.json").read_text())  # left as it was
