"""The CPU decoding step three ways: compiled with `inference/row_kernel.py`'s C++ kernels off,
compiled with them on, and as one C++ call (`inference/decode_step.py`).

A seeded random model of the 41.7M benchmark shape (`llamacpp_speed.SIZES`) in each dtype, at
tiers 0 and 3, one thread; a forward of 1 token (a step) and of 3 (a verify of 2 drafts). Two
`StaticDecoder`s per case: a compiled one (`MATFORMER_DECODE_STEP=0` when it is made), timed
with the kernels off and on in turn (`row_kernel.ENABLED`, which the compiled step's guards
read, so each setting runs its own graph), and one whose forwards are the C++ step. 64 forwards
after a 64-token prompt, repeats interleaved, medians. Prints ms a forward and the ratios to
the compiled step without kernels; writes benchmarks/results/row_kernel.json.

    .venv/bin/python -m benchmarks.speed.row_kernel
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, dtypes_arg, hardware, parser, write_json
from benchmarks.speed.llamacpp_speed import SIZES
from matformer.inference import decode_step, row_kernel
from matformer.inference.static_cache import StaticDecoder
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM


def forward_ms(dec: StaticDecoder, kernels: bool, tokens: int, steps: int) -> float:
    """ms a forward of `tokens` tokens, over `steps` forwards after the prompt (each cropped
    away again), with the kernels on or off (for a compiled decoder)."""
    row_kernel.ENABLED = kernels
    ids = torch.arange(5, 5 + tokens)[None]
    dec.crop(64)
    dec.forward(ids)  # this setting's graph (compiled on its first use)
    dec.crop(64)
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.forward(ids)
        dec.crop(64)
    return 1e3 * (time.perf_counter() - t0) / steps


def decoder(model: MatFormerLM, steps: int, native: bool) -> StaticDecoder:
    """A compiled decoder with the prompt in; `native`: its forwards are the C++ step."""
    os.environ[decode_step.ENV] = "1" if native else "0"
    try:
        dec = StaticDecoder(model, 1, 64 + steps + 8, compile=True)
    finally:
        del os.environ[decode_step.ENV]
    assert dec.native == native and (not native or dec._plan() is not None)
    dec.prefill([torch.arange(64)])
    return dec


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--size", default="41.7M", choices=sorted(SIZES))
    p.add_argument("--dtypes", default="f32,f16")
    p.add_argument("--tiers", default="0,3")
    p.add_argument("--tokens", default="1,3", help="tokens per forward: 1 a step, k+1 a verify")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json-out", default=str(RESULTS / "row_kernel.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    if not row_kernel.available():
        p.error("the C++ kernels do not build here (no C++ compiler, or no AVX2/AVX-512 CPU)")
    doc: dict[str, Any] = {"command": " ".join(["python -m benchmarks.speed.row_kernel",
                                                *sys.argv[1:]]),
                           "hardware": hardware(), "threads": 1, "isa": row_kernel.isa(),
                           "rows": []}
    print(f"{args.size}, 1 thread, {args.steps} forwards after a 64-token prompt, median of "
          f"{args.repeats} interleaved repeats; ms a forward")
    print(f"{'dtype':>5} {'tier':>4} {'tokens':>6} {'compiled':>9} {'+kernels':>9} "
          f"{'C++ step':>9} {'+k/comp':>8} {'step/comp':>9}")
    for name, dtype in dtypes_arg(p, "--dtypes", args.dtypes).items():
        torch.manual_seed(0)
        cfg = MatFormerConfig(vocab_size=2048, max_position_embeddings=1024, **SIZES[args.size])
        model = MatFormerLM(cfg).eval().to(dtype)
        for tier in (int(t) for t in args.tiers.split(",")):
            model.set_widths(tier=tier)
            compiled, native = decoder(model, args.steps, False), decoder(model, args.steps, True)
            for tokens in (int(t) for t in args.tokens.split(",")):
                runs: dict[str, list[float]] = {"compiled": [], "kernels": [], "step": []}
                for _ in range(args.repeats):
                    runs["compiled"].append(forward_ms(compiled, False, tokens, args.steps))
                    runs["kernels"].append(forward_ms(compiled, True, tokens, args.steps))
                    runs["step"].append(forward_ms(native, True, tokens, args.steps))
                ms = {k: statistics.median(v) for k, v in runs.items()}
                doc["rows"].append({"dtype": name, "tier": tier, "tokens": tokens,
                                    "compiled_ms": ms["compiled"], "kernels_ms": ms["kernels"],
                                    "decode_step_ms": ms["step"], "runs": runs})
                print(f"{name:>5} {tier:4d} {tokens:6d} {ms['compiled']:9.2f} "
                      f"{ms['kernels']:9.2f} {ms['step']:9.2f} "
                      f"{ms['kernels'] / ms['compiled']:7.2f}x "
                      f"{ms['step'] / ms['compiled']:8.2f}x", flush=True)
    row_kernel.refresh()
    write_json(args.json_out, doc)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
