"""GPU training throughput: MatFormer through `matformer train`'s own step code against
transformers' LlamaForCausalLM of the same shape, bf16, eager and torch.compile, plus FSDP2.

For each size (~125M and ~350M parameters, vocabulary 32000, sequence 2048) and each mode
(eager, compiled) it times, in one process:
- ours: a `training.prepare.Run` stepped by `training.step.train_step` — the function `matformer
  train` calls each step: DataLoader batches (2 workers, pinned memory) from a token stream,
  bf16 autocast, the Objective's forward + backward at full width (tier 0), gradient clipping
  and NestedAdamW (`--adamw-impl auto`: torch's fused AdamW kernel on CUDA, foreach on CPU);
  with --compile through `training.prepare.parallelize`;
- llama: LlamaForCausalLM (sdpa attention) on the same batches, bf16 autocast, clipping and
  torch.optim.AdamW(fused=True) (the fastest AdamW torch has);
and then ours under FSDP2 (`fully_shard` per layer and root, world size = the GPUs of this
process group: 1 here) for the 350M model, compiled per layer.

tokens/s is the median over timed steps after warm-up; MFU = tokens/s * model FLOPs per token
(metrics.flops_per_token: 6N + 12*L*H*T, as the GPU probe) / peak bf16 FLOP/s of the device.

    PYTHONPATH=src python3 -m benchmarks.speed.gpu --device cuda --out $OUT/gpu.json   # < 5 min, H100
    .venv/bin/python -m benchmarks.speed.gpu --device cpu --quick                      # smoke test
"""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, device_name, parser, write_json
from matformer.data import text as D
from matformer.models.lm.config import MatFormerConfig
from matformer.models.lm.model import MatFormerLM
from matformer.training.distributed import Dist, teardown
from matformer.training.metrics import flops_per_token, peak_flops
from matformer.training.objective import Objective
from matformer.training.optimizer import build_optimizer
from matformer.training.precision import LossScaler
from matformer.training.prepare import Run, parallelize
from matformer.training.report import Reporter
from matformer.training.settings import TrainConfig
from matformer.training.step import train_step

SHAPES = {
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=3072),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=4096),
    "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=256),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step(step, device: torch.device, warm: int, steps: int) -> float:
    for _ in range(warm):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours(mcfg: MatFormerConfig, tokens: np.ndarray, args, device: torch.device, compile_: bool,
         fsdp: bool) -> float:
    """Seconds per step of `matformer train`'s step code (full width)."""
    cfg = TrainConfig(out=str(RESULTS / "gpu-run"), batch_size=args.batch, seq_len=args.seq,
                      objective="single", tier=0, dtype="bfloat16", lr=1e-4, warmup_steps=0,
                      steps=10**6, compile=args.backend if compile_ else None, fsdp=fsdp,
                      data_workers=2 if device.type == "cuda" else 0, quiet=True)
    dist = Dist(device=device)
    torch.manual_seed(0)
    model = MatFormerLM(mcfg).to(device)
    objective = parallelize(cfg, model, dist, Objective(model), widths=1)
    run = Run(cfg=cfg, dist=dist, report=Reporter(Path(cfg.out), False, True), tok=None,
              model_cfg=mcfg, model=model, objective=objective, opt=build_optimizer(model, cfg),
              sampler=D.WindowSampler(tokens, args.seq, 0), val_windows=torch.zeros(0),
              trained=[0], scaler=LossScaler(False))
    model.train()
    counter = iter(range(10**9))
    try:
        return _median_step(lambda: train_step(run, next(counter)), device, args.warm, args.steps)
    finally:
        if run.batches is not None:
            run.batches.close()
        if fsdp:
            teardown(dist)


def llama(mcfg: MatFormerConfig, tokens: np.ndarray, args, device: torch.device,
          compile_: bool) -> float:
    """Seconds per step of LlamaForCausalLM, same shape, batches, precision and update."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in mcfg.to_dict().items()
                            if k not in ("matformer_tier", "matformer_base_intermediate_size")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    fwd = torch.compile(model, backend=args.backend) if compile_ else model
    sampler = D.WindowSampler(tokens, args.seq, 0)

    def step() -> None:
        x = torch.from_numpy(sampler.next(args.batch)).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _median_step(step, device, args.warm, args.steps)


def _row(name: str, kind: str, compiled: bool, seconds: float, mcfg: MatFormerConfig, args,
         device: torch.device, peak: float | None) -> dict:
    tps = args.batch * args.seq / seconds
    mfu = tps * flops_per_token(mcfg, mcfg.base, args.seq) / peak if peak else None
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    row = dict(model=name, kind=kind, compile=compiled, step_s=seconds, tokens_per_s=tps, mfu=mfu,
               peak_mem_gb=mem)
    print(f"| {name} | {kind} | {'yes' if compiled else 'no'} | {tps:,.0f} | "
          f"{'' if mfu is None else f'{mfu:.3f}'} | {'' if mem is None else f'{mem:.1f}'} |",
          flush=True)
    return row


def _reset(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="125m,350m")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=None, help="default: 16 (125m), 8 (350m)")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--budget", type=float, default=270.0,
                    help="seconds; configurations not started by then are skipped (reported)")
    ap.add_argument("--quick", action="store_true", help="tiny shape, few steps (CPU smoke run)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    vocab = 32000
    if args.quick:
        args.sizes, args.seq, args.warm, args.steps, vocab = "quick", 64, 1, 2, 512
        if device.type == "cpu" and args.backend == "inductor":
            args.backend = "aot_eager"  # no C++ compile in a smoke run
    t_start = time.time()
    peak = peak_flops(device, None)
    name_dev = device_name(device)
    print(f"device {name_dev}, torch {torch.__version__}, peak {peak and peak / 1e12} TFLOP/s, "
          f"bf16 autocast, seq {args.seq}, vocab {vocab}")
    print("\n| model | kind | compile | tokens/s | MFU | peak GB |\n|---|---|---|---|---|---|")
    tokens = np.random.default_rng(0).integers(3, vocab, size=4_000_000 if not args.quick else 20_000,
                                                dtype=np.int64).astype(np.uint16)
    rows, skipped = [], []
    sizes = args.sizes.split(",")
    plan = [(s, kind, c) for s in sizes for c in (False, True) for kind in ("llama", "ours")]
    plan.append((sizes[-1], "ours+fsdp", True))
    batch_arg = args.batch
    for name, kind, compiled in plan:
        if time.time() - t_start > args.budget:
            skipped.append(f"{name} {kind} compile={compiled}")
            continue
        args.batch = batch_arg or (16 if name == "125m" else 8 if name == "350m" else 2)
        mcfg = MatFormerConfig(vocab_size=vocab, max_position_embeddings=max(4096, args.seq),
                               tie_word_embeddings=False, **SHAPES[name])
        _reset(device)
        try:
            if kind == "llama":
                sec = llama(mcfg, tokens, args, device, compiled)
            else:
                sec = ours(mcfg, tokens, args, device, compiled, fsdp=kind == "ours+fsdp")
        except Exception as e:  # one failing configuration must not hide the others
            print(f"| {name} | {kind} | {compiled} | FAILED: {repr(e)[:200]} |", flush=True)
            continue
        rows.append(_row(name, kind, compiled, sec, mcfg, args, device, peak))
    ratios = {}
    for r in rows:
        ref = [x for x in rows if x["kind"] == "llama" and x["model"] == r["model"]
               and x["compile"] == r["compile"]]
        if r["kind"] != "llama" and ref:
            ratios[f"{r['model']} {r['kind']} compile={r['compile']}"] = \
                r["tokens_per_s"] / ref[0]["tokens_per_s"]
    print("\nours / llama tokens/s (goal >= 1.0):")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}x")
    if skipped:
        print(f"skipped (over the {args.budget:.0f}s budget): {skipped}")
    print(f"total {time.time() - t_start:.0f}s")
    out = Path(args.out) if args.out else RESULTS / ("gpu_quick.json" if args.quick else "gpu.json")
    write_json(out, {"device": name_dev, "torch": torch.__version__, "seq": args.seq,
                               "vocab": vocab, "peak_tflops": peak and peak / 1e12, "rows": rows,
                               "ratios_vs_llama": ratios, "skipped": skipped,
                               "seconds": time.time() - t_start})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
