"""Pick the best slice of a checkpoint for a device: memory size and latency target in, plan out.

Measures on this machine (--device) each layer's decode step at every width and KV head count
the search uses (seconds, timed), counts each plan's memory (weights plus the KV cache of --batch
sequences of --context tokens), scores the plans under both limits by held-out loss (a few
windows, least-slope Mix'n'Match order, uniform tiers always), and prints the best one with its
predicted and then measured latency, memory and loss (the chosen plan is sliced and timed as
deployed). Writes PLAN.json (-o); `matformer slice SRC -o OUT --plan PLAN.json` writes the plan.
--format limits the search to what a format can write (nemotron-nas: FFN widths on its 256 grid,
KV heads dividing the query heads) and is recorded in the plan. See docs/DEPLOY.md.

examples:
  matformer plan runs/demo --memory 2GB --latency-ms 25
  matformer plan runs/demo --memory 20MB --latency-ms 2 --batch 4 -o runs/demo-plan.json
  matformer slice runs/demo -o runs/fit --plan runs/demo-plan.json
"""

from __future__ import annotations

import argparse
import sys

from matformer.cli.flags import check_device, set_threads

FORMATS = ("hf", "gguf", "nemotron-nas")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="checkpoint folder, .safetensors file or Hub repo id (org/name)")
    parser.add_argument("--memory", required=True, metavar="SIZE",
                        help="memory the model may take: weights plus KV cache (e.g. 2GB, 500MB)")
    parser.add_argument("--latency-ms", required=True, type=float, metavar="MS",
                        help="longest decode step (one token for each of --batch rows), in ms")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where to measure (default: cpu)")
    parser.add_argument("--batch", type=int, default=1, metavar="B",
                        help="sequences decoded together (default: 1)")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="how the plan will be deployed: hf (a matformer/transformers "
                        "checkpoint), gguf (`matformer export`), nemotron-nas (default: hf)")
    parser.add_argument("--context", type=int, default=None, metavar="T",
                        help="tokens per sequence: the KV cache holds T, the step is timed at "
                        "position T-1 (default: 512, at most the model's max_position_embeddings)")
    parser.add_argument("--data", default=None,
                        help="text file/folder or `matformer prepare-data` folder for the loss "
                        "(default: the checkpoint's own held-out split)")
    parser.add_argument("--windows", type=int, default=8, metavar="N",
                        help="held-out windows each candidate is scored on (default: 8)")
    parser.add_argument("--reps", type=int, default=7,
                        help="timed runs per measurement, median taken (default: 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("-o", "--out", default="PLAN.json", metavar="PLAN.json",
                        help="where to write the plan (default: PLAN.json)")


def run(args: argparse.Namespace) -> int:
    from matformer.errors import ConfigError
    from matformer.evaluation.plan import plan_device, plan_json
    from matformer.io.outputs import check_output, write_output

    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
    check_device(args.device)
    set_threads(args.threads)
    for flag, v in (("--windows", args.windows), ("--reps", args.reps)):
        if v < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {v}")
    check_output(args.out, protect=[args.src], what="plan")
    report = plan_device(args.src, memory=args.memory, latency_ms=args.latency_ms,
                         device=args.device, batch=args.batch, fmt=args.format,
                         context=args.context, data=args.data, windows=args.windows,
                         reps=args.reps, progress=lambda m: print(m, file=sys.stderr))
    print(report.format_table())
    write_output(args.out, plan_json(report), protect=[args.src], what="plan")
    print(f"wrote {args.out}; write the plan with: matformer slice {args.src} -o OUT --plan "
          f"{args.out}")
    return 0
