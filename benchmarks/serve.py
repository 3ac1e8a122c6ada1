"""`matformer serve` under load: a bounded Poisson load generator on loopback.

Against three servers, one after the other, on the same prompts (windows of the checkpoint's
held-out text) and the same machine:
  (a) `matformer serve SRC` with every request pinned to the full width (model NAME);
  (b) the same server started with --slo-ms, every request at NAME@auto;
  (c) llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on the GGUF
      export (`matformer export`, f32) of the same weights at the same (full) width.
For each, requests arrive as a Poisson process at each rate of --rates (requests/s), a fixed
number per rate (--requests), each streaming --max-tokens tokens greedily (EOS ignored: ours
with `ignore_eos`, llama.cpp with a -100 logit bias on EOS); no new request starts after
--time-cap seconds and unfinished ones are counted as such. Reported per (server, rate):
throughput (completion tokens/s over the run), p50/p99 time to first token, p50/p99 per-token
latency (a request's mean time between tokens), and for (b) the widths `auto` ran (from each
response's `usage.widths`) and their quality cost: the held-out loss of each width used,
weighted by the tokens it generated, minus the full width's.

The SLO of (b) defaults to 1.25x (--slo-factor) the full width's p50 per-token latency at the
lowest rate (measured in (a) of the same run): above what the full width does unloaded, below
what it does at saturation. Prints a table and writes benchmarks/results/serve.json.

    python -m benchmarks.serve --src runs/demo
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, hardware, parser, write_json

RESULT = RESULTS / "serve.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, probe: str, env: dict[str, str],
          timeout: float = 180.0) -> subprocess.Popen:
    """Start a server process and wait until `url + probe` answers 200."""
    import httpx

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    proc.log_path = log.name  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(url + probe, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(proc)
    raise RuntimeError(f"{cmd[:4]} did not start in {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (graceful), then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion: send time, token arrival times, tokens, usage."""
    t0 = time.perf_counter()
    times: list[float] = []
    usage = None
    chunks = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}", "t0": t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("usage"):
                    usage = obj["usage"]
                choices = obj.get("choices") or []
                if choices and choices[0].get("text"):
                    times.append(time.perf_counter())
                    chunks += 1
    except Exception as e:  # noqa: BLE001  (a failed request is a result, not a crash)
        return {"error": type(e).__name__, "t0": t0}
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") else chunks
    return {"t0": t0, "times": times, "tokens": tokens, "end": time.perf_counter(),
            "widths": (usage or {}).get("widths", {})}


async def run_rate(url: str, bodies: list[dict[str, Any]], rate: float, cap_s: float,
                   seed: int) -> dict[str, Any]:
    """Poisson arrivals at `rate`/s of the requests `bodies` (fewer when `cap_s` runs out)."""
    import httpx

    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cap_s * 3 + 60), limits=limits) as client:
        start_t = time.perf_counter()
        tasks = []
        for body in bodies:
            if time.perf_counter() - start_t > cap_s:
                break
            tasks.append(asyncio.create_task(one(client, url, body)))
            await asyncio.sleep(rng.expovariate(rate))
        done, pending = await asyncio.wait(tasks, timeout=cap_s * 2 + 30)
        for t in pending:
            t.cancel()
        results = [t.result() for t in done]
    return summarize(results, len(bodies), len(tasks), start_t)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def summarize(results: list[dict[str, Any]], planned: int, sent: int,
              start_t: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r and r["times"]]
    ttft = [r["times"][0] - r["t0"] for r in ok]
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in ok)
    end = max((r["end"] for r in ok), default=start_t)
    widths: dict[str, int] = {}
    for r in ok:
        for k, v in r["widths"].items():
            widths[k] = widths.get(k, 0) + v
    return {"planned": planned, "sent": sent, "completed": len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r}),
            "tokens": tokens, "seconds": end - start_t,
            "throughput_tok_s": tokens / (end - start_t) if end > start_t else 0.0,
            "ttft_p50_ms": _ms(pct(ttft, 0.5)), "ttft_p99_ms": _ms(pct(ttft, 0.99)),
            "tpot_p50_ms": _ms(pct(tpot, 0.5)), "tpot_p99_ms": _ms(pct(tpot, 0.99)),
            "tpot_ms": [1e3 * t for t in tpot], "widths": widths}


def _ms(x: float | None) -> float | None:
    return None if x is None else 1e3 * x


def heldout(src: Path, windows: int, seq_len: int) -> Any:
    from matformer.data.text import heldout_tokens, heldout_windows

    return heldout_windows(heldout_tokens(src), seq_len, windows)


def width_losses(src: Path, names: dict[str, Any], windows: Any) -> dict[str, float]:
    """Held-out loss of each served width name (the mean of `model.loss` over the windows)."""
    import torch

    from matformer.io.checkpoint import load_model
    from matformer.serving.catalog import Catalog

    model = load_model(src).eval()
    catalog = Catalog(names["name"], model)
    x = torch.as_tensor(windows)
    out = {}
    with torch.inference_mode():
        for name in names["widths"]:
            setting = catalog.resolve(name).setting
            with model.running(setting):
                out[name] = float(sum(model.loss(x[i:i + 8]) * len(x[i:i + 8])
                                      for i in range(0, len(x), 8)) / len(x))
    return out


def main() -> int:
    p = parser(__doc__, full_doc=True)
    p.add_argument("--src", required=True, help="checkpoint folder (with its tokenizer)")
    p.add_argument("--rates", default="2,4,8,16,32,64", help="request rates (per second)")
    p.add_argument("--requests", type=int, default=32, help="requests per rate")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="CPU threads of every server")
    p.add_argument("--slo-ms", type=float, default=None,
                   help="auto's target (default: --slo-factor x the full width's p50 per-token "
                   "latency at the lowest rate)")
    p.add_argument("--slo-factor", type=float, default=1.25)
    p.add_argument("--time-cap", type=float, default=40.0, help="seconds per (server, rate)")
    p.add_argument("--skip-llamacpp", action="store_true")
    p.add_argument("--speculative", choices=("auto", "off", "always"), default=None,
                   help="our servers' --speculative (default: the server's own, auto)")
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args()
    src = Path(args.src)
    rates = [float(r) for r in args.rates.split(",")]
    from matformer.data.text import load_tokenizer
    from matformer.serving.server import served_name

    name = served_name(src)
    tok = load_tokenizer(src)
    windows = heldout(src, 64, 128)
    prompts = [tok.decode(list(map(int, w[:args.prompt_tokens]))) for w in windows]
    eos = json.loads((src / "config.json").read_text()).get("eos_token_id", 2)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    py = sys.executable
    doc: dict[str, Any] = {"command": " ".join(["python -m benchmarks.serve", *sys.argv[1:]]),
                           "hardware": hardware(), "src": str(src), "rates": rates,
                           "requests": args.requests, "max_tokens": args.max_tokens,
                           "prompt_tokens": args.prompt_tokens, "max_batch": args.max_batch,
                           "threads": args.threads, "speculative": args.speculative or "auto",
                           "runs": {}}

    def bodies(model: str, extra: dict[str, Any], k: int) -> list[dict[str, Any]]:
        return [{"model": model, "prompt": prompts[(k * args.requests + i) % len(prompts)],
                 "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                 "stream_options": {"include_usage": True}, **extra}
                for i in range(args.requests)]

    def sweep(label: str, url: str, model: str, extra: dict[str, Any]) -> None:
        runs = []
        for k, rate in enumerate(rates):
            r = asyncio.run(run_rate(url, bodies(model, extra, k), rate, args.time_cap, k))
            r["rate"] = rate
            runs.append(r)
            print(f"{label:>10} {rate:6.1f}/s: {r['throughput_tok_s']:7.1f} tok/s, TTFT p50/p99 "
                  f"{r['ttft_p50_ms'] or 0:7.1f}/{r['ttft_p99_ms'] or 0:7.1f} ms, per token "
                  f"p50/p99 {r['tpot_p50_ms'] or 0:6.2f}/{r['tpot_p99_ms'] or 0:6.2f} ms, "
                  f"{r['completed']}/{r['planned']} done {r['widths'] or ''}", flush=True)
        doc["runs"][label] = runs

    ours = {"ignore_eos": True}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [py, "-m", "matformer.cli", "serve", str(src), "--port", str(port),
             "--max-batch", str(args.max_batch), "--threads", str(args.threads),
             *(["--speculative", args.speculative] if args.speculative else [])]
    proc = start(serve, url, "/health", env)
    try:
        sweep("full", url, name, ours)
    finally:
        stop(proc)
    slo = args.slo_ms or args.slo_factor * (doc["runs"]["full"][0]["tpot_p50_ms"] or 10.0)
    doc["slo_ms"] = slo
    proc = start([*serve, "--slo-ms", f"{slo:.3f}"], url, "/health", env)
    try:
        sweep("auto", url, f"{name}@auto", ours)
    finally:
        stop(proc)
    if not args.skip_llamacpp:
        with tempfile.TemporaryDirectory() as d:
            gguf = Path(d) / f"{name}.gguf"
            subprocess.run([py, "-m", "matformer.cli", "export", str(src), "-o", str(gguf),
                            "--outtype", "f32"], check=True, capture_output=True, env=env)
            ctx = json.loads((src / "config.json").read_text())["max_position_embeddings"]
            cmd = [py, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(port), "--n_ctx", str(ctx), "--n_threads", str(args.threads),
                   "--n_threads_batch", str(args.threads), "--model_alias", name,
                   # its default cuts a running stream short when a new request arrives; a
                   # server under load queues instead
                   "--interrupt_requests", "False"]
            proc = start(cmd, url, "/v1/models", env)
            try:
                sweep("llama.cpp", url, name, {"logit_bias": {str(eos): -100.0}})
            finally:
                stop(proc)
    used = sorted({w for r in doc["runs"]["auto"] for w in r["widths"]} | {name})
    losses = width_losses(src, {"name": name, "widths": used}, windows)
    doc["heldout_loss"] = losses
    for r in doc["runs"]["auto"]:
        total = sum(r["widths"].values())
        if total:
            mean = sum(losses[w] * n for w, n in r["widths"].items()) / total
            r["weighted_loss"], r["loss_cost"] = mean, mean - losses[name]
            r["within_slo"] = sum(t <= slo for t in r["tpot_ms"]) / max(1, len(r["tpot_ms"]))
    for r in doc["runs"]["full"]:
        r["within_slo"] = sum(t <= slo for t in r["tpot_ms"]) / max(1, len(r["tpot_ms"]))
    print(f"\nSLO {slo:.2f} ms per token; held-out loss per width: "
          + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print(f"{'server':>10} {'rate':>6} {'tok/s':>8} {'TTFT50':>8} {'TTFT99':>8} {'TPOT50':>7} "
          f"{'TPOT99':>7} {'in SLO':>6} {'loss cost':>9}")
    for label, runs in doc["runs"].items():
        for r in runs:
            within = f"{100 * r['within_slo']:.0f}%" if "within_slo" in r else "-"
            cost = f"{r['loss_cost']:+.4f}" if "loss_cost" in r else "-"
            print(f"{label:>10} {r['rate']:6.1f} {r['throughput_tok_s']:8.1f} "
                  f"{r['ttft_p50_ms'] or 0:8.1f} {r['ttft_p99_ms'] or 0:8.1f} "
                  f"{r['tpot_p50_ms'] or 0:7.2f} {r['tpot_p99_ms'] or 0:7.2f} {within:>6} "
                  f"{cost:>9}")
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
