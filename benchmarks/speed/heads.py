"""Nested attention heads (issue 11): what running g of G KV heads costs and saves.

1. Attention forward time at g KV heads of ONE G-head model (prefix views of q/k/v rows and o
   columns) vs an attention BUILT with g heads holding the same weights, interleaved in the same
   run, ratio of the best of the repeats (goal <= 1.10), and the KV cache each allocates for the
   same context (goal: equal bytes: the runtime cache holds only the active heads).
2. Batch-1 greedy decoding speed of the whole model at every (tier, kv_heads) point against the
   FLOP ratio (model FLOPs per decoded token, full / point: 2 x non-embedding parameters plus the
   attention over the context, 4 x layers x query heads x head_dim x context).

    .venv/bin/python -m benchmarks.speed.heads                 # CPU, writes benchmarks/results/heads.json
    .venv/bin/python -m benchmarks.speed.heads --quick         # a tiny shape for a smoke run
    PYTHONPATH=src python3 -m benchmarks.speed.heads --device cuda --out $OUT/heads.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import device_name, parser, write_json
from matformer import MatFormerConfig, MatFormerLM
from matformer.inference.decode import generate
from matformer.models.lm.model import Attention
from matformer.models.lm.shapes import kv_cache_bytes_per_token, non_embedding_parameters
from matformer.tiers import head_granularities


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _built_attention(full: Attention, cfg: MatFormerConfig, g: int) -> Attention:
    """An attention module built with g KV heads holding the first g heads of `full`."""
    small = Attention(cfg.with_kv_heads(g), 0).to(full.q_proj.weight.device,
                                                  full.q_proj.weight.dtype)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w = getattr(full, name).weight
            getattr(small, name).weight.copy_(w[tuple(slice(0, d) for d in
                                                      getattr(small, name).weight.shape)])
    return small


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def attention_table(model: MatFormerLM, args: argparse.Namespace,
                    device: torch.device) -> list[dict]:
    cfg = model.config
    full = model.model.layers[0].self_attn
    x = torch.randn(args.batch, args.seq, cfg.hidden_size, device=device,
                    dtype=model.lm_head.weight.dtype)
    pos = torch.arange(args.seq, device=device).expand(args.batch, -1)
    cos, sin = model.rotary(pos, x.dtype)
    rows = []
    for g in head_granularities(cfg.base_kv_heads):
        built = _built_attention(full, cfg, g)
        full.kv_heads = g
        with torch.no_grad():
            torch.testing.assert_close(full(x, cos, sin, None, 0), built(x, cos, sin, None, 0),
                                       rtol=1e-3, atol=1e-3)
            sliced_t, built_t = [], []
            for _ in range(args.repeats):  # interleaved: both see the same machine state
                sliced_t.append(_time(lambda: full(x, cos, sin, None, 0), device))
                built_t.append(_time(lambda b=built: b(x, cos, sin, None, 0), device))
        full.kv_heads = full.stored_kv_heads
        with model.at_width(kv_heads=g):
            runtime_cache = model.new_cache(1, args.seq).bytes_per_token
        built_model_cfg = cfg.with_kv_heads(g)
        built_cache = kv_cache_bytes_per_token(built_model_cfg, itemsize=x.element_size())
        rows.append({"kv_heads": g, "query_heads": g * cfg.group_size,
                     "sliced_ms": 1e3 * min(sliced_t), "built_ms": 1e3 * min(built_t),
                     "ratio": min(sliced_t) / min(built_t),
                     "ratio_median": statistics.median(sliced_t) / statistics.median(built_t),
                     "kv_cache_bytes_per_token_runtime": runtime_cache,
                     "kv_cache_bytes_per_token_built": built_cache})
    return rows


def flops_per_token(cfg: MatFormerConfig, widths: list[int], heads: list[int], ctx: int) -> float:
    attn = sum(4 * g * cfg.group_size * cfg.head_dim * ctx for g in heads)  # type: ignore[operator]
    return 2 * non_embedding_parameters(cfg, widths, heads) + attn


def decode_table(model: MatFormerLM, args: argparse.Namespace, device: torch.device) -> list[dict]:
    cfg = model.config
    g0 = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (args.prompt,), generator=g0).tolist()
               for _ in range(args.prompts)]
    ctx = args.prompt + args.new_tokens // 2  # mean context of a decoded token
    L = cfg.num_hidden_layers
    points = [(t, g) for t in range(args.tiers) for g in head_granularities(cfg.base_kv_heads)]
    generate(model, prompts[0], 4, ignore_eos=True)  # warm-up
    rows, full_rate, full_flops = [], None, None
    for t, g in points:
        kw = {"tier": t, "kv_heads": g}
        generate(model, prompts[0], 2, ignore_eos=True, **kw)
        rates = []
        for _ in range(args.decode_repeats):
            secs = sum(generate(model, p, args.new_tokens, ignore_eos=True, **kw).stats.seconds
                       for p in prompts)
            rates.append(len(prompts) * args.new_tokens / secs)
        rate = max(rates)
        flops = flops_per_token(cfg, [cfg.base >> t] * L, [g] * L, ctx)
        if full_rate is None:
            full_rate, full_flops = rate, flops
        rows.append({"tier": t, "kv_heads": g, "tokens_per_s": rate,
                     "speedup": rate / full_rate, "flop_ratio": full_flops / flops,
                     "non_embedding_params": non_embedding_parameters(cfg, [cfg.base >> t] * L,
                                                                      [g] * L),
                     "kv_cache_bytes_per_token": kv_cache_bytes_per_token(
                         cfg, [g] * L, model.lm_head.weight.element_size())})
    return rows


def _args() -> argparse.Namespace:
    ap = parser(__doc__, full_doc=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16, help="query heads of the full model")
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads G of the full model")
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tiers", type=int, default=4, help="decode tiers 0..N-1")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--decode-repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/heads.json")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.heads, args.kv_heads, args.ffn, args.layers = 256, 8, 4, 1024, 2
        args.seq, args.repeats, args.new_tokens, args.prompt, args.tiers = 128, 5, 24, 16, 2
    if args.device.startswith("cuda") and not args.quick:
        args.hidden, args.heads, args.ffn, args.layers = 2048, 32, 8192, 8
        args.seq, args.batch = 2048, 8
    return args


def main() -> None:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    cfg = MatFormerConfig(vocab_size=4096, hidden_size=args.hidden, intermediate_size=args.ffn,
                          num_hidden_layers=args.layers, num_attention_heads=args.heads,
                          num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                          max_position_embeddings=max(args.seq, args.prompt + args.new_tokens + 8))
    model = MatFormerLM(cfg).to(device, dtype).eval()
    t0 = time.perf_counter()
    attn = attention_table(model, args, device)
    decode = decode_table(model, args, device)
    out = {"device": device_name(device), "torch": torch.__version__,
           "dtype": str(dtype), "threads": torch.get_num_threads(), "config": cfg.to_dict(),
           "args": vars(args), "attention": attn, "decode": decode,
           "seconds": time.perf_counter() - t0}
    print(f"attention forward, batch {args.batch} x {args.seq} tokens, {dtype}, {out['device']}")
    print(f"{'kv heads':>8} {'q heads':>7} {'sliced ms':>10} {'built ms':>9} {'ratio':>6} "
          f"{'KV B/tok runtime':>17} {'built':>7}")
    for r in attn:
        print(f"{r['kv_heads']:>8} {r['query_heads']:>7} {r['sliced_ms']:10.3f} "
              f"{r['built_ms']:9.3f} {r['ratio']:6.3f} {r['kv_cache_bytes_per_token_runtime']:>17,}"
              f" {r['kv_cache_bytes_per_token_built']:>7,}")
    print(f"\nbatch-1 greedy decoding, prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"{'tier':>4} {'kv':>3} {'tok/s':>8} {'speed-up':>9} {'FLOP ratio':>11} {'KV B/tok':>9}")
    for r in decode:
        print(f"{r['tier']:>4} {r['kv_heads']:>3} {r['tokens_per_s']:8.1f} {r['speedup']:8.2f}x "
              f"{r['flop_ratio']:10.2f}x {r['kv_cache_bytes_per_token']:>9,}")
    path = Path(args.out)
    write_json(path, out)
    print(f"\nwrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
