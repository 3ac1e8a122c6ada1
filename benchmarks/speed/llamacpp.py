"""`matformer export` checked against llama.cpp itself (through llama-cpp-python).

For each request (a uniform tier, a Mix'n'Match per-layer width list; f32 weights with a float32
and with llama.cpp's default float16 KV cache, q8_0 weights) the model is exported to GGUF and run
by llama.cpp and by matformer (runtime slicing of the full checkpoint, float32) on the same ids:
- tokenization: llama.cpp's tokenizer (from the GGUF) vs ours (tokenizer.json) on mixed text;
- logits: every position of a prompt, llama.cpp with logits_all=True vs our forward;
- greedy: 32 new tokens, llama.cpp's own sampler at temperature 0 vs our argmax loop.
Prints a table and writes benchmarks/results/llamacpp.json.

    .venv/bin/python -m benchmarks.speed.llamacpp            # a random debug model with a tokenizer
    .venv/bin/python -m benchmarks.speed.llamacpp --src runs/demo --layer-tiers 3,2,1,0
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, parser, write_json
from matformer import MatFormerConfig, MatFormerLM, load_model, save_model
from matformer.data.text import load_tokenizer, save_tokenizer, train_tokenizer
from matformer.slicing.export import export_gguf, request_widths

RESULT = RESULTS / "llamacpp.json"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!  Two  spaces,\ttabs\nand new lines\n\n  indented 12345 67 o'clock it's",
    "Ünïcödé — “quotes” 東京 😀 end   ",
]
PROMPT = "The quick brown fox jumps over"


def random_model(folder: Path, seed: int = 0) -> Path:
    """A debug-size model with its own byte-level BPE tokenizer (widths visibly distinct)."""
    texts = [f"The quick brown fox {i} jumps over the lazy dog. Hello, world! It's {i * 7} "
             f"o'clock." for i in range(300)]
    tok = train_tokenizer(texts, 512)
    torch.manual_seed(seed)
    cfg = MatFormerConfig.from_preset("debug", vocab_size=tok.get_vocab_size())
    model = MatFormerLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(8)
        model.lm_head.weight.mul_(4)
    save_model(model, folder)
    save_tokenizer(tok, folder)
    return folder


def ours(ckpt: Path, widths: list[int], prompt: list[int], n_new: int):
    """Our float32 logits for the prompt and greedy continuation (full forward per step)."""
    model = load_model(ckpt, widths=widths, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits = model(ids)[0].numpy()
        margins = []
        for _ in range(n_new):
            last = model(ids)[0, -1]
            top2 = torch.topk(last, 2).values
            margins.append(float(top2[0] - top2[1]))
            ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return logits, ids[0, len(prompt):].tolist(), min(margins)


def theirs(path: Path, prompt: list[int], n_new: int, threads: int, kv_type: int):
    """llama.cpp's logits for the prompt (logits_all) and its greedy sampler's continuation.
    `kv_type`: the GGML type of the KV cache (llama.cpp's default is F16; 0 = F32)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(prompt) + n_new + 8, n_batch=64,
                logits_all=True, n_threads=threads, verbose=False, seed=0,
                type_k=kv_type, type_v=kv_type)
    llm.eval(prompt)
    logits = np.array(llm.scores[: len(prompt)], dtype=np.float32)
    out: list[int] = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == n_new:
            break
    return llm, logits, out


def compare(ckpt: str | Path, out: str | Path, *, n_new: int = 32, outtype: str = "f32",
            threads: int = 2, kv_f32: bool = True, **request: Any) -> dict[str, Any]:
    """One row: export `ckpt` cut by `request` to `out`, run both, compare. `kv_f32`: run
    llama.cpp with a float32 KV cache (its default, F16, rounds keys and values)."""
    ckpt, out = Path(ckpt), Path(out)
    config = MatFormerConfig.from_json_file(ckpt / "config.json")
    widths = request_widths(config, **request)
    t0 = time.perf_counter()
    res = export_gguf(ckpt, out, outtype=outtype, **request)
    export_s = time.perf_counter() - t0
    tok = load_tokenizer(ckpt)
    prompt = tok.encode(PROMPT, add_special_tokens=False).ids
    logits, greedy, margin = ours(ckpt, widths, prompt, n_new)
    llm, lc_logits, lc_greedy = theirs(out, prompt, n_new, threads,
                                       0 if kv_f32 else 1)
    tok_equal = all(
        llm.tokenize(t.encode("utf-8"), add_bos=False, special=False)
        == tok.encode(t, add_special_tokens=False).ids for t in TEXTS)
    diff = np.abs(lc_logits - logits)
    return {
        "request": request, "widths": widths, "arch": res.arch, "outtype": outtype,
        "kv_cache": "f32" if kv_f32 else "f16",
        "gguf_bytes": res.bytes_written, "export_s": round(export_s, 3),
        "prompt_tokens": len(prompt), "tokenize_equal": tok_equal,
        "max_abs_logit_diff": float(diff.max()),
        "max_rel_logit_diff": float(diff.max() / np.abs(logits).max()),
        "greedy_equal": greedy == lc_greedy,
        "greedy_agree_prefix": next((i for i, (a, b) in enumerate(zip(greedy, lc_greedy, strict=False))
                                     if a != b), len(greedy)),
        "min_greedy_margin": margin, "ours": greedy, "llamacpp": lc_greedy,
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--src", help="checkpoint with tokenizer.json (default: a random debug model)")
    p.add_argument("--layer-tiers", default="0,2", help="the Mix'n'Match request (default 0,2)")
    p.add_argument("--tier", type=int, default=1, help="the uniform request (default 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=str(RESULT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mix = [int(t) for t in args.layer_tiers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.src) if args.src else random_model(Path(tmp) / "model")
        cases = [({"tier": args.tier}, "f32", True), ({"layer_tiers": mix}, "f32", True),
                 ({"tier": args.tier}, "f32", False), ({"layer_tiers": mix}, "f32", False),
                 ({"tier": args.tier}, "q8_0", False), ({"layer_tiers": mix}, "q8_0", False)]
        rows = [compare(src, Path(tmp) / f"{i}.gguf", outtype=ot, kv_f32=kv,
                        threads=args.threads, **req) for i, (req, ot, kv) in enumerate(cases)]
    print(f"{'request':<20} {'arch':<6} {'weights':<7} {'kv':<4} {'tokenize':<8} "
          f"{'max|dlogit|':>11} {'rel':>8} {'greedy 32':>10} {'min margin':>10}")
    for r in rows:
        req = ",".join(f"{k}={v}" for k, v in r["request"].items()).replace(" ", "")
        print(f"{req:<20} {r['arch']:<6} {r['outtype']:<7} {r['kv_cache']:<4} "
              f"{str(r['tokenize_equal']):<8} {r['max_abs_logit_diff']:>11.3g} "
              f"{r['max_rel_logit_diff']:>8.2g} "
              f"{'equal' if r['greedy_equal'] else 'first ' + str(r['greedy_agree_prefix']):>10} "
              f"{r['min_greedy_margin']:>10.3g}")
    import llama_cpp

    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus (shared)",
              "llama_cpp_python": llama_cpp.__version__, "src": args.src or "random debug model",
              "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "rows": rows}
    write_json(Path(args.json_out), report)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
