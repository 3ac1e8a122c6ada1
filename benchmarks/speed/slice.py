"""Streaming extraction vs the naive path: wall time, bytes read, peak RSS.

Builds a synthetic sharded float32 checkpoint of about --size-mb (H=1024, FFN 4096, vocab 16000;
the layer count sets the size; the largest tensor is the 65.5 MB embedding / lm_head), then cuts
it to tier 3 and to a Mix'n'Match budget two ways, each in its own fresh interpreter:

- streaming: `matformer.slice_checkpoint` (pread of the needed prefix of each tensor, written by
  the checkpoint writer, freed before the next);
- naive: `safetensors.torch.load_file` of every shard, slice + copy every FFN tensor,
  `huggingface_hub.save_torch_state_dict` (sharded) + config.json, then fsync of the written files
  (the streaming writer fsyncs too; the time without that fsync is reported beside it).

Before each run the source shards are fsynced and dropped from the page cache (posix_fadvise
DONTNEED), so `read_bytes` (from /proc/self/io) is what came from storage. Peak RSS is VmHWM
after resetting it once imports are done; "interpreter" is the RSS at that point. Timings are
medians of --repeats runs and are noisy on a shared machine.

    .venv/bin/python -m benchmarks.speed.slice                  # ~1 GB, about 2 minutes on 2 cores
    .venv/bin/python -m benchmarks.speed.slice --size-mb 200    # a quick look
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, parser, write_json

H, FFN, VOCAB = 1024, 4096, 16000

_CHILD = r"""
import json, os, sys, time
method, src, out, what = sys.argv[1:5]
import torch  # noqa: F401  (imports happen before the clock and the peak reset)
from matformer.models.lm.config import MatFormerConfig
from matformer.slicing.extract import plan_slice, slice_checkpoint, parse_count
if method == "naive":
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file
    from matformer.io.layout import resolve_files

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def io():
    return {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/io")}

kwargs = {"tier": int(what[5:])} if what.startswith("tier=") else {"budget": parse_count(what[7:])}
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM: measure the work, not imports
except OSError:
    pass
rss0, io0, t0 = status("VmRSS"), io(), time.perf_counter()
if method == "stream":
    r = slice_checkpoint(src, out, **kwargs)
    logical = r.bytes_read
else:
    source = MatFormerConfig.from_json_file(os.path.join(src, "config.json"))
    plan = plan_slice(source, **kwargs)
    sd = {}
    for shard in resolve_files(src).shards:
        sd.update(load_file(os.path.join(src, shard)))
    logical = sum(v.numel() * v.element_size() for v in sd.values())
    for k in list(sd):
        if ".mlp." in k:
            m = plan.widths[int(k.split(".")[2])]
            sd[k] = (sd[k][:, :m] if "down_proj" in k else sd[k][:m]).clone()  # own storage
    os.makedirs(out, exist_ok=True)
    save_torch_state_dict(sd, out, max_shard_size="5GB")
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(plan.config.to_json_string())
    del sd
    nosync = time.perf_counter() - t0
    # Same durability as the streaming writer, which fsyncs every file before the rename.
    for name in os.listdir(out):
        fd = os.open(os.path.join(out, name), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
wall = time.perf_counter() - t0
if method == "stream":
    nosync = None
io1 = io()
print(json.dumps({"wall_s": wall, "wall_nosync_s": nosync, "rss0": rss0, "hwm": status("VmHWM"),
                  "read_bytes": io1["read_bytes"] - io0["read_bytes"],
                  "rchar": io1["rchar"] - io0["rchar"], "logical_read": logical}))
"""


def build_source(folder: Path, size_mb: int, shard: str) -> dict:
    import torch

    from matformer.io.checkpoint import write_checkpoint
    from matformer.models.lm.config import MatFormerConfig
    from matformer.models.lm.shapes import expected_shapes

    per_layer = (4 * H * H + 3 * H * FFN + 2 * H) * 4
    emb = 2 * VOCAB * H * 4
    layers = max(1, round((size_mb * 1e6 - emb) / per_layer))
    cfg = MatFormerConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FFN,
                          num_hidden_layers=layers, num_attention_heads=16,
                          max_position_embeddings=512)
    shapes = expected_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    # Tensors are generated one at a time: building the source needs no more memory than slicing.
    write_checkpoint(folder, cfg, [(n, "F32", s) for n, s in shapes.items()],
                     lambda n: torch.randn(shapes[n], generator=gen) * 0.02, max_shard_size=shard)
    sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
    largest = max(int(torch.Size(s).numel()) * 4 for s in shapes.values())
    return {"layers": layers, "bytes": sum(sizes), "shards": len(sizes), "largest_tensor": largest,
            "config": cfg}


def drop_cache(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(method: str, src: Path, out: Path, what: str) -> dict:
    drop_cache(src)
    proc = subprocess.run([sys.executable, "-c", _CHILD, method, str(src), str(out), what],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--size-mb", type=int, default=1000, help="source checkpoint size (default 1000: the issue's ~1 GB)")
    ap.add_argument("--shard-size", default="200MB", help="source shard limit (default 200MB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp folder)")
    ap.add_argument("--json", default=str(RESULTS / "slice.json"))
    args = ap.parse_args()

    from matformer.models.lm.shapes import non_embedding_parameters

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        src = root / "src"
        print(f"building a ~{args.size_mb} MB source checkpoint in {src} ...", flush=True)
        info = build_source(src, args.size_mb, args.shard_size)
        cfg = info.pop("config")
        # budget halfway between uniform tier 2 and tier 1: a real Mix'n'Match of two widths
        L = cfg.num_hidden_layers
        t2 = non_embedding_parameters(cfg, [FFN >> 2] * L)
        t1 = non_embedding_parameters(cfg, [FFN >> 1] * L)
        budget = (t1 + t2) // 2
        tasks = {"tier 3": "tier=3", f"budget {budget / 1e6:.1f}M": f"budget={budget}"}
        rows = []
        for label, what in tasks.items():
            res: dict[str, list[dict]] = {"stream": [], "naive": []}
            for rep in range(args.repeats):
                for method in ("stream", "naive"):
                    res[method].append(run_child(method, src, root / f"out-{method}-{rep}", what))
            row = {"task": label}
            for method, runs in res.items():
                row[method] = {
                    "wall_s": statistics.median(r["wall_s"] for r in runs),
                    "wall_s_all": [round(r["wall_s"], 3) for r in runs],
                    "wall_nosync_s": (statistics.median(r["wall_nosync_s"] for r in runs)
                                      if runs[0]["wall_nosync_s"] is not None else None),
                    "peak_rss": max(r["hwm"] for r in runs),
                    "interpreter_rss": statistics.median(r["rss0"] for r in runs),
                    "peak_growth": max(r["hwm"] - r["rss0"] for r in runs),
                    "read_bytes": statistics.median(r["read_bytes"] for r in runs),
                    "logical_read": runs[0]["logical_read"],
                }
            s, n = row["stream"], row["naive"]
            row["speedup"] = n["wall_s"] / s["wall_s"]
            row["stream_peak_over_largest"] = s["peak_growth"] / info["largest_tensor"]
            row["goal_rss"] = s["peak_rss"] < s["interpreter_rss"] + 1.5 * info["largest_tensor"]
            rows.append(row)

    mb = 1e6
    print(f"\nsource: {info['bytes'] / mb:.0f} MB in {info['shards']} shards, {info['layers']} "
          f"layers, largest tensor {info['largest_tensor'] / mb:.1f} MB (float32)")
    hdr = (f"{'task':<16}{'method':<8}{'wall s':>8}{'read MB':>10}{'disk MB':>10}"
           f"{'peak RSS MB':>13}{'growth MB':>11}")
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        for method in ("stream", "naive"):
            r = row[method]
            print(f"{row['task']:<16}{method:<8}{r['wall_s']:>8.2f}{r['logical_read'] / mb:>10.0f}"
                  f"{r['read_bytes'] / mb:>10.0f}{r['peak_rss'] / mb:>13.0f}"
                  f"{r['peak_growth'] / mb:>11.0f}")
        print(f"{'':<16}naive without its fsync: {row['naive']['wall_nosync_s']:.2f} s")
        print(f"{'':<16}speedup {row['speedup']:.2f}x; streaming peak growth = "
              f"{row['stream_peak_over_largest']:.2f}x the largest tensor; "
              f"peak < interpreter + 1.5x largest: {row['goal_rss']}")
    out = Path(args.json)
    write_json(out, {"source": info, "repeats": args.repeats, "rows": rows})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
