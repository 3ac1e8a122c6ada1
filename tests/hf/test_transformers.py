"""matformer checkpoints through transformers' own API (matformer.hf): Auto classes, generate,
pipeline, Trainer and PEFT, each checked against matformer's own loader and decoder or against
transformers' Llama on the same weights.

Checkpoints (module-scoped, tiny: hidden 64, 2 layers, 8 query heads on 4 KV heads): the full
elastic model, a uniform tier-1 slice, a Mix'n'Match slice and a per-layer-heads slice, each with
a byte-level BPE tokenizer whose vocabulary is the model's. Stock transformers refusing a
Mix'n'Match checkpoint, and registration without `import matformer` importing transformers, are
checked in a fresh interpreter by tests/contracts/test_startup.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    pipeline,
)

from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.errors import ConfigError, TierError
from matformer.hf import MatFormerForCausalLM, MatFormerHFConfig
from matformer.inference.decode import generate, generate_batch
from matformer.io.checkpoint import load_model, save_model
from matformer.slicing.extract import slice_checkpoint
from tests.conftest import tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["the cat sat on the mat and the dog sat on the log. " * 4,
        "elastic models nest every width of a transformer inside the full one. " * 4]
IDS = torch.tensor([[1, 17, 40, 3, 99, 7, 250, 12]])
KINDS = {  # checkpoint -> (model_type written, the class AutoModelForCausalLM builds)
    "full": ("llama", LlamaForCausalLM),
    "tier1": ("llama", LlamaForCausalLM),
    "mixnmatch": ("matformer", MatFormerForCausalLM),
    "heads": ("matformer", MatFormerForCausalLM),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    tok = train_tokenizer(TEXT, 300)
    model = tiny_lm(distinct=True, heads=True, vocab_size=tok.get_vocab_size())
    save_model(model, root / "full")
    save_tokenizer(tok, root / "full")
    out = {"full": root / "full"}
    for name, how in (("tier1", dict(tier=1)), ("mixnmatch", dict(widths=[256, 64])),
                      ("heads", dict(layer_kv_heads=[4, 2]))):
        slice_checkpoint(root / "full", root / name, **how)
        out[name] = root / name
    return out


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("kind", list(KINDS))
def test_auto_model_loads_every_kind_with_matformers_logits(ckpts, kind) -> None:
    model_type, cls = KINDS[kind]
    assert json.loads((ckpts[kind] / "config.json").read_text())["model_type"] == model_type
    hf = AutoModelForCausalLM.from_pretrained(ckpts[kind])
    assert type(hf) is cls
    assert torch.allclose(_logits(hf), _logits(load_model(ckpts[kind])), atol=1e-5, rtol=0)


def test_a_full_elastic_checkpoint_runs_any_width_in_transformers(ckpts, tmp_path) -> None:
    hf = MatFormerForCausalLM.from_pretrained(ckpts["full"])  # model_type llama, as an elastic
    assert hf.widths == [256, 256] and hf.config.to_dict()["model_type"] == "llama"
    assert torch.allclose(_logits(hf), _logits(load_model(ckpts["full"])), atol=1e-5, rtol=0)
    hf.set_widths(tier=1)
    assert hf.tier == 1
    assert torch.allclose(_logits(hf), _logits(load_model(ckpts["full"], tier=1)), atol=1e-5,
                          rtol=0)
    with hf.at_width(layer_tiers=[0, 2], kv_heads=2):
        assert hf.widths == [256, 64] and hf.layer_kv_heads == [2, 2]
        want = load_model(ckpts["full"], layer_tiers=[0, 2], kv_heads=2)
        assert torch.allclose(_logits(hf), _logits(want), atol=1e-5, rtol=0)
    assert hf.widths == [128, 128] and hf.layer_kv_heads == [4, 4]  # restored
    with hf.at_width(tier=1, kv_heads=2):  # generate at a width: the cache holds its heads
        out = hf.generate(IDS, max_new_tokens=6, do_sample=False, eos_token_id=None)
    want = generate(load_model(ckpts["full"]), IDS[0].tolist(), 6, ignore_eos=True, tier=1,
                    kv_heads=2).tokens
    assert out[0, IDS.shape[1]:].tolist() == want
    with pytest.raises(TierError):
        MatFormerForCausalLM.from_pretrained(ckpts["tier1"]).set_widths(tier=0)
    hf.save_pretrained(tmp_path / "again")  # what is stored, whatever it runs at: still a Llama
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    again = LlamaForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.allclose(_logits(again), _logits(load_model(ckpts["full"])), atol=1e-5, rtol=0)


def test_generate_greedy_equals_matformers_and_padding_equals_its_batches(ckpts) -> None:
    hf = AutoModelForCausalLM.from_pretrained(ckpts["mixnmatch"])
    ours = load_model(ckpts["mixnmatch"])
    # 8 + 72 positions: the cache (64 at first) grows on the way
    out = hf.generate(IDS, max_new_tokens=72, do_sample=False, eos_token_id=None)
    want = generate(ours, IDS[0].tolist(), 72, ignore_eos=True).tokens
    assert out[0, IDS.shape[1]:].tolist() == want
    # left-padded batch (what batched pipelines send) vs matformer's own batched decoding
    prompts = [[5, 9, 33], [1, 17, 40, 3, 99]]
    ids = torch.tensor([[0, 0, *prompts[0]], prompts[1]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    want = [g.tokens for g in generate_batch(ours, prompts, 6, ignore_eos=True)]
    assert out[:, ids.shape[1]:].tolist() == want
    # right padding without a cache (a training batch): the real tokens' logits are unchanged
    right = torch.tensor([[*prompts[0], 0, 0], prompts[1]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = hf(right, attention_mask=mask, use_cache=False).logits
    assert torch.allclose(got[0, :3], _logits(ours, torch.tensor([prompts[0]]))[0], atol=1e-5,
                          rtol=0)
    with pytest.raises(ValueError, match="pads inside a sequence"):
        hf(right, attention_mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        hf(right, output_hidden_states=True)


def test_beam_search_and_sampling_equal_transformers_llama(ckpts) -> None:
    # The same uniform weights in both classes: the search and the sampler see equal logits.
    ours = MatFormerForCausalLM.from_pretrained(ckpts["tier1"])
    llama = LlamaForCausalLM.from_pretrained(ckpts["tier1"])
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    beams = [m.generate(IDS, num_beams=3, num_return_sequences=2, do_sample=False, **kw)
             for m in (ours, llama)]
    assert torch.equal(beams[0], beams[1])
    samples = []
    for m in (ours, llama):
        torch.manual_seed(7)
        samples.append(m.generate(IDS, do_sample=True, top_k=20, temperature=1.5, **kw))
    assert torch.equal(samples[0], samples[1])


def test_pipeline_returns_matformers_text(ckpts) -> None:
    tok = AutoTokenizer.from_pretrained(ckpts["mixnmatch"])
    prompt = "the cat sat"
    pipe = pipeline("text-generation", model=str(ckpts["mixnmatch"]), device="cpu")
    text = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tok(prompt)["input_ids"]
    want = generate(load_model(ckpts["mixnmatch"]), ids, 8, ignore_eos=True).tokens
    assert text == prompt + tok.decode(want) and len(text) > len(prompt)


def _batch(vocab: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (4, 16), generator=g).tolist()
    return [{"input_ids": r, "labels": r} for r in rows]


def _loss(model: torch.nn.Module, data: list[dict[str, list[int]]]) -> float:
    ids = torch.tensor([d["input_ids"] for d in data])
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_trainer_three_steps_change_the_loss_and_save_a_matformer_checkpoint(ckpts,
                                                                           tmp_path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(ckpts["mixnmatch"])
    data = _batch(hf.config.vocab_size)
    before = _loss(hf, data)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=hf, args=args, train_dataset=data).train()
    hf.eval()
    after = _loss(hf, data)
    assert after < before - 0.1
    Trainer(model=hf, args=args).save_model(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "matformer"
    assert torch.allclose(_logits(load_model(tmp_path / "out")), _logits(hf), atol=1e-5, rtol=0)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.allclose(_logits(back), _logits(hf), atol=1e-5, rtol=0)


def test_peft_lora_trains_saves_and_merges(ckpts, tmp_path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(ckpts["mixnmatch"])
    data = _batch(base.config.vocab_size)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "v_proj", "up_proj"]))
    before = _loss(lora, data)
    ids = torch.tensor([d["input_ids"] for d in data])
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora.train()
    for _ in range(3):
        lora(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    lora.eval()
    after = _loss(lora, data)
    assert after < before - 0.1
    lora.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpts["mixnmatch"]),
                                      tmp_path / "adapter").eval()
    assert torch.allclose(_logits(again), _logits(lora), atol=1e-5, rtol=0)
    with pytest.raises(TierError, match="wrapped .*merge the adapter"):
        with base.at_width(tier=2):  # the adapters run at the stored width only
            _logits(lora)
    merged = lora.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert torch.allclose(_logits(load_model(tmp_path / "merged")), _logits(again), atol=1e-5,
                          rtol=0)


def test_per_layer_checkpoints_written_before_still_load(ckpts, tmp_path) -> None:
    # Before matformer.hf, a per-layer config said model_type "llama" (architectures
    # MatFormerForCausalLM): matformer reads it as before, and so does the transformers class.
    old = tmp_path / "old"
    old.mkdir()
    for f in ckpts["mixnmatch"].iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    want = _logits(load_model(ckpts["mixnmatch"]))
    assert torch.equal(_logits(load_model(old)), want)
    assert torch.allclose(_logits(MatFormerForCausalLM.from_pretrained(old)), want, atol=1e-5,
                          rtol=0)


def test_a_bad_config_is_one_line(ckpts, tmp_path) -> None:
    cfg = json.loads((ckpts["mixnmatch"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": [256, 64, 8]}))
    with pytest.raises(ConfigError, match="intermediate_size has 3 entries"):
        AutoConfig.from_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(ckpts["heads"]), MatFormerHFConfig)


def test_matvit_per_layer_checkpoint_loads_in_auto_image_classification(tmp_path) -> None:
    from transformers import AutoModelForImageClassification, ViTForImageClassification

    from matformer.hf import MatViTForImageClassification
    from matformer.models.vit.config import MatViTConfig
    from matformer.models.vit.model import MatViT

    torch.manual_seed(0)
    model = MatViT(MatViTConfig.from_preset("debug")).eval()
    save_model(model, tmp_path / "full")
    base = model.config.base
    slice_checkpoint(tmp_path / "full", tmp_path / "mnm", widths=[base, base // 4])
    cfg = json.loads((tmp_path / "mnm" / "config.json").read_text())
    assert cfg["model_type"] == "matformer_vit"
    pixels = torch.randn(2, model.config.num_channels, model.config.image_size,
                         model.config.image_size)
    hf = AutoModelForImageClassification.from_pretrained(tmp_path / "mnm")
    assert type(hf) is MatViTForImageClassification
    ours = load_model(tmp_path / "mnm")
    assert torch.allclose(_logits(hf, pixels), _logits(ours, pixels), atol=1e-5, rtol=0)
    labels = torch.tensor([1, 3])
    assert torch.allclose(hf(pixel_values=pixels, labels=labels).loss,
                          ours.loss(pixels, labels), atol=1e-6)
    # the full model is transformers' own ViT; loaded as ours it runs any width
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "full")) is (
        ViTForImageClassification)
    elastic = MatViTForImageClassification.from_pretrained(tmp_path / "full")
    with elastic.at_width(widths=[base, base // 4]):
        assert torch.allclose(_logits(elastic, pixels), _logits(ours, pixels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3"])
def test_every_causal_family_gets_its_class_from_the_registry(name, tmp_path) -> None:
    # Nothing in matformer.hf names these families: their registry entries make the classes.
    from matformer.hf.model import model_class
    from matformer.models.registry import family

    fam = family(name)
    torch.manual_seed(0)
    model = fam.model_class()(fam.config_class.from_preset("debug")).eval()
    with torch.no_grad():  # every tensor visible: biases and q/k norms included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, tmp_path / "full")
    slice_checkpoint(tmp_path / "full", tmp_path / "mnm", widths=[256, 64])
    cfg = json.loads((tmp_path / "mnm" / "config.json").read_text())
    assert cfg["model_type"] == f"matformer_{fam.model_types[0]}"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mnm")
    assert type(hf) is model_class(fam)
    ours = load_model(tmp_path / "mnm")
    assert torch.allclose(_logits(hf), _logits(ours), atol=1e-5, rtol=0)
    out = hf.generate(IDS, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out[0, IDS.shape[1]:].tolist() == generate(ours, IDS[0].tolist(), 6,
                                                      ignore_eos=True).tokens
