"""Serve a checkpoint over an OpenAI-compatible HTTP API, every width from one copy in memory.

SRC is anything `matformer generate` takes (a checkpoint folder, a .safetensors or .gguf file,
a Hub id). Endpoints: POST /v1/completions and /v1/chat/completions (streaming by server-sent
events), GET /v1/models, /health and /metrics (Prometheus text). The width of a request comes
from its model name -- NAME (the stored width), NAME@tier-2, NAME@widths=W1,W2,... (one FFN
width per layer), NAME@auto -- or from the body's extra `width` field. `auto` runs, step by
step, the widest tier whose measured step cost keeps the per-token latency under --slo-ms (full
width without a target). Requests join and leave the running batch between decoding steps
(at most --max-batch at once); long prompts are prefilled in chunks. A greedy request decoding
alone is run as speculative rounds with a narrower tier as the draft when that is measured to be
faster (--speculative auto; off: never). With --api-key (or the
MATFORMER_API_KEY environment variable) every endpoint but /health needs
'Authorization: Bearer KEY'. Binds 127.0.0.1 unless --host says otherwise; Ctrl-C lets running
requests finish, then stops. This verb parses flags; the library is `matformer.serving`.
"""

from __future__ import annotations

import argparse
import math
import os

from matformer.cli.flags import add_checkpoint_argument, check_device, set_threads
from matformer.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="most requests decoded together (default 8); others wait")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the batched FFN (one graph per width)")
    parser.add_argument("--slo-ms", type=float, default=None, metavar="MS",
                        help="per-token latency target for model NAME@auto: the widest width "
                        "whose measured step cost stays under it (default: auto = full width)")
    parser.add_argument("--speculative", choices=("auto", "off", "always"), default="auto",
                        help="a greedy request decoding alone: auto (default) drafts with a "
                        "narrower tier when measured rounds beat plain steps; off: never; "
                        "always: every round (for measuring)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (default: $MATFORMER_API_KEY, "
                        "else no key)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    if args.slo_ms is not None and not (math.isfinite(args.slo_ms) and args.slo_ms > 0):
        raise ConfigError(f"--slo-ms must be a positive number of milliseconds, got "
                          f"{args.slo_ms!r}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    from matformer.serving.server import check_options, load_state, serve  # torch: lazily

    check_options(args.max_batch, args.slo_ms, args.port)
    set_threads(args.threads)
    check_device(args.device)
    key = args.api_key if args.api_key is not None else os.environ.get("MATFORMER_API_KEY")
    state = load_state(args.ckpt, max_batch=args.max_batch, slo_ms=args.slo_ms,
                       compile=args.compile, speculative=args.speculative, api_key=key, device=args.device,
                       revision=args.revision)
    serve(state, args.host, args.port)
    return 0
