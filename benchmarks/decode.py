"""Decoding speed at batch 1: every tier against the full width, and speculative decoding.

Part 1 (tiers): one full-width model (default H=1024, FFN 8192, 4 layers, vocab 2048: the FFN
holds ~85% of the FLOPs) decodes greedily with the KV cache at tiers 0..3. For each tier:
decode tokens/s (the N-1 steps after the first token, so the prompt is not counted; best of
--repeats, interleaved across tiers), the measured speed-up over tier 0 (median over repeats of
the ratio within a repeat), the FLOP-ratio speed-up
(2 x matmul parameters + attention over the cache, per token) and measured / ideal. The goal is
>= 0.90 of the FLOP ratio at every tier.

Part 2 (speculative): a model trained by `matformer train` (--ckpt, or trained here by
`matformer.train` with the verb's defaults for --train-steps steps; kept in --work) decodes
prompts cut from its held-out split, greedily, at the full width: plain `generate` vs
`speculative_generate` with each draft tier and draft length. Reported: acceptance rate, tokens
per verification round, measured speed-up (plain time / speculative time, best of --repeats),
whether the output is identical token for token (it must be), the measured cost of a (k+1)-token
verify forward relative to a 1-token one on this machine, and the speed-up projected by the
standard cost model when verification costs one decoding step (memory-bound GPU decoding).

    .venv/bin/python benchmarks/decode.py                       # a few minutes on 2 cores
    .venv/bin/python benchmarks/decode.py --quick               # smoke run
    .venv/bin/python benchmarks/decode.py --ckpt runs/demo      # speculative on your checkpoint
Timings are noisy on a shared machine; ratios come from one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from matformer import MatFormerConfig, MatFormerLM
from matformer.generation import generate
from matformer.speculative import speculative_generate
from matformer.shapes import parameter_counts

RESULTS = Path(__file__).resolve().parent / "results"


def flops_per_token(cfg: MatFormerConfig, widths: list[int], ctx: float) -> float:
    """Matmul FLOPs of one decoded token: 2 per weight read (non-embedding + lm_head) plus
    the attention scores and weighted sum over `ctx` cached positions."""
    pc = parameter_counts(cfg, widths)
    matmul = pc["non_embedding"] + cfg.vocab_size * cfg.hidden_size
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * ctx
    return 2 * matmul + attn


def _decode_seconds(model, prompt, n, widths) -> float:
    """Seconds for the n-1 decoding steps after the first token (the prompt's forward and the
    first pick excluded)."""
    s = generate(model, prompt, n, widths=widths, ignore_eos=True).stats
    return s.seconds - s.prefill_seconds


def bench_tiers(args) -> dict:
    cfg = MatFormerConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                          intermediate_size=args.ffn, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                          max_position_embeddings=1024)
    torch.manual_seed(0)
    model = MatFormerLM(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,)).tolist()
    n = args.tokens
    tiers = [0, 1, 2, 3]
    widths = {t: model.resolve_widths(tier=t) for t in tiers}
    for t in tiers:  # warm-up
        generate(model, prompt, 4, widths=widths[t], ignore_eos=True)
    times: dict[int, list[float]] = {t: [] for t in tiers}
    for _ in range(args.repeats):
        for t in tiers:  # interleaved, so drifting machine load hits every tier alike
            times[t].append(_decode_seconds(model, prompt, n, widths[t]))
    ctx = args.prompt_len + n / 2
    rows = []
    for t in tiers:
        # Speed-up: the median over repeats of the ratio within one repeat (neighbouring runs
        # share the machine's load), and the ratio of the best runs for comparison.
        measured = statistics.median(a / b for a, b in zip(times[0], times[t], strict=True))
        ideal = flops_per_token(cfg, widths[0], ctx) / flops_per_token(cfg, widths[t], ctx)
        rows.append({
            "tier": t, "width": widths[t][0],
            "non_embedding_params": parameter_counts(cfg, widths[t])["non_embedding"],
            "decode_tokens_per_s": (n - 1) / min(times[t]), "speedup": measured,
            "speedup_best_of": min(times[0]) / min(times[t]), "flop_ratio_speedup": ideal,
            "fraction_of_flop_ratio": measured / ideal, "seconds": times[t],
        })
    return {"config": cfg.to_dict(), "tokens": n, "prompt_len": args.prompt_len, "rows": rows}


# ---- speculative decoding on a trained model ------------------------------------------------------


def trained_checkpoint(args) -> Path:
    """--ckpt, or a model trained here by `matformer.train` (tiny preset, default corpus,
    lr 3e-3, other settings the verb's defaults) for --train-steps steps, kept in --work."""
    if args.ckpt:
        return Path(args.ckpt)
    out = Path(args.work) / f"tiny-{args.train_steps}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        print(f"using the model trained earlier in {out}")
        return out
    from matformer.training import TrainConfig, train

    print(f"training the benchmark model (matformer train defaults, {args.train_steps} steps) "
          f"into {out} ...")
    # lr pinned to the value the documented model was trained with (the verb's default then).
    train(TrainConfig(out=str(out), steps=args.train_steps, lr=3e-3, log_every=50))
    return out


def _verify_cost(model, k: int, ctx: int, reps: int = 20) -> float:
    """Cost of one cached forward of k+1 tokens over a 1-token one after ctx cached positions,
    best of `reps` each, alternated so that load changes hit both alike."""
    with torch.inference_mode():
        cache = model.new_cache(1, ctx + k + 1)
        model(torch.zeros(1, ctx, dtype=torch.long), cache=cache)
        best = {1: float("inf"), k + 1: float("inf")}
        for _ in range(reps):
            for T in best:
                cache.crop(ctx)
                x = torch.zeros(1, T, dtype=torch.long)
                t0 = time.perf_counter()
                model(x, cache=cache)
                best[T] = min(best[T], time.perf_counter() - t0)
    return best[k + 1] / best[1]


def bench_speculative(args) -> dict:
    from matformer.data import heldout_tokens
    from matformer.io.checkpoint import load_model

    ckpt = trained_checkpoint(args)
    model = load_model(ckpt).eval()
    cfg = model.config
    stream = heldout_tokens(ckpt)
    n, plen = args.spec_tokens, args.prompt_len
    step = max(1, (len(stream) - plen) // args.prompts)
    prompts = [stream[i * step: i * step + plen].tolist() for i in range(args.prompts)]
    full = model.stored_widths
    kw = dict(ignore_eos=True)
    drafts = [t for t in (1, 2, 3) if (model.base_width >> t) <= min(full)]
    ks = [2, 4, "adaptive"] if not args.quick else [4]
    generate(model, prompts[0], 8, **kw)  # warm-up
    speculative_generate(model, prompts[0], 8, draft_tier=drafts[-1], **kw)
    plain_best = [float("inf")] * len(prompts)
    plain_out: list[list[int]] = [[] for _ in prompts]
    spec_best = {(t, k): [float("inf")] * len(prompts) for t in drafts for k in ks}
    spec_stats: dict[tuple, dict] = {}
    for rep in range(args.repeats):
        for i, p in enumerate(prompts):
            o = generate(model, p, n, **kw)
            plain_best[i] = min(plain_best[i], o.stats.seconds)
            plain_out[i] = o.tokens
            for t in drafts:
                for k in ks:
                    s = speculative_generate(model, p, n, draft_tier=t, draft_tokens=k, **kw)
                    spec_best[(t, k)][i] = min(spec_best[(t, k)][i], s.stats.seconds)
                    st = spec_stats.setdefault((t, k), {"acc": 0, "dra": 0, "rounds": 0,
                                                        "identical": True})
                    if rep == 0:  # greedy: the same every repeat
                        st["acc"] += s.stats.accepted
                        st["dra"] += s.stats.drafted
                        st["rounds"] += s.stats.target_forwards - (1 if plen > 1 else 0)
                    st["identical"] &= s.tokens == plain_out[i]
    plain_s = sum(plain_best)
    ctx = plen + n // 2
    flops_full = flops_per_token(cfg, full, ctx)
    rows = []
    for (t, k), secs in spec_best.items():
        st = spec_stats[(t, k)]
        rounds = st["rounds"]
        per_round = len(prompts) * n / rounds
        mean_k = st["dra"] / rounds
        c = flops_per_token(cfg, model.resolve_widths(tier=t), ctx) / flops_full
        kk = max(1, round(mean_k))
        with model.at_width(widths=full):
            verify_ratio = _verify_cost(model, kk, ctx)
        rows.append({
            "draft_tier": t, "draft_tokens": k,
            "acceptance_rate": st["acc"] / st["dra"] if st["dra"] else 0.0,
            "tokens_per_round": per_round, "mean_draft_len": mean_k,
            "plain_tokens_per_s": len(prompts) * n / plain_s,
            "speculative_tokens_per_s": len(prompts) * n / sum(secs),
            "speedup": plain_s / sum(secs), "identical": st["identical"],
            "draft_flop_ratio": c,
            "verify_cost_here": verify_ratio,
            # Leviathan et al.'s cost model where a (k+1)-token verify costs one decode step
            # (memory-bound batch-1 decoding on a GPU) and a draft step costs its FLOP share.
            "projected_speedup_memory_bound": per_round / (mean_k * c + 1),
        })
    return {"checkpoint": str(ckpt), "config": cfg.to_dict(),
            "trained_by": "matformer train" + ("" if args.ckpt else f" (defaults, {args.train_steps} steps)"),
            "prompts": len(prompts), "prompt_len": plen, "new_tokens": n,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few tokens (smoke run)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=48, help="decoded tokens per tier run")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ckpt", default=None, help="a checkpoint trained by `matformer train`")
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--work", default="runs/bench-decode", help="where the trained model is kept")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--spec-tokens", type=int, default=64)
    ap.add_argument("--skip-tiers", action="store_true")
    ap.add_argument("--skip-speculative", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: steadier timings on a shared machine)")
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.layers, args.heads, args.kv_heads = 256, 2048, 2, 4, 2
        args.tokens, args.repeats, args.spec_tokens, args.prompts = 16, 2, 24, 2
        args.train_steps = min(args.train_steps, 20)
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "decode", "args": vars(args), "torch": torch.__version__,
                    "machine": platform.machine(), "threads": torch.get_num_threads()}
    if not args.skip_tiers:
        t0 = time.perf_counter()
        result["tiers"] = bench_tiers(args)
        print(f"\ndecoding at each tier (batch 1, greedy, KV cache; "
              f"H={args.hidden}, FFN={args.ffn}, {args.layers} layers; {time.perf_counter() - t0:.0f}s)")
        print(f"{'tier':>4} {'width':>6} {'non-emb':>10} {'tok/s':>8} {'speed-up':>9} "
              f"{'FLOP ratio':>10} {'measured/ideal':>15}")
        for r in result["tiers"]["rows"]:
            print(f"{r['tier']:>4} {r['width']:>6} {r['non_embedding_params'] / 1e6:>9.1f}M "
                  f"{r['decode_tokens_per_s']:>8.1f} {r['speedup']:>8.2f}x "
                  f"{r['flop_ratio_speedup']:>9.2f}x {r['fraction_of_flop_ratio']:>15.2f}")
    if not args.skip_speculative:
        t0 = time.perf_counter()
        result["speculative"] = spec = bench_speculative(args)
        print(f"\nspeculative decoding at full width (greedy, shared KV cache; {spec['prompts']} "
              f"prompts x {spec['new_tokens']} tokens; {spec['trained_by']}; "
              f"{time.perf_counter() - t0:.0f}s)")
        print(f"{'draft':>6} {'k':>9} {'accept%':>8} {'tok/round':>9} {'plain tok/s':>12} "
              f"{'spec tok/s':>11} {'speed-up':>9} {'identical':>9} {'verify cost':>11} "
              f"{'draft FLOPs':>11} {'projected':>9}")
        for r in spec["rows"]:
            print(f"tier {r['draft_tier']} {str(r['draft_tokens']):>9} {100 * r['acceptance_rate']:>8.1f} "
                  f"{r['tokens_per_round']:>9.2f} {r['plain_tokens_per_s']:>12.1f} "
                  f"{r['speculative_tokens_per_s']:>11.1f} {r['speedup']:>8.2f}x "
                  f"{'yes' if r['identical'] else 'NO':>9} {r['verify_cost_here']:>10.2f}x "
                  f"{r['draft_flop_ratio']:>11.2f} {r['projected_speedup_memory_bound']:>8.2f}x")
        print("verify cost: a (k+1)-token forward over a 1-token one, measured here; projected: "
              "speed-up if verify cost were 1x (memory-bound GPU decoding) and a draft step cost "
              "its FLOP share")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
