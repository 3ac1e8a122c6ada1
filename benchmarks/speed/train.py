"""Training speed: our model against transformers' LlamaForCausalLM, and `joint` vs single widths.

Part 1: training tokens/s of one step (forward + backward + AdamW step) of MatFormerLM at full
width against LlamaForCausalLM of the same shape and dtype (sdpa attention), same threads, same
batches, measured interleaved in one process. Both with torch.optim.AdamW (the model compared
alone), and ours also with NestedAdamW (the optimizer `matformer train` uses). Goal: >= 1.0x.

Both in float32 and under bf16 autocast (float32 master weights, as `matformer train --dtype
bfloat16`). Part 1b: one optimizer step of NestedAdamW (foreach, full extent and a tier-2
prefix) against torch.optim.AdamW(foreach=True) on the same parameters and gradients. Goal:
<= 1.2x.

Part 2: the `joint` objective's step (all 4 tiers on one batch, one backward, one optimizer
step) against the sum of the 4 single-width steps (each its own forward/backward/step), the
same code `matformer.train` runs (Objective + NestedAdamW). Goal: joint / sum <= 1.05.

    .venv/bin/python -m benchmarks.speed.train              # ~2 minutes on 2 cores
    .venv/bin/python -m benchmarks.speed.train --quick      # smoke run
Timings are noisy on a shared machine: each number is the median of interleaved repeats.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch

from benchmarks.common import RESULTS, parser
from matformer import MatFormerConfig, MatFormerLM
from matformer.training import NestedAdamW, Objective, forward_backward
from matformer.training.precision import autocast


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_vs_llama(cfg: MatFormerConfig, batch: int, seq: int, repeats: int,
                   dtype: str = "float32") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = MatFormerLM(cfg)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_dict().items()
                            if k not in ("matformer_tier", "matformer_base_intermediate_size")})
    hf_cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(hf_cfg).to(cfg.dtype)
    hf.load_state_dict(ours.state_dict(), strict=False)  # same weights: same numerics per step
    hf.train()
    ours.train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opts = {
        "ours+AdamW": (ours, torch.optim.AdamW(ours.parameters(), **kw)),
        "llama+AdamW": (hf, torch.optim.AdamW(hf.parameters(), **kw)),
    }
    ours2 = MatFormerLM(cfg)
    ours2.load_state_dict(ours.state_dict())
    opts["ours+NestedAdamW"] = (ours2, NestedAdamW(ours2, **kw))

    objs = {n: Objective(m) for n, (m, _) in opts.items() if m is not hf}

    def step(name: str) -> None:
        model, opt = opts[name]
        with autocast(dtype, x.device):  # what `matformer train --dtype` runs
            if model is hf:
                loss = model(input_ids=x, labels=x).loss
            else:
                loss, _ = objs[name](x, [(0, 1.0)])  # what `matformer train` runs
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for name in opts:  # warm-up
        step(name)
        step(name)
    times = {n: [] for n in opts}
    for _ in range(repeats):
        for n in opts:
            times[n].append(_timed(lambda n=n: step(n)))
    med = {n: statistics.median(v) for n, v in times.items()}
    tps = {n: batch * seq / med[n] for n in opts}
    return {"step_seconds": med, "tokens_per_second": tps,
            "ratio_ours_vs_llama": tps["ours+AdamW"] / tps["llama+AdamW"],
            "ratio_ours_nested_vs_llama": tps["ours+NestedAdamW"] / tps["llama+AdamW"]}


def bench_optimizer(cfg: MatFormerConfig, repeats: int) -> dict:
    """One optimizer step, NestedAdamW vs torch.optim.AdamW(foreach=True), same gradients."""
    torch.manual_seed(0)
    a, b = MatFormerLM(cfg), MatFormerLM(cfg)
    b.load_state_dict(a.state_dict())
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    nested = NestedAdamW(a, **kw)
    ref = torch.optim.AdamW(b.parameters(), foreach=True, **kw)
    for m in (a, b):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
    steps = {"torch AdamW foreach": ref.step, "NestedAdamW full": lambda: nested.step(None),
             "NestedAdamW tier 2": lambda: nested.step(cfg.base >> 2)}
    for fn in steps.values():
        fn()
    times = {n: [] for n in steps}
    for _ in range(repeats):
        for n, fn in steps.items():
            times[n].append(_timed(fn))
    med = {n: statistics.median(v) for n, v in times.items()}
    return {"step_seconds": med,
            "ratio_full_vs_adamw": med["NestedAdamW full"] / med["torch AdamW foreach"],
            "ratio_tier2_vs_adamw": med["NestedAdamW tier 2"] / med["torch AdamW foreach"]}


def bench_joint(cfg: MatFormerConfig, batch: int, seq: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = MatFormerLM(cfg)
    obj = Objective(model)
    opt = NestedAdamW(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    tiers = [0, 1, 2, 3]
    base = cfg.base

    def step(plan) -> None:
        forward_backward(obj, x, plan)  # what `matformer train` runs
        opt.step(max(base >> t for t, _ in plan))
        opt.zero_grad(set_to_none=True)

    plans = {"joint": [(t, 1.0) for t in tiers], **{f"single t{t}": [(t, 1.0)] for t in tiers}}
    for p in plans.values():
        step(p)
    times = {n: [] for n in plans}
    for _ in range(repeats):
        for n, p in plans.items():
            times[n].append(_timed(lambda p=p: step(p)))
    med = {n: statistics.median(v) for n, v in times.items()}
    singles = sum(med[f"single t{t}"] for t in tiers)
    return {"step_seconds": med, "sum_of_singles": singles, "ratio_joint_vs_sum": med["joint"] / singles}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 gives steadier numbers on a busy machine")
    ap.add_argument("--quick", action="store_true", help="debug preset, 3 repeats (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.repeats, args.seq = "debug", 3, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = MatFormerConfig.from_preset(args.preset)
    print(f"preset {args.preset}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, FFN "
          f"{cfg.base}, vocab {cfg.vocab_size}; batch {args.batch} x {args.seq} tokens, float32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    by_dtype = {d: bench_vs_llama(cfg, args.batch, args.seq, args.repeats, d)
                for d in ("float32", "bfloat16")}
    a = by_dtype["float32"]
    print("\n| dtype | model + optimizer | step (ms) | tokens/s | vs Llama |")
    print("|---|---|---|---|---|")
    for d, res in by_dtype.items():
        for n in res["step_seconds"]:
            r = res["tokens_per_second"][n] / res["tokens_per_second"]["llama+AdamW"]
            print(f"| {d} | {n} | {res['step_seconds'][n] * 1e3:.1f} | "
                  f"{res['tokens_per_second'][n]:,.0f} | {r:.3f}x |")
    o = bench_optimizer(cfg, args.repeats)
    print("\n| optimizer step | time (ms) |\n|---|---|")
    for n, sec in o["step_seconds"].items():
        print(f"| {n} | {sec * 1e3:.2f} |")
    j = bench_joint(cfg, args.batch, args.seq, args.repeats)
    print("\n| step | time (ms) |")
    print("|---|---|")
    for n, s in j["step_seconds"].items():
        print(f"| {n} | {s * 1e3:.1f} |")
    print(f"| sum of singles | {j['sum_of_singles'] * 1e3:.1f} |")
    b = by_dtype["bfloat16"]
    print(f"\nours vs Llama: float32 {a['ratio_ours_vs_llama']:.3f}x, bf16 "
          f"{b['ratio_ours_vs_llama']:.3f}x (goal >= 1.0); with NestedAdamW float32 "
          f"{a['ratio_ours_nested_vs_llama']:.3f}x, bf16 {b['ratio_ours_nested_vs_llama']:.3f}x; "
          f"NestedAdamW / AdamW(foreach) {o['ratio_full_vs_adamw']:.3f} (goal <= 1.2); "
          f"joint / sum of singles: {j['ratio_joint_vs_sum']:.3f} (goal <= 1.05)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(),
              "vs_llama": a, "vs_llama_bf16": b, "optimizer": o, "joint": j}
    name = "train_quick.json" if args.quick else "train.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
