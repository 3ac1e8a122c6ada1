"""Compilation paid once: `matformer generate --compile` twice, in new processes, one cache.

A checkpoint (random weights at the demo's shape or, --size 41.7M, the decode benchmark's,
with a tokenizer; or --ckpt)
is decoded by `matformer generate --compile` in a fresh interpreter, then again in another
fresh interpreter with the same compile cache (`$MATFORMER_CACHE/inductor`, an empty temporary
folder at the start). Each run's compile time is what the command reports on stderr
("compiled N graphs in X s (saved for later runs: N; ...)" the first time, "loaded N
precompiled graphs in X s (nothing traced or built; ...)" after), and its whole wall time is
measured around the process. The goal (issue 28): the second run's compile time
under 10% of the first's. `--step-time` then also times, in this process, the decode step
loaded precompiled against dynamo's compile of the same step (interleaved repeats). Writes
benchmarks/results/compile_cache.json.

    .venv/bin/python -m benchmarks.speed.compile_cache
    .venv/bin/python -m benchmarks.speed.compile_cache --size 41.7M --json-out \
        benchmarks/results/compile_cache-41.7M.json
    .venv/bin/python -m benchmarks.speed.compile_cache --ckpt runs/demo --runs 3
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, hardware, parser, write_json

RESULT = RESULTS / "compile_cache.json"
LINE = re.compile(r"((?:compiled|loaded) [^;()]*?) in ([\d.]+) s \(([^)]*)\)")


def _count(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m[1]) if m else 0


NO_DECODE_STEP = {"MATFORMER_DECODE_STEP": "0"}
"""What is measured is the compiled graphs' cache: with one thread a Llama-type model's steps
otherwise run as one C++ call each (`inference/decode_step.py`) and nothing is compiled."""


def demo_model(folder: Path, size: str = "demo") -> Path:
    """Random weights at `size` (llamacpp_speed.SIZES: the demo's ffn8-tiny shape or the
    41.7M decode benchmark's) with a byte-level BPE tokenizer."""
    from benchmarks.speed.llamacpp_speed import make_model

    return make_model(folder, size, 2048)


def one_run(ckpt: Path, cache: Path, tokens: int, threads: int) -> dict[str, Any]:
    """`matformer generate --compile` in a new process; its compile report and wall time."""
    env = {**os.environ, "MATFORMER_CACHE": str(cache), "OMP_NUM_THREADS": str(threads),
           **NO_DECODE_STEP}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "matformer.cli", "generate", str(ckpt), "--compile",
           "--prompt", "def main(", "--max-new-tokens", str(tokens), "--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    m = LINE.search(proc.stderr)
    if m is None:
        raise SystemExit(f"no compile report in generate's stderr:\n{proc.stderr[-2000:]}")
    what, detail = m[1], m[3]
    return {"wall_s": round(wall, 2), "compile_s": float(m[2]),
            "graphs_compiled": _count(r"compiled (\d+) graph", what),
            "graphs_loaded": _count(r"loaded (\d+) precompiled", what),
            "saved": _count(r"saved for later runs: (\d+)", detail),
            "summary": next(line for line in proc.stderr.splitlines() if m[0] in line),
            "report": proc.stderr.strip().splitlines()[-1]}


def step_times(ckpt: Path, cache: Path, threads: int, repeats: int = 5,
               steps: int = 64) -> dict[str, list[float]]:
    """ms per decode step (batch 1), the step loaded precompiled from `cache` vs dynamo's
    compile of it (`mode="default"`: the same inductor mode through `torch.compile`), in
    interleaved repeats of `steps` steps after 3 warm-up steps."""
    os.environ["MATFORMER_CACHE"] = str(cache)
    os.environ.update(NO_DECODE_STEP)
    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    import torch

    from matformer.inference.static_cache import StaticDecoder
    from matformer.io.checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(ckpt).eval()

    def ms(mode: str | None) -> float:
        dec = StaticDecoder(model, 1, 256, compile=True, mode=mode)
        tok = dec.prefill([torch.arange(1, 9)]).argmax(-1)[:, None]
        with torch.inference_mode():
            for _ in range(3):
                tok = dec.step(tok).argmax(-1)[:, None]
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = dec.step(tok).argmax(-1)[:, None]
        return round((time.perf_counter() - t0) / steps * 1e3, 3)

    out: dict[str, list[float]] = {"precompiled": [], "dynamo": []}
    for _ in range(repeats):
        out["precompiled"].append(ms(None))
        out["dynamo"].append(ms("default"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--ckpt", help="checkpoint with tokenizer.json (default: random weights)")
    p.add_argument("--size", default="demo", help="the random model's shape: demo or 41.7M")
    p.add_argument("--runs", type=int, default=2, help="processes in a row (the first builds)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--step-time", action="store_true",
                   help="also time the loaded step against dynamo's compile of it")
    p.add_argument("--json-out", default=str(RESULT))
    args = p.parse_args(argv)
    steps: dict[str, list[float]] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else demo_model(Path(tmp) / "model", args.size)
        cache = Path(tmp) / "cache"
        runs = []
        for i in range(args.runs):
            runs.append(one_run(ckpt, cache, args.tokens, args.threads))
            r = runs[-1]
            print(f"run {i + 1}: compile {r['compile_s']:7.2f} s of {r['wall_s']:7.1f} s wall; "
                  f"graphs compiled {r['graphs_compiled']} (saved {r['saved']}), loaded "
                  f"precompiled {r['graphs_loaded']}")
        if args.step_time:
            steps = step_times(ckpt, cache, args.threads)
            for name, v in steps.items():
                print(f"decode step, {name:11s}: median {statistics.median(v):.3f} ms "
                      f"({', '.join(map(str, v))})")
    first = runs[0]["compile_s"]
    ratios = [r["compile_s"] / first if first > 0 else float("nan") for r in runs[1:]]
    goal = all(x < 0.10 for x in ratios)
    print(f"later runs' compile time / first's: {', '.join(f'{x:.3f}' for x in ratios)} "
          f"(goal < 0.10: {'met' if goal else 'NOT met'})")
    write_json(args.json_out, {
        "machine": hardware(), "ckpt": args.ckpt or f"random weights, {args.size} shape",
        "command": " ".join(["python -m benchmarks.speed.compile_cache",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(), "runs": runs, "ratios": ratios, "goal_met": goal,
        **({"step_ms": steps} if steps is not None else {})})
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
