"""One-row products on the CPU: the BLAS (`F.linear`) against `matvec.row_linear` compiled.

What `inference/matvec.py` rests on. For each weight shape of the 41.7M benchmark model (gate/up
(4096, 512), down (512, 4096), q/o (512, 512)) and each dtype, enough distinct weights that
together they exceed the last-level cache (so every product reads its weight from DRAM, as a
decoding step does), multiplied by one row: eager `F.linear` one weight at a time (what an eager
step calls), every product in one compiled graph through `F.linear` (the BLAS as an extern call:
what the compiled step ran without the rewrite) and through `row_linear` (what it runs), and
numpy's `W @ x` (OpenBLAS, float32 only, at the same thread count) as a second reference;
`row_kernel.row_matmul` in graph (the hand-written C++ kernel a compiled step calls for one row
by a half-precision weight; one row only, and only where it builds); plus a
plain `sum` over the same bytes (the machine's single-thread read rate). Products are timed in
one graph because a compiled function called once per weight pays its own call overhead (10-20
us) on every 1 MB product, which is not what a decoding step pays. The weights lie on huge
pages where the system has them (`inference.huge_pages`), as a decoding step's do. Interleaved
repeats, medians; GB/s of weight read and the ratio row_linear / F.linear, both in graph.
Writes benchmarks/results/matvec.json.

    .venv/bin/python -m benchmarks.speed.matvec            # 1 thread
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from benchmarks.common import RESULTS, dtypes_arg, hardware, parser, write_json
from matformer.inference import row_kernel
from matformer.inference.huge_pages import weights_on_huge_pages
from matformer.inference.matvec import row_linear

SHAPES = [(4096, 512), (512, 4096), (512, 512)]


def seconds(fn: Callable[[], object], inner: int = 3) -> float:
    """Seconds of one call of `fn` (the least of `inner` calls after a warm-up)."""
    fn()
    best = float("inf")
    for _ in range(inner):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _products(x: torch.Tensor, ws: list[torch.Tensor], product: Callable) -> torch.Tensor:
    """x times every weight, in one function (compiled: one graph, as in a decoding step)."""
    return torch.cat([product(x, w) for w in ws], -1)


chain = torch.compile(_products, dynamic=False)


def measure(dtype: torch.dtype, out: int, inp: int, megabytes: int,
            repeats: int, rows: int = 1) -> dict[str, float]:
    """GB/s of weight read by each way of multiplying `rows` rows by (out, inp) weights of
    `dtype`, `megabytes` of them (and "weights": how many)."""
    size = torch.empty((), dtype=dtype).element_size()
    count = max(1, megabytes * 10**6 // (out * inp * size))
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(out, inp, generator=g).to(dtype) for _ in range(count)]
    x = torch.randn(rows, inp, generator=g).to(dtype)
    flat = torch.cat([w.view(-1) for w in ws])
    holder = torch.nn.Module()  # as a decoding step's weights: on huge pages where there are
    for i, t in enumerate([*ws, flat]):
        holder.register_buffer(f"t{i}", t)
    weights_on_huge_pages(holder)
    nbytes = flat.numel() * size
    torch.testing.assert_close(chain(x, ws[:1], row_linear).float(),
                               chain(x, ws[:1], F.linear).float(), rtol=3e-2, atol=3e-2)
    ways: dict[str, Callable[[], object]] = {
        "F.linear": lambda: [F.linear(x, w) for w in ws],
        "F.linear in graph": lambda: chain(x, ws, F.linear),
        "row_linear in graph": lambda: chain(x, ws, row_linear),
        "sum": lambda: flat.sum(),
    }
    if rows == 1 and row_kernel.available():
        ways["C kernel in graph"] = lambda: chain(x, ws, row_kernel.row_matmul)
    if dtype == torch.float32:
        nws, xn = [w.numpy() for w in ws], x.t().contiguous().numpy()
        ways["numpy"] = lambda: [w @ xn for w in nws]  # OpenBLAS, at torch's thread count
    runs: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):  # interleaved: the machine's load hits every way alike
        for k, fn in ways.items():
            runs[k].append(seconds(fn))
    rate: dict[str, float] = {k: nbytes / statistics.median(v) / 1e9 for k, v in runs.items()}
    rate["weights"] = count
    return rate


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--megabytes", type=int, default=160, help="bytes of weights per case")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="f32,f16,bf16")
    p.add_argument("--rows", type=int, default=1,
                   help="rows multiplied at once (a speculative verify of k tokens: k + 1)")
    p.add_argument("--json-out", default=str(RESULTS / "matvec.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # numpy's OpenBLAS keeps its own thread pool (every core by default): the same count
    threadpool_limits(args.threads, user_api="blas")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    doc = {"command": " ".join(["python -m benchmarks.speed.matvec", *sys.argv[1:]]),
           "hardware": hardware(), "threads": args.threads, "x_rows": args.rows, "rows": []}
    print(f"{args.rows} row(s) x weight, weights from DRAM ({args.megabytes} MB a case), "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"{'dtype':>5} {'shape':>12} {'F.linear':>9} {'in graph':>9} {'row_linear':>10} "
          f"{'C kernel':>8} {'numpy':>7} {'sum':>6} {'ratio':>6}   (GB/s)")
    for name, dtype in dtypes_arg(p, "--dtypes", args.dtypes).items():
        for out, inp in SHAPES:
            rate = measure(dtype, out, inp, args.megabytes, args.repeats, args.rows)
            count = rate.pop("weights")
            ratio = rate["row_linear in graph"] / rate["F.linear in graph"]
            doc["rows"].append({"dtype": name, "shape": [out, inp], "weights": count,
                                "gb_per_s": rate, "row_linear_over_linear_in_graph": ratio})
            numpy_rate = f"{rate['numpy']:7.1f}" if "numpy" in rate else f"{'-':>7}"
            kernel = rate.get("C kernel in graph")
            kernel_rate = f"{kernel:8.1f}" if kernel is not None else f"{'-':>8}"
            print(f"{name:>5} {str((out, inp)):>12} {rate['F.linear']:9.1f} "
                  f"{rate['F.linear in graph']:9.1f} {rate['row_linear in graph']:10.1f} "
                  f"{kernel_rate} {numpy_rate} {rate['sum']:6.1f} {ratio:5.2f}x",
                  flush=True)
    write_json(args.json_out, doc)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
