"""The compiled CPU decoding step with `inference/row_kernel.py`'s C++ kernels on and off.

A seeded random model of the 41.7M benchmark shape (`llamacpp_speed.SIZES`) in each dtype, at
tiers 0 and 3, one thread: one `StaticDecoder` (compiled) per case, 64 steps after a 64-token
prompt, timed with the kernels on and off in turn in the same process (`row_kernel.ENABLED`,
which the compiled step's guards read, so each setting runs its own graph), repeats
interleaved, medians. Prints ms a step and the ratio on / off; writes
benchmarks/results/row_kernel.json.

    .venv/bin/python -m benchmarks.speed.row_kernel
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, hardware, parser, write_json
from benchmarks.speed.llamacpp_speed import SIZES
from matformer.inference import row_kernel
from matformer.inference.static_cache import StaticDecoder
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def step_ms(dec: StaticDecoder, kernels: bool, steps: int) -> float:
    """ms a step over `steps` steps after the prompt, with the kernels on or off."""
    row_kernel.ENABLED = kernels
    ids = torch.tensor([[5]])
    dec.crop(64)
    dec.step(ids)  # this setting's graph (compiled on its first use)
    dec.crop(64)
    t0 = time.perf_counter()
    for _ in range(steps):
        dec.step(ids)
    return 1e3 * (time.perf_counter() - t0) / steps


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--size", default="41.7M", choices=sorted(SIZES))
    p.add_argument("--dtypes", default="f32,f16")
    p.add_argument("--tiers", default="0,3")
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
    print(f"{args.size}, 1 thread, {args.steps} steps after a 64-token prompt, median of "
          f"{args.repeats} interleaved repeats")
    print(f"{'dtype':>5} {'tier':>4} {'on ms':>7} {'off ms':>7} {'on/off':>7}")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"--dtypes: unknown {name!r}; use {', '.join(DTYPES)}")
        torch.manual_seed(0)
        cfg = MatFormerConfig(vocab_size=2048, max_position_embeddings=1024, **SIZES[args.size])
        model = MatFormerLM(cfg).eval().to(DTYPES[name])
        for tier in (int(t) for t in args.tiers.split(",")):
            model.set_widths(tier=tier)
            dec = StaticDecoder(model, 1, 64 + args.steps + 8, compile=True)
            dec.prefill([torch.arange(64)])
            runs: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.repeats):
                for on in (True, False):
                    runs[on].append(step_ms(dec, on, args.steps))
            on, off = (statistics.median(runs[k]) for k in (True, False))
            doc["rows"].append({"dtype": name, "tier": tier, "on_ms": on, "off_ms": off,
                                "on_over_off": on / off, "runs": {"on": runs[True],
                                                                  "off": runs[False]}})
            print(f"{name:>5} {tier:4d} {on:7.2f} {off:7.2f} {on / off:6.2f}x", flush=True)
    row_kernel.refresh()
    write_json(args.json_out, doc)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
