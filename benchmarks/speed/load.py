"""Checkpoint loading: `matformer.load_model` vs transformers' `LlamaForCausalLM.from_pretrained`.

A Llama checkpoint of about --size MB is written by transformers' `save_pretrained` in 4 shards.
Each loader then runs in its own fresh subprocess (alternating, --repeats times each): the time
from the call to the end of the first forward pass (1 x 16 tokens), and the process's peak RSS
(VmHWM, which counts the mapped file pages a process touches as well as its own memory; not
ru_maxrss, which a child inherits from its parent across exec).
Both loaders read the same files with a warm page cache. Reported: medians and our/transformers
ratios. Goal (issue 3): time <= 1.0x, peak memory <= 1.05x.

    .venv/bin/python -m benchmarks.speed.load             # ~250 MB, about a minute on 2 cores
    .venv/bin/python -m benchmarks.speed.load --size 1000 # the ~1 GB checkpoint of the issue
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, parser, write_json

CHILD = r"""
import json, sys, time
import torch

def status(key):  # bytes; VmHWM is the peak RSS of this process image (reset by exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

torch.set_num_threads(int(sys.argv[3]))
which, path = sys.argv[1], sys.argv[2]
if which == "transformers":
    from transformers import LlamaForCausalLM
else:
    from matformer import load_model
ids = torch.arange(16).view(1, 16)
base_rss = status("VmRSS")
t0 = time.perf_counter()
if which == "transformers":
    model = LlamaForCausalLM.from_pretrained(path, dtype="auto")
    with torch.no_grad():
        logits = model(ids).logits
else:
    model = load_model(path)
    with torch.no_grad():
        logits = model(ids)
elapsed = time.perf_counter() - t0
peak = status("VmHWM")
print(json.dumps({"seconds": elapsed, "peak_rss": peak, "base_rss": base_rss,
                  "checksum": float(logits.float().abs().sum())}))
"""


def build_checkpoint(folder: Path, size_mb: float, dtype: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    itemsize = 2 if dtype == "bfloat16" else 4
    hidden, inter, vocab = 768, 3072, 16000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    emb = 2 * vocab * hidden
    layers = max(1, round((size_mb * 1e6 / itemsize - emb) / per_layer))
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=12,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # A shard limit a little above a quarter of the bytes gives 4 shards.
    model.save_pretrained(folder, max_shard_size=int(nbytes / 4 * 1.08))
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    return {"layers": layers, "hidden_size": hidden, "intermediate_size": inter, "vocab_size": vocab,
            "dtype": dtype, "tensor_bytes": nbytes, "shards": len(shards)}


def run_child(which: str, path: Path, threads: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", CHILD, which, str(path), str(threads)],
                       capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{which} loader failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--size", type=float, default=250, help="checkpoint size in MB (default 250)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3, help="runs per loader (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each loader process")
    ap.add_argument("--out", default=str(RESULTS / "load.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="matformer-load-bench-") as tmp:
        folder = Path(tmp) / "llama"
        t = time.perf_counter()
        ck = build_checkpoint(folder, args.size, args.dtype)
        print(f"checkpoint: {ck['tensor_bytes'] / 1e6:.0f} MB in {ck['shards']} shards "
              f"({ck['layers']} layers, {ck['dtype']}), written by transformers in "
              f"{time.perf_counter() - t:.1f}s")
        runs: dict[str, list[dict]] = {"matformer": [], "transformers": []}
        run_child("matformer", folder, args.threads)  # warm the page cache; not counted
        for _ in range(args.repeats):
            for which in ("transformers", "matformer"):  # alternate: noise hits both
                runs[which].append(run_child(which, folder, args.threads))
        c = {w: r[0]["checksum"] for w, r in runs.items()}
        same = abs(c["matformer"] - c["transformers"]) <= 1e-3 * abs(c["transformers"])

    def med(which: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[which])

    rows = []
    for which in ("transformers", "matformer"):
        rows.append({"loader": which, "seconds": med(which, "seconds"),
                     "peak_rss_mb": med(which, "peak_rss") / 1e6,
                     "rss_after_imports_mb": med(which, "base_rss") / 1e6,
                     "peak_minus_imports_mb": (med(which, "peak_rss") - med(which, "base_rss")) / 1e6})
    ratio = {"time": rows[1]["seconds"] / rows[0]["seconds"],
             "peak_rss": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
             "peak_minus_imports": rows[1]["peak_minus_imports_mb"] / rows[0]["peak_minus_imports_mb"]}
    print(f"\n{'loader':<14}{'call->1st forward s':>21}{'peak RSS MB':>13}{'after imports MB':>18}"
          f"{'peak-imports MB':>17}")
    for r in rows:
        print(f"{r['loader']:<14}{r['seconds']:>21.3f}{r['peak_rss_mb']:>13.0f}"
              f"{r['rss_after_imports_mb']:>18.0f}{r['peak_minus_imports_mb']:>17.0f}")
    print(f"{'ratio (ours/hf)':<14}{ratio['time']:>21.2f}{ratio['peak_rss']:>13.2f}{'':>18}"
          f"{ratio['peak_minus_imports']:>17.2f}")
    print(f"same logits: {same}")
    out = Path(args.out)
    write_json(out, {"checkpoint": ck, "repeats": args.repeats, "threads": args.threads,
                               "results": rows, "ratios": ratio, "same_logits": same,
                               "runs": runs, "command": " ".join(["python -m benchmarks.speed.load", *sys.argv[1:]])})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
