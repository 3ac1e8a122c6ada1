"""`--draft-tier auto` on its first call in a process vs plain decoding (issue 28).

`auto` must never be slower than plain decoding by more than noise, on its first call too (where
nothing it could reuse has been measured yet). Each repeat is a fresh interpreter (so `auto`'s
call is really its first in the process): it loads the checkpoint, warms plain decoding up
(4 tokens), then runs plain decoding (`generate`), `speculative_generate(draft_tier="auto")`,
plain, `auto` again and plain, on the chat prompt, each timed in wall seconds and in the
process's CPU seconds. Each `auto` call is compared with the mean of the plain calls just
before and after it (drift in the machine's load cancels to first order). On a shared machine
the CPU time is the steadier measure: other processes' load adds wall time, not this process's
CPU time (memory-bandwidth contention still shows in both). The medians over the processes are
reported, and every `auto` output is checked to be token for token plain decoding's. Writes
benchmarks/results/auto_first_call.json.

    matformer convert SmolLM2-135M-Instruct.Q4_1.gguf -o runs/smol-mat --calibration builtin:kjv
    .venv/bin/python -m benchmarks.speed.auto_first_call --ckpt runs/smol-mat --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import RESULTS, hardware, parser, write_json

RESULT = RESULTS / "auto_first_call.json"
PROMPT = "Why is the sky blue? Answer in one sentence."


def worker(ckpt: str, tokens: int) -> dict[str, Any]:
    """One process: plain, first-call auto, plain, second-call auto, plain; each call's wall
    and CPU seconds, and whether auto's tokens are plain decoding's."""
    import torch
    from transformers import AutoTokenizer

    from matformer import generate, load_model, speculative_generate

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(ckpt)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                   add_generation_prompt=True, tokenize=False)
    ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
    model = load_model(ckpt, dtype="float32").eval()
    generate(model, ids, max_new_tokens=4, ignore_eos=True)  # warm-up (a user's run has none)

    def timed(fn: Any) -> tuple[float, float, Any]:
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - w, time.process_time() - c, out

    def plain() -> Any:
        return generate(model, ids, max_new_tokens=tokens, ignore_eos=True)

    def auto() -> Any:
        return speculative_generate(model, ids, max_new_tokens=tokens, draft_tier="auto",
                                    ignore_eos=True)

    calls = [timed(f) for f in (plain, auto, plain, auto, plain)]
    (p1w, p1c, p), (a1w, a1c, a), (p2w, p2c, _), (a2w, a2c, a2), (p3w, p3c, _) = calls
    choice = a.extra.get("choice")
    return {"wall_s": [c[0] for c in calls], "cpu_s": [c[1] for c in calls],
            "first_call_ratio_wall": (p1w + p2w) / 2 / a1w,
            "first_call_ratio_cpu": (p1c + p2c) / 2 / a1c,
            "second_call_ratio_wall": (p2w + p3w) / 2 / a2w,
            "second_call_ratio_cpu": (p2c + p3c) / 2 / a2c,
            "plain_tokens_per_s": tokens / p1w,
            "identical": a.tokens == p.tokens and a2.tokens == p.tokens,
            "chose": getattr(choice, "draft", None), "reason": getattr(choice, "reason", None),
            "drafted": a.stats.drafted, "draft_forwards": a.stats.draft_forwards,
            "target_forwards": a.stats.target_forwards,
            "choosing_seconds": a.extra.get("choosing_seconds"), "probe": a.extra.get("probe")}


def main() -> None:
    ap = parser(__doc__, full_doc=True)
    ap.add_argument("--ckpt", required=True, help="a nested checkpoint (e.g. a convert of the "
                                                  "SmolLM2 GGUF)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json-out", default=str(RESULT))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.ckpt, args.tokens)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    hw = hardware()
    runs = []
    for r in range(args.repeats):
        cmd = [sys.executable, "-m", "benchmarks.speed.auto_first_call", "--worker",
               "--ckpt", args.ckpt, "--tokens", str(args.tokens)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True,
                             timeout=900)
        run = json.loads(res.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"repeat {r + 1}: plain {run['plain_tokens_per_s']:.2f} tok/s; auto/plain, first "
              f"call: wall {run['first_call_ratio_wall']:.3f}x, CPU "
              f"{run['first_call_ratio_cpu']:.3f}x; second call: wall "
              f"{run['second_call_ratio_wall']:.3f}x, CPU {run['second_call_ratio_cpu']:.3f}x; "
              f"identical {run['identical']}; chose {run['chose'] or 'plain'} ({run['reason']})",
              flush=True)
    med = {k: round(statistics.median(r[k] for r in runs), 4)
           for k in ("first_call_ratio_wall", "first_call_ratio_cpu", "second_call_ratio_wall",
                     "second_call_ratio_cpu", "plain_tokens_per_s")}
    print(f"\n{args.repeats} processes, {args.tokens} tokens, medians (auto tokens/s over plain "
          f"tokens/s, plain timed before and after each auto call):\n"
          f"| `auto` call | wall time | CPU time |\n|---|---|---|\n"
          f"| first in the process | {med['first_call_ratio_wall']:.3f}x | "
          f"{med['first_call_ratio_cpu']:.3f}x |\n"
          f"| second | {med['second_call_ratio_wall']:.3f}x | "
          f"{med['second_call_ratio_cpu']:.3f}x |\n"
          f"plain: {med['plain_tokens_per_s']:.2f} tokens/s (wall); identical output: "
          f"{all(r['identical'] for r in runs)}")
    write_json(args.json_out, {
        "benchmark": "auto_first_call", "ckpt": args.ckpt, "tokens": args.tokens,
        "threads": args.threads, "prompt": PROMPT, "hardware": hw,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "medians": med, "all_identical": all(r["identical"] for r in runs), "runs": runs})
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
