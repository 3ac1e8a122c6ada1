"""`matformer serve --speculative auto` against `off` (and `always`) at low load.

Speculation is for the latency-bound case: one request decoding alone. One server per mode is
started on the same checkpoint (`matformer serve SRC --speculative MODE`, --threads each), and
the same requests are sent one at a time, the modes taking turns request by request (a burst of
load on this shared machine then falls on every mode alike). Each request streams --max-tokens
tokens greedily with EOS ignored; per mode: per-token latency (a request's first to last token
over its tokens - 1; p50 and mean), end-to-end seconds per token, the drafted and accepted tokens
from each response's `usage.speculative`, and whether every mode gave the same text (greedy:
they must). One warm-up request per server is not counted (it loads lazily what the first
request needs; `auto` measures its costs then, once per width and process).

Checkpoints: every --src, and (unless --no-synthetic) a synthetic one built here where drafts
agree by construction: a random-init model (--hidden, --ffn, --layers; FFN-heavy, so a narrow
tier's step is cheap) whose FFN units beyond the narrowest tier (tier 3) are scaled by
--tail-scale (each value one checkpoint), so the widths disagree only a little -- the regime where a nested draft can pay.
Random init makes no useful text: it measures the server's machinery (does `auto` find the
draft, keep it, and how much faster is it), not a trained model's acceptance. Prints a table
and writes benchmarks/results/serve_speculative.json.

    python -m benchmarks.serve_speculative --src /path/to/trained/checkpoint
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, hardware, parser, write_json
from benchmarks.serve import free_port, start, stop

RESULT = RESULTS / "serve_speculative.json"


def synthetic(folder: Path, hidden: int, ffn: int, layers: int, vocab: int,
              tail_scale: float) -> Path:
    """A random-init checkpoint whose FFN beyond tier 3 is scaled by `tail_scale` (with a BPE
    tokenizer trained on the standard library's source)."""
    import torch

    from matformer.data.text import load_texts, save_tokenizer, train_tokenizer
    from matformer.io.checkpoint import save_model
    from matformer.models.lm.config import MatFormerConfig
    from matformer.models.lm.model import MatFormerLM

    torch.manual_seed(0)
    config = MatFormerConfig.from_preset("ffn8-small", hidden_size=hidden, intermediate_size=ffn,
                                         num_hidden_layers=layers,
                                         num_attention_heads=hidden // 64,
                                         num_key_value_heads=2, vocab_size=vocab,
                                         max_position_embeddings=1024)
    model = MatFormerLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, model.base_width >> 3:] *= tail_scale
    save_model(model, folder)
    save_tokenizer(train_tokenizer(load_texts(None, max_bytes=1 << 20), vocab), folder)
    return folder


def prompts(src: Path, n: int, length: int) -> list[list[int]]:
    """`n` prompts of `length` token ids: windows of the standard library's source."""
    from matformer.data.text import load_texts, load_tokenizer

    tok = load_tokenizer(src)
    text = "\n".join(load_texts(None, max_bytes=1 << 18))
    ids = tok.encode(text).ids
    step = max(length, (len(ids) - length) // n)
    return [ids[i * step:i * step + length] for i in range(n)]


def one(url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed greedy completion: token arrival times, text, usage."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    text, usage = [], {}
    with httpx.Client(timeout=600) as http, http.stream("POST", url + "/v1/completions",
                                                        json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            usage = obj.get("usage") or usage
            for c in obj.get("choices") or []:
                if c.get("text"):
                    times.append(time.perf_counter())
                    text.append(c["text"])
    n = usage.get("completion_tokens", len(times))
    return {"text": "".join(text), "tokens": n, "seconds": time.perf_counter() - t0,
            "tpot": (times[-1] - times[0]) / (n - 1) if len(times) > 1 and n > 1 else None,
            "speculative": usage.get("speculative", {})}


def compare(label: str, src: Path, modes: list[str], args: Any) -> dict[str, Any]:
    """Every mode's server on `src`, the requests one at a time, modes taking turns."""
    from matformer.serving.server import served_name

    name = served_name(src)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    servers: dict[str, tuple[Any, str]] = {}
    try:
        for mode in modes:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [sys.executable, "-m", "matformer.cli", "serve", str(src), "--port", str(port),
                   "--threads", str(args.threads), "--speculative", mode]
            servers[mode] = (start(cmd, url, "/health", env), url)
        asks = prompts(src, args.requests + 1, args.prompt_tokens)
        for mode in modes:  # warm-up, not counted
            one(servers[mode][1], name, asks[-1], args.max_tokens)
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for i, prompt in enumerate(asks[:-1]):
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for mode in order:
                runs[mode].append(one(servers[mode][1], name, prompt, args.max_tokens))
    finally:
        for proc, _ in servers.values():
            stop(proc)
    out: dict[str, Any] = {"src": str(src), "model": name, "modes": {}}
    texts = [[r["text"] for r in runs[m]] for m in modes]
    out["identical_text"] = all(t == texts[0] for t in texts)
    for mode in modes:
        rs = runs[mode]
        tpot = [r["tpot"] for r in rs if r["tpot"] is not None]
        drafted = sum(r["speculative"].get("drafted", 0) for r in rs)
        accepted = sum(r["speculative"].get("accepted", 0) for r in rs)
        out["modes"][mode] = {
            "tpot_p50_ms": 1e3 * statistics.median(tpot), "tpot_mean_ms": 1e3 * statistics.mean(tpot),
            "seconds_per_token_ms": 1e3 * sum(r["seconds"] for r in rs) / sum(r["tokens"]
                                                                             for r in rs),
            "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None,
            "tpot_ms": [1e3 * t for t in tpot]}
    off = out["modes"].get("off")
    for mode, r in out["modes"].items():
        if off is not None:
            r["speedup_vs_off"] = off["tpot_mean_ms"] / r["tpot_mean_ms"]
        print(f"{label:>10} {mode:>7}: per token p50 {r['tpot_p50_ms']:7.2f} ms, mean "
              f"{r['tpot_mean_ms']:7.2f} ms ({r.get('speedup_vs_off', 1):.2f}x off), drafted "
              f"{r['drafted']}, accepted {r['accepted']}", flush=True)
    return out


def main() -> int:
    p = parser(__doc__, full_doc=True)
    p.add_argument("--src", action="append", default=[], help="a checkpoint (repeatable)")
    p.add_argument("--no-synthetic", action="store_true")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tail-scale", default="0.02,0.1",
                   help="one synthetic checkpoint per value (comma-separated)")
    p.add_argument("--modes", default="off,auto,always")
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every server")
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args()
    modes = args.modes.split(",")
    doc: dict[str, Any] = {"command": " ".join(["python -m benchmarks.serve_speculative",
                                                *sys.argv[1:]]),
                           "hardware": hardware(), "requests": args.requests,
                           "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens,
                           "threads": args.threads, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
                           "runs": {}}
    with tempfile.TemporaryDirectory() as d:
        for scale in [] if args.no_synthetic else [float(s) for s in args.tail_scale.split(",")]:
            label = f"tail-{scale:g}"
            folder = synthetic(Path(d) / label, args.hidden, args.ffn, args.layers, args.vocab,
                               scale)
            doc["synthetic"] = {"hidden": args.hidden, "ffn": args.ffn, "layers": args.layers,
                                "vocab": args.vocab}
            doc["runs"][label] = compare(label, folder, modes, args)
        for src in args.src:
            doc["runs"][Path(src).name] = compare(Path(src).name, Path(src), modes, args)
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
