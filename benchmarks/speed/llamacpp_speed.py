"""Decoding speed against llama.cpp (llama-cpp-python) on the same weights, threads and prompt.

For each size — the README demo's shape (`ffn8-tiny`: hidden 128, FFN 1024, 4 layers) and the
decode benchmark's 41.7M-non-embedding shape (hidden 512, FFN 4096, 6 layers, 8 query / 2 KV
heads) — a seeded random model with a byte-level BPE tokenizer is saved, exported by `matformer
export` to GGUF at f32, f16 and q8_0 (llama.cpp's what-users-pick reference), and run by both:

- ours: `generate(compile=True)` in float32 and float16 (and bfloat16), greedy, batch 1: with
  one thread each step is one C++ call (`inference/decode_step.py`), with more the static-cache
  compiled step; prompt processing is its (eager) prefill;
- llama.cpp: `Llama.eval` of the prompt in one batch, then one token per `eval` with the argmax
  of its logits in numpy (no sampler chain), its KV cache in the weights' float type (f32 for
  f32, f16 otherwise, as llama.cpp defaults).

Same token ids, same prompt length and new tokens, same thread count; the runs are interleaved
and repeated (medians), so the machine's load hits every column alike; the ratios come from one
run. Also reported: whether the f32 greedy tokens agree. Writes benchmarks/results/llamacpp_speed.json.

    .venv/bin/python -m benchmarks.speed.llamacpp_speed                   # both sizes, 1 thread
    .venv/bin/python -m benchmarks.speed.llamacpp_speed --sizes demo --threads 2 --repeats 5
    .venv/bin/python -m benchmarks.speed.llamacpp_speed --ckpt SmolLM2-135M-Instruct.Q4_1.gguf \
        --ours f32,f16 --json-out benchmarks/results/llamacpp_speed-smollm2.json   # a real model

With `--ckpt` the model is that source's weights (a GGUF is dequantized), exported again at each
GGUF type, so both sides run the same numbers.
"""

from __future__ import annotations

import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import DTYPE_NAMES, RESULTS, hardware, parser, write_json
from matformer import MatFormerConfig, MatFormerLM, load_model, save_model
from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.inference.decode import generate
from matformer.models.lm.shapes import parameter_counts
from matformer.slicing.export import export_gguf

RESULT = RESULTS / "llamacpp_speed.json"
SIZES: dict[str, dict[str, int]] = {
    "demo": dict(hidden_size=128, intermediate_size=1024, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "41.7M": dict(hidden_size=512, intermediate_size=4096, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2),
}
OURS = {name: getattr(torch, t) for name, t in DTYPE_NAMES.items()}


def corpus() -> list[str]:
    """Some of Python's own standard library sources: varied text for a 2048-token BPE."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:60]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def make_model(folder: Path, size: str, vocab: int, seed: int = 0) -> Path:
    """A seeded random model of `size` with its tokenizer, saved to `folder`."""
    tok = train_tokenizer(corpus(), vocab)
    torch.manual_seed(seed)
    cfg = MatFormerConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=1024,
                          **SIZES[size])
    save_model(MatFormerLM(cfg).eval(), folder)
    save_tokenizer(tok, folder)
    return folder


def ours(model: MatFormerLM, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(prompt tokens/s, decode tokens/s, tokens) of compiled greedy decoding."""
    out = generate(model, prompt, n, ignore_eos=True, compile=True)
    s = out.stats
    return len(prompt) / s.prefill_seconds, s.decode_tokens_per_s, out.tokens


def theirs(llm: Any, prompt: list[int], n: int) -> tuple[float, float, list[int]]:
    """(prompt tokens/s, decode tokens/s, tokens) of llama.cpp: the prompt in one eval, then a
    token per eval, greedy by numpy's argmax of the last logits."""
    vocab = llm.n_vocab()

    def last() -> int:  # the last position's logits, as llama.cpp left them (no copy)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    tok = last()
    t1 = time.perf_counter()
    toks = [tok]
    for _ in range(n - 1):
        llm.eval([tok])
        tok = last()
        toks.append(tok)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (n - 1) / (t2 - t1), toks


def bench_size(size: str, work: Path, args: Any) -> dict[str, Any]:
    from llama_cpp import Llama

    ckpt = Path(args.ckpt) if args.ckpt else make_model(work / size, size, args.vocab)
    models = {d: load_model(ckpt, dtype=OURS[d]).eval() for d in args.ours}
    cfg = next(iter(models.values())).config
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
    n_ctx = args.prompt_len + args.tokens + 8
    llms = {}
    for q in args.gguf:
        path = work / f"{size}-{q}.gguf"
        export_gguf(ckpt, path, outtype=q)
        kv = 0 if q == "f32" else 1  # GGML type of the KV cache: F32 for f32 weights, else F16
        llms[q] = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=args.prompt_len,
                        n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
                        type_k=kv, type_v=kv)
    runs: dict[str, list[tuple[float, float]]] = {}
    tokens: dict[str, list[int]] = {}
    for m in models.values():  # warm-up: compile every graph once, outside the timing
        ours(m, prompt, 4)
    for llm in llms.values():
        theirs(llm, prompt, 4)
    for _ in range(args.repeats):
        for name, m in models.items():
            pp, tg, tokens[f"ours {name}"] = ours(m, prompt, args.tokens)
            runs.setdefault(f"ours {name}", []).append((pp, tg))
        for q, llm in llms.items():
            pp, tg, tokens[f"llama.cpp {q}"] = theirs(llm, prompt, args.tokens)
            runs.setdefault(f"llama.cpp {q}", []).append((pp, tg))
    rows = {k: {"prompt_tokens_per_s": statistics.median(r[0] for r in v),
                "decode_tokens_per_s": statistics.median(r[1] for r in v),
                "runs": v} for k, v in runs.items()}
    ratios = {}
    for d in args.ours:
        for q in args.gguf:
            if (f"ours {d}" in rows) and (f"llama.cpp {q}" in rows) and (q == d or q == "q8_0"):
                a, b = rows[f"ours {d}"], rows[f"llama.cpp {q}"]
                ratios[f"ours {d} / llama.cpp {q}"] = {
                    "decode": a["decode_tokens_per_s"] / b["decode_tokens_per_s"],
                    "prompt": a["prompt_tokens_per_s"] / b["prompt_tokens_per_s"]}
    same = tokens.get("ours f32") == tokens.get("llama.cpp f32")
    return {"size": size, "config": SIZES.get(size, {"source": str(ckpt)}),
            "vocab_size": cfg.vocab_size,
            "non_embedding_params": parameter_counts(cfg)["non_embedding"],
            "rows": rows, "ratios": ratios, "greedy_f32_equal": same}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--sizes", default="demo,41.7M")
    p.add_argument("--ckpt", help="a real model instead of random weights (any source `load_model` "
                               "reads: a checkpoint folder, a GGUF file); --sizes then only names it")
    p.add_argument("--ours", default="f32,f16,bf16", help="our dtypes (f32, f16, bf16)")
    p.add_argument("--gguf", default="f32,f16,q8_0", help="GGUF types llama.cpp runs")
    p.add_argument("--threads", type=int, default=1, help="threads, both sides")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--json-out", default=str(RESULT))
    args = p.parse_args(argv)
    args.ours, args.gguf = args.ours.split(","), args.gguf.split(",")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in ([Path(args.ckpt).stem] if args.ckpt else args.sizes.split(",")):
            print(f"{size}: exporting and timing ...", file=sys.stderr)
            results.append(bench_size(size, Path(tmp), args))
    print(f"batch 1, {args.prompt_len}-token prompt, {args.tokens} new tokens, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'size':<7} {'runner':<16} {'prompt tok/s':>12} {'decode tok/s':>12}")
    for r in results:
        for name, row in r["rows"].items():
            print(f"{r['size']:<7} {name:<16} {row['prompt_tokens_per_s']:12.1f} "
                  f"{row['decode_tokens_per_s']:12.1f}")
        for name, x in r["ratios"].items():
            print(f"{r['size']:<7} {name}: decode {x['decode']:.2f}x, prompt {x['prompt']:.2f}x")
        print(f"{r['size']:<7} greedy tokens, f32: {'equal' if r['greedy_f32_equal'] else 'differ'}")
    import llama_cpp

    write_json(args.json_out, {
        "machine": hardware(), "llama_cpp_python": llama_cpp.__version__,
        "command": " ".join(["python -m benchmarks.speed.llamacpp_speed",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_at_end": list(os.getloadavg()), "threads": args.threads,
        "prompt_len": args.prompt_len, "new_tokens": args.tokens, "repeats": args.repeats,
        "results": results})
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
