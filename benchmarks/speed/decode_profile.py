"""Where a decode step's time goes: the compiled one-token step against the compiled k-token
verify, per operator (torch.profiler), at the full width and at the draft tier.

Speculative decoding pays when a (k+1)-token verify costs about one step. On a memory-bound
device the weights are read once either way; this profile shows what else grows with the token
count (attention over the cache, the matmuls' kernel choice, the pointwise work) so the docs can
say why a verify costs what it costs.

    .venv/bin/python -m benchmarks.speed.decode_profile --ckpt runs/bench-decode/ffn8-h512 --threads 2
    .venv/bin/python -m benchmarks.speed.decode_profile --random --quick      # smoke run
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import RESULTS, parser, write_json
from benchmarks.speed.decode import random_model
from matformer import MatFormerLM
from matformer.inference.static_cache import StaticDecoder


def _model(args) -> MatFormerLM:
    if args.random:
        return random_model(args)
    from matformer.io.checkpoint import load_model

    return load_model(args.ckpt).eval()


def _call(dec: StaticDecoder, toks: torch.Tensor) -> None:
    at = dec.pos
    dec.forward(toks)
    dec.crop(at)


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _ops(fn, reps: int, top: int) -> list[dict]:
    """The `top` operators by self CPU time per call (ms), over `reps` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls_per_forward": e.count / reps,
             "self_ms_per_forward": e.self_cpu_time_total / 1e3 / reps} for e in rows[:top]]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--random", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ks", default="1,2,4", help="draft lengths: verify k+1 tokens")
    ap.add_argument("--tiers", default="0,3")
    ap.add_argument("--position", type=int, default=48, help="filled cache columns")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="with --random (a checkpoint loads on the CPU)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="with --random")
    ap.add_argument("--out", default=str(RESULTS / "decode_profile.json"))
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.vocab = 64, 256, 2, 4, 2, 256
        args.reps, args.ks, args.position = 3, "1", 8
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _model(args)
    dec = StaticDecoder(model, 1, 256, compile=True)
    with torch.inference_mode():
        dec.prefill([torch.arange(args.position, device=dec.device) % model.config.vocab_size])
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    for tier in (int(t) for t in args.tiers.split(",")):
        model.set_widths(tier=tier)
        for n in (1, *(k + 1 for k in ks)):
            toks = torch.zeros(1, n, dtype=torch.long, device=dec.device)
            with torch.inference_mode():
                ms = _median_ms(lambda toks=toks: _call(dec, toks), args.reps)
                ops = _ops(lambda toks=toks: _call(dec, toks), args.reps, args.top)
            rows.append({"tier": tier, "tokens": n, "ms": ms, "ops": ops})
            print(f"\ntier {tier}, {n} token(s): {ms:.2f} ms per forward (median of {args.reps})")
            for o in ops:
                print(f"  {o['self_ms_per_forward']:8.3f} ms  x{o['calls_per_forward']:<5.0f} {o['op'][:90]}")
    model.set_widths(tier=0)
    step = {r["tier"]: r["ms"] for r in rows if r["tokens"] == 1}
    print("\nforward cost relative to the same tier's one-token step:")
    for r in rows:
        r["vs_step"] = r["ms"] / step[r["tier"]]
        print(f"  tier {r['tier']}, {r['tokens']} tokens: {r['vs_step']:.2f}x")
    out = Path(args.out)
    write_json(out, {"benchmark": "decode_profile", "args": vars(args),
                               "torch": torch.__version__, "machine": platform.machine(),
                               "threads": torch.get_num_threads(),
                               "config": model.config.to_dict(), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
