"""`matformer plan` checked against itself: predicted vs measured step time, and the chosen plan's
held-out loss against every uniform tier that fits the same limits.

Each run plans SRC under --memory / --latency-ms (the library call `plan_device`, as the CLI
does), then compares: the predicted step time (the layers' costs timed within the steps of the
search) with the chosen slice's step measured as deployed (sliced, loaded, timed beside the stored
model, whose step time in both phases shows how much the machine's load moved between them);
and the chosen plan's loss with each uniform (tier, KV heads) point under both limits, on the
same windows. Prints a table and writes benchmarks/results/plan.json.

    .venv/bin/python -m benchmarks.speed.plan --src runs/demo --memory 5MB --latency-ms 25
    .venv/bin/python -m benchmarks.speed.plan            # a random ffn8-tiny model (no training)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, hardware, parser, write_json
from matformer import MatFormerConfig, MatFormerLM, save_model
from matformer.data.text import save_tokenizer, train_tokenizer
from matformer.evaluation.plan import plan_device

RESULT = RESULTS / "plan.json"


def random_model(folder: Path) -> tuple[Path, Path]:
    """An untrained ffn8-tiny model (the demo's shape) with a tokenizer, and a text to score."""
    texts = [f"The quick brown fox {i} jumps over the lazy dog. Hello, world! It's {i * 7} "
             f"o'clock." for i in range(400)]
    tok = train_tokenizer(texts, 1024)
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset("ffn8-tiny", vocab_size=tok.get_vocab_size())
    save_model(MatFormerLM(cfg).eval(), folder)
    save_tokenizer(tok, folder)
    (folder.parent / "data.txt").write_text("\n".join(texts))
    return folder, folder.parent / "data.txt"


def one_run(src: Path, data: Path | None, args: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = plan_device(src, memory=args.memory, latency_ms=args.latency_ms, device=args.device,
                    batch=args.batch, fmt=args.format, context=args.context, data=data,
                    windows=args.windows, reps=args.reps)
    c, m = r.chosen, r.measured
    uniform = [{"widths": u.widths, "kv_heads": u.kv_heads, "loss": u.loss,
                "predicted_ms": u.latency_s * 1e3, "memory_bytes": u.memory_bytes}
               for u in r.uniform_fitting()]
    return {
        "chosen": {"widths": c.widths, "kv_heads": c.kv_heads, "loss": c.loss},
        "predicted_ms": c.latency_s * 1e3, "measured_ms": m["latency_ms"],
        "error": (c.latency_s * 1e3 - m["latency_ms"]) / m["latency_ms"],
        "stored_step_ms_search": m["stored_step_ms_during_search"],
        "stored_step_ms_measure": m["stored_step_ms"],
        "predicted_bytes": c.memory_bytes, "measured_bytes": m["memory_bytes"],
        "measured_loss": m["loss"], "uniform_that_fit": uniform,
        "loss_no_worse_than_every_fitting_uniform": all(c.loss <= u["loss"] for u in uniform),
        "plans_searched": len(r.considered), "plans_fitting": sum(x.fits for x in r.considered),
        "seconds": time.perf_counter() - t0, "table": r.format_table(),
    }


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--src", help="checkpoint (default: a random ffn8-tiny model)")
    p.add_argument("--data", help="text to score on (default: SRC's held-out split)")
    p.add_argument("--memory", default="5MB")
    p.add_argument("--latency-ms", type=float, default=25.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--format", default="hf")
    p.add_argument("--context", type=int, default=None)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--runs", type=int, default=3, help="plans in a row (default 3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=str(RESULT))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.src:
            src, data = Path(args.src), Path(args.data) if args.data else None
        else:
            src, data = random_model(Path(tmp) / "model")
        rows = [one_run(src, data, args) for _ in range(args.runs)]
    print(rows[-1]["table"])
    print()
    print(f"{'run':>3} {'chosen':<36} {'pred ms':>8} {'meas ms':>8} {'error':>7} "
          f"{'load moved':>10} {'loss':>7} {'<= uniform':>10}")
    for i, r in enumerate(rows):
        moved = r["stored_step_ms_measure"] / r["stored_step_ms_search"] - 1
        what = f"{r['chosen']['widths']} kv{r['chosen']['kv_heads'][0]}"
        print(f"{i:>3} {what:<36} {r['predicted_ms']:8.3f} {r['measured_ms']:8.3f} "
              f"{r['error'] * 100:+6.1f}% {moved * 100:+9.0f}% {r['chosen']['loss']:7.4f} "
              f"{str(r['loss_no_worse_than_every_fitting_uniform']):>10}")
    for r in rows:
        r.pop("table")
    report = {"hardware": hardware(args.device), "src": args.src or "random ffn8-tiny model",
              "command": " ".join(["python -m benchmarks.speed.plan", *(argv or sys.argv[1:])]),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
              "runs": rows,
              "max_abs_error": max(abs(r["error"]) for r in rows)}
    write_json(Path(args.json_out), report)
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
