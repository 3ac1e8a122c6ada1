"""MatFormer-izing a dense model (issue 17): the importance permutation is exact (transformers'
Llama logits, MHA and GQA, tied and untied), importance order beats naive truncation at every
tier of a small trained dense model, the distillation loss is what it says, a distilled run
resumes bit-exactly, `eval --compare` scores every checkpoint on the same windows, and bad
input is a one-line error that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer.cli import main as cli_main
from matformer.data import text as D
from matformer.io.checkpoint import load_model, load_state_dict
from matformer.models.lm.model import lm_loss
from matformer.slicing.convert import (
    REPORT_NAME,
    Permutation,
    convert,
    greedy_order,
    measure_importance,
    permute_tensor,
)
from matformer.training import Objective, TrainConfig, train
from matformer.training.distill import Distillation, kd_loss
from tests.fake_hub import FakeHub

transformers = pytest.importorskip("transformers")

TEXT = "".join(f"def f{i}(x, y):\n    return x * {i % 13} + y - {i % 7}\n\n" for i in range(400))


@pytest.fixture(scope="module")
def tok():
    return D.train_tokenizer([TEXT], 300)


def hf_llama(folder: Path, tok, *, kv: int, tied: bool, seed: int = 0):
    """A random tiny transformers Llama saved with our tokenizer and a calibration text."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=128,
        tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    D.save_tokenizer(tok, folder)
    (folder.parent / "calib.txt").write_text(TEXT)
    return model


# ---- exactness -------------------------------------------------------------------------------


@pytest.mark.parametrize("kv,tied", [(4, False), (4, True), (2, False), (2, True)],
                         ids=["mha-untied", "mha-tied", "gqa-untied", "gqa-tied"])
def test_converted_model_computes_the_original_function(tmp_path, tok, kv, tied, one_thread):
    src = tmp_path / "src"
    ref = hf_llama(src, tok, kv=kv, tied=tied)
    res = convert(src, tmp_path / "out", calibration=tmp_path / "calib.txt", samples=8, seq_len=32)
    assert res.max_abs_logit_diff < 1e-5
    assert not res.permutation.is_identity()  # the test exercises a real permutation
    out = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, tok.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        assert (out(ids).logits - want).abs().max() < 1e-5
        assert (load_model(tmp_path / "out")(ids) - want).abs().max() < 1e-5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["matformer_base_intermediate_size"] == 96 and cfg["matformer_tier"] == 0
    assert cfg["matformer_base_num_key_value_heads"] == kv
    assert cfg["tie_word_embeddings"] is tied
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["order"]["ffn"] == res.permutation.ffn
    # the permutation moved weights: gate rows are the source's rows in the recorded order
    a, b = load_state_dict(src), load_state_dict(tmp_path / "out")
    name = "model.layers.1.mlp.gate_proj.weight"
    assert torch.equal(b[name], a[name][res.permutation.ffn[1]])


@pytest.mark.parametrize("kv", [4, 2])
def test_any_head_and_neuron_permutation_is_exact(tmp_path, tok, kv, one_thread):
    """Whatever the scores, permuting KV groups, query heads within their group and FFN neurons
    keeps transformers' logits (a random permutation of every axis, not only the measured one)."""
    ref = hf_llama(tmp_path / "src", tok, kv=kv, tied=False)
    g = torch.Generator().manual_seed(3)
    r, hd = 4 // kv, 16
    kv_order = [torch.randperm(kv, generator=g).tolist() for _ in range(2)]
    heads = [[grp * r + int(j) for grp in order for j in torch.randperm(r, generator=g)]
             for order in kv_order]
    perm = Permutation(ffn=[torch.randperm(96, generator=g).tolist() for _ in range(2)],
                       kv=kv_order, heads=heads)
    sd = {k: permute_tensor(k, v, perm, hd) for k, v in ref.state_dict().items()}
    model = transformers.LlamaForCausalLM(ref.config).eval()
    model.load_state_dict(sd)
    ids = torch.randint(0, tok.get_vocab_size(), (2, 24), generator=g)
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() < 1e-5


def test_head_scores_follow_the_heads(tmp_path, tok, one_thread):
    """Scaling one head's output columns up makes its group (and it, inside the group) first."""
    src = tmp_path / "src"
    ref = hf_llama(src, tok, kv=2, tied=False)
    with torch.no_grad():  # layer 0, query head 3 (group 1, second in it): 50x its o_proj block
        ref.model.layers[0].self_attn.o_proj.weight[:, 3 * 16:4 * 16] *= 50
    ref.save_pretrained(src)
    res = convert(src, tmp_path / "out", calibration=tmp_path / "calib.txt", samples=4, seq_len=32)
    assert res.permutation.kv[0][0] == 1
    assert res.permutation.heads[0][:2] == [3, 2]


# ---- importance beats naive truncation -------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    """A small dense model trained by `matformer train --objective single` on real text (the
    default corpus, capped), and its conversion. (On the synthetic TEXT alone, an over-fit model,
    no order kept 1/8 of the FFN well: see docs/RESULTS.md.)"""
    root = tmp_path_factory.mktemp("dense")
    (root / "corpus.txt").write_text(TEXT * 3)
    src = root / "dense"
    rc = cli_main(["train", "--objective", "single", "--preset", "debug", "--max-corpus-bytes",
                   "200000", "--vocab-size", "300", "--steps", "40",
                   "--batch-size", "8", "--seq-len", "64", "--lr", "1e-2", "--warmup-steps", "5",
                   "--eval-every", "1000", "--save-every", "1000", "--eval-windows", "16",
                   "--val-fraction", "0.1", "--cache-dir", str(root / "cache"), "--quiet",
                   "--out", str(src)])
    assert rc == 0
    out = root / "mat"
    assert cli_main(["convert", str(src), "-o", str(out), "--samples", "32"]) == 0
    return {"root": root, "src": src, "mat": out}


def test_importance_order_beats_naive_truncation_at_every_tier(dense, capsys, one_thread):
    capsys.readouterr()
    assert cli_main(["eval", str(dense["src"]), "--compare", str(dense["mat"]), "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["tiers"] == [0, 1, 2, 3]
    naive, ordered = c["losses"]
    assert abs(naive[0] - ordered[0]) < 1e-5  # tier 0: the same function
    for k in range(1, 4):
        assert ordered[k] < naive[k], (c["tiers"][k], ordered[k], naive[k])
    # the same numbers `matformer eval` prints for one checkpoint
    assert cli_main(["eval", str(dense["mat"]), "--tiers", "2", "--no-mix", "--no-decode",
                     "--no-speculative", "--json"]) == 0
    single = {r["tier"]: r["loss"] for r in json.loads(capsys.readouterr().out)["results"]}
    assert abs(single[2] - ordered[2]) < 1e-5


@pytest.mark.parametrize("method", ["contribution", "activation"])
def test_score_orders_are_exact_too(dense, tmp_path, method, one_thread):
    """The per-neuron scores (Minitron's activation, the contribution norm) give an exact
    conversion too, with their own order, sorted by the recorded scores."""
    res = convert(dense["src"], tmp_path / method, method=method, samples=16,
                  cache_dir=dense["root"] / "cache")
    assert res.max_abs_logit_diff < 1e-5
    default = json.loads((dense["mat"] / REPORT_NAME).read_text())
    assert default["method"] == "reconstruction"
    assert res.permutation.ffn != default["order"]["ffn"]


def test_greedy_order_reconstructs_best_prefixes():
    """Two cancelling items (c, -c) and a lone one: the lone one first (each prefix closest to the
    sum); a plain norm order would put a cancelling one first."""
    c = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert greedy_order(c @ c.T)[0] == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    order = greedy_order(x @ x.T)
    assert sorted(order) == list(range(6))
    err = [float((x.sum(0) - x[order[:k]].sum(0)).norm()) for k in range(7)]
    assert err[-1] == pytest.approx(0.0, abs=1e-9)


def test_importance_is_measured_at_the_stored_width(dense, one_thread):
    """Measuring leaves the model at the setting it had, and scores every stored neuron."""
    model = load_model(dense["src"], tier=2)
    windows = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    imp = measure_importance(model, windows)
    assert model.widths == [64, 64]
    assert [len(s) for s in imp.ffn] == [256, 256] and (imp.ffn[0] > 0).all()
    assert imp.tokens == 32


# ---- distillation ----------------------------------------------------------------------------


def test_calibration_reads_the_train_part_only(dense) -> None:
    """Given calibration text is split as training splits it: only its train part is read, so
    `eval --data` of the same text (its held-out part) scores nothing convert saw."""
    from matformer.io.source import resolve_source
    from matformer.slicing.convert import REPORT_NAME, calibration_windows

    corpus = dense["root"] / "corpus.txt"
    windows, what = calibration_windows(resolve_source(dense["src"]), corpus, 4, 16)
    tok = D.load_tokenizer(dense["src"])
    train, _ = D.split_texts(D.load_texts(corpus))
    stream = D.tokenize(tok, train)
    assert "train part of" in what and np.array_equal(windows.numpy(),
                                                       D.heldout_windows(stream, 16, 4))
    report = json.loads((dense["mat"] / REPORT_NAME).read_text())
    assert report["calibration_split"] == "train" and "train part of" in report["calibration"]


def test_kd_loss_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    for T in (1.0, 2.0):
        ps = torch.exp(s.double() / T) / torch.exp(s.double() / T).sum(-1, keepdim=True)
        pt = torch.exp(t.double() / T) / torch.exp(t.double() / T).sum(-1, keepdim=True)
        direct = T * T * (pt * (pt.log() - ps.log())).sum(-1).mean()
        assert abs(float(kd_loss(s, t, T)) - float(direct)) < 1e-5
    assert float(kd_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    lm = torch.tensor(3.0)
    mixed = Distillation(alpha=0.3, temperature=2.0).mix(s, t, lm)
    assert float(mixed) == pytest.approx(0.3 * float(kd_loss(s, t, 2.0)) + 0.7 * 3.0, abs=1e-5)


def test_objective_mixes_distillation_per_tier(dense, one_thread):
    student, teacher = load_model(dense["mat"]), load_model(dense["src"]).eval()
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_logits = teacher(ids)
    d = Distillation(alpha=0.25, temperature=2.0)
    total, lm_losses = Objective(student, d)(ids, [(2, 1.0)], t_logits)
    with student.at_width(tier=2):
        logits = student(ids)
    lm = lm_loss(logits, ids)
    want = 0.25 * kd_loss(logits, t_logits, 2.0) + 0.75 * lm
    assert abs(float(total.detach()) - float(want.detach())) < 1e-5
    assert abs(float(lm_losses[0]) - float(lm.detach())) < 1e-6  # logged: the LM part


def distill_cfg(dense, out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), init_from=str(dense["mat"]), distill=str(dense["src"]),
                data=str(dense["root"] / "corpus.txt"), objective="sample", steps=6, batch_size=4,
                seq_len=32, lr=3e-3, warmup_steps=1, eval_every=1000, save_every=3,
                eval_windows=4, seed=0, val_fraction=0.1, cache_dir=str(dense["root"] / "cache"),
                quiet=True)
    base.update(kw)
    return TrainConfig(**base)


def test_distilled_run_resumes_bit_exactly_and_alpha_matters(dense, tmp_path, one_thread):
    straight = train(distill_cfg(dense, tmp_path / "a"))  # saves steps 3 and 6
    step3 = tmp_path / "a" / "checkpoints" / "step-0000003"
    train(distill_cfg(dense, tmp_path / "b", resume=str(step3)))  # continues 3 -> 6 into b
    a, b = load_state_dict(straight.out), load_state_dict(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # alpha 0 is the plain LM objective; alpha 1 (--init-from's default) trains something else
    plain = load_state_dict(train(distill_cfg(dense, tmp_path / "p", distill=None)).out)
    zero = load_state_dict(train(distill_cfg(dense, tmp_path / "z", distill_alpha=0.0)).out)
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert not all(torch.equal(plain[k], a[k]) for k in plain)
    # the teacher was read, never written
    assert torch.equal(load_state_dict(dense["src"])["model.layers.0.mlp.up_proj.weight"],
                       load_model(dense["src"]).model.layers[0].mlp.up_proj.weight)
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    # --init-from's fine-tuning defaults, recorded as the values used
    assert saved["distill_alpha"] == 1.0 and saved["init_from"] == str(dense["mat"])
    assert saved["lr"] == distill_cfg(dense, tmp_path).lr


# ---- errors ----------------------------------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(dense, tmp_path, capsys):
    cases = [
        (["convert", str(dense["src"]), "-o", str(dense["src"])], "is the source checkpoint"),
        (["convert", str(dense["src"]), "-o", str(tmp_path / "x"), "--samples", "0"], "--samples"),
        (["convert", str(dense["src"]), "-o", str(tmp_path / "x"), "--calibration",
          str(tmp_path / "nope.txt")], "no such file"),
    ]
    assert cli_main(["slice", str(dense["src"]), "-o", str(tmp_path / "t1"), "--tier", "1"]) == 0
    cases.append((["convert", str(tmp_path / "t1"), "-o", str(tmp_path / "x")], "dense checkpoint"))
    common = ["--data", str(dense["root"] / "corpus.txt"), "--steps", "2", "--seq-len", "32",
              "--cache-dir", str(dense["root"] / "cache"), "--quiet"]
    cases.append((["train", "--init-from", str(tmp_path / "t1"), "--out", str(tmp_path / "r1"),
                   *common], "full-width"))
    cases.append((["train", "--init-from", str(dense["mat"]), "--distill", str(dense["src"]),
                   "--distill-alpha", "1.5", "--out", str(tmp_path / "r2"), *common],
                  "distill_alpha"))
    other = tmp_path / "other"
    hf_llama(other, D.train_tokenizer([TEXT], 280), kv=2, tied=False)
    cases.append((["train", "--init-from", str(dense["mat"]), "--distill", str(other),
                   "--out", str(tmp_path / "r3"), *common], "vocab"))
    for argv, needle in cases:
        capsys.readouterr()
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) <= 2, (argv, err)
    assert not (tmp_path / "x").exists()
    assert not any((tmp_path / r / "config.json").exists() for r in ("r1", "r2", "r3"))
    assert load_model(dense["src"]) is not None  # the source is intact


# ---- sources ---------------------------------------------------------------------------------


def test_convert_from_a_hub_id(tmp_path, tok, one_thread):
    from huggingface_hub import constants

    src = tmp_path / "src"
    ref = hf_llama(src, tok, kv=2, tied=True)
    mp = pytest.MonkeyPatch()
    try:
        with FakeHub() as h:
            h.add_repo("acme/dense", {p.name: p.read_bytes() for p in src.iterdir()})
            mp.setattr(constants, "ENDPOINT", h.url)
            mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                       h.url + "/{repo_id}/resolve/{revision}/{filename}")
            mp.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
            mp.setattr(constants, "HF_HUB_OFFLINE", False)
            mp.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
            mp.delenv("HF_TOKEN", raising=False)
            res = convert("acme/dense", tmp_path / "out", calibration=tmp_path / "calib.txt",
                          samples=4, seq_len=32)
    finally:
        mp.undo()
    assert res.max_abs_logit_diff < 1e-5
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert (load_model(tmp_path / "out")(ids) - ref(ids).logits).abs().max() < 1e-5
    assert (tmp_path / "out" / "tokenizer.json").is_file()
