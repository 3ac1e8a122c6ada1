"""Decoding speed: every tier, compiled vs eager, speculative decoding, batches, vs transformers.

One model (a checkpoint trained by `matformer train`, --ckpt; or, with --train-steps, one trained
here through `matformer.training.train` at the given shape; or random weights with --random)
decodes greedily. All ratios come from one run, interleaved, so machine load hits both sides:

1. tiers: decode tokens/s at tiers 0..3, eager and compiled (`generate(compile=True)`: static
   cache, torch.compile per width, CUDA graphs on a GPU); speed-up over tier 0 against the
   FLOP-ratio speed-up (2 x matmul weights + attention over the cache, per token).
2. speculative (compiled, greedy, full width): plain decoding vs `speculative_generate` with the
   (draft, k) chosen from costs measured here (`draft_tier="auto"`), each tier as the draft
   with k chosen from the same costs, and --draft-ckpt (an independently trained small model of
   the same tokenizer) as the draft: acceptance, k, speed-up (of whole calls, and after the
   prompt: without plain decoding's prompt time in either), identical output (it must be).
3. batches: tokens/s at batch 1 and --batch, eager vs compiled vs transformers'
   `LlamaForCausalLM.generate` with a static cache on the same weights (tier 0).

    .venv/bin/python -m benchmarks.speed.decode --ckpt runs/bench-decode/ffn8-h512 \
        --draft-ckpt runs/bench-decode/small-h512                    # the CPU numbers
    .venv/bin/python -m benchmarks.speed.decode --quick --random          # smoke run (tiny, CPU)
    PYTHONPATH=src python3 -m benchmarks.speed.decode --device cuda --dtype bfloat16 \
        --hidden 2048 --ffn 16384 --layers 12 --heads 16 --kv-heads 4 --train-steps 300 \
        --work /tmp/bd --out $OUT/decode.json                        # the GPU variant (1.3B)
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, device_name, parser, write_json
from matformer import MatFormerConfig, MatFormerLM
from matformer.inference.decode import generate, generate_batch
from matformer.inference.speculative import speculative_generate
from matformer.models.lm.shapes import parameter_counts


def flops_per_token(cfg: MatFormerConfig, widths: list[int], ctx: float) -> float:
    """Matmul FLOPs of one decoded token: 2 per weight read (non-embedding + lm_head) plus the
    attention scores and weighted sum over `ctx` cached positions."""
    pc = parameter_counts(cfg, widths)
    matmul = pc["non_embedding"] + cfg.vocab_size * cfg.hidden_size
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * ctx
    return 2 * matmul + attn


# ---- the models ------------------------------------------------------------------------------------


def _train_here(args, out: Path, intermediate: int, objective: str) -> Path:
    from matformer.training import TrainConfig, train

    if (out / "config.json").is_file():
        return out
    print(f"training {out} ({args.train_steps} steps, FFN {intermediate}, {objective}) ...")
    train(TrainConfig(out=str(out), steps=args.train_steps, objective=objective,
                      hidden_size=args.hidden, intermediate_size=intermediate,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_positions=512, batch_size=args.train_batch, seq_len=64, lr=3e-3,
                      warmup_steps=max(1, args.train_steps // 10), eval_every=args.train_steps,
                      save_every=10 ** 6, log_every=max(1, args.train_steps // 5),
                      device=args.device, dtype=args.dtype))
    return out


def random_model(args) -> MatFormerLM:
    """Seeded random weights of the shape the arguments give (--hidden, --ffn, ...), in --dtype
    on --device (`decode_profile.py` uses it too)."""
    cfg = MatFormerConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                          intermediate_size=args.ffn, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                          max_position_embeddings=1024)
    torch.manual_seed(0)
    return MatFormerLM(cfg).to(torch.device(args.device), getattr(torch, args.dtype)).eval()


def load_models(args) -> tuple[MatFormerLM, MatFormerLM | None, list[list[int]], str]:
    """(target, separate draft or None, prompts, what the weights are)."""
    from matformer.data.text import heldout_tokens
    from matformer.io.checkpoint import load_model

    if args.random:
        model = random_model(args)
        cfg = model.config
        g = torch.Generator().manual_seed(1)
        prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
        return model, None, prompts.tolist(), "random weights"
    ckpt = Path(args.ckpt) if args.ckpt else _train_here(
        args, Path(args.work) / f"target-{args.train_steps}", args.ffn, "sample")
    draft_ckpt = args.draft_ckpt
    if draft_ckpt is None and not args.ckpt and not args.no_draft_model:
        draft_ckpt = _train_here(args, Path(args.work) / f"small-{args.train_steps}",
                                 args.ffn >> 3, "single")
    dtype = getattr(torch, args.dtype)
    model = load_model(ckpt, device=args.device).to(dtype).eval()
    draft = load_model(draft_ckpt, device=args.device).to(dtype).eval() if draft_ckpt else None
    if draft is not None:
        same = (Path(ckpt) / "tokenizer.json").read_bytes() == \
            (Path(draft_ckpt) / "tokenizer.json").read_bytes()
        assert same, "the draft model must share the target's tokenizer"
    stream = heldout_tokens(ckpt)
    step = max(1, (len(stream) - args.prompt_len) // args.batch)
    prompts = [stream[i * step: i * step + args.prompt_len].tolist() for i in range(args.batch)]
    what = f"trained by matformer train: {ckpt}" + (f"; draft {draft_ckpt}" if draft_ckpt else "")
    return model, draft, prompts, what


# ---- 1. tiers ----------------------------------------------------------------------------------------


def _decode_seconds(model, prompt, n, widths, compile) -> float:
    s = generate(model, prompt, n, widths=widths, ignore_eos=True, compile=compile).stats
    return s.seconds - s.prefill_seconds


def bench_tiers(model, prompt, args) -> dict:
    cfg, n = model.config, args.tokens
    tiers = [t for t in range(4) if (model.base_width >> t) >= 1]
    widths = {t: model.resolve_widths(tier=t) for t in tiers}
    modes = {"eager": False, "compiled": True}
    for t in tiers:
        for c in modes.values():  # warm-up (and compile)
            generate(model, prompt, 4, widths=widths[t], ignore_eos=True, compile=c)
    times = {(m, t): [] for m in modes for t in tiers}
    for _ in range(args.repeats):
        for t in tiers:
            for m, c in modes.items():
                times[(m, t)].append(_decode_seconds(model, prompt, n, widths[t], c))
    ctx = len(prompt) + n / 2
    rows = []
    for t in tiers:
        ideal = flops_per_token(cfg, widths[0], ctx) / flops_per_token(cfg, widths[t], ctx)
        row = {"tier": t, "width": widths[t][0], "flop_ratio_speedup": ideal,
               "non_embedding_params": parameter_counts(cfg, widths[t])["non_embedding"]}
        for m in modes:
            sp = statistics.median(a / b for a, b in zip(times[(m, 0)], times[(m, t)], strict=True))
            row[m] = {"tokens_per_s": (n - 1) / statistics.median(times[(m, t)]),
                      "speedup": sp, "fraction_of_flop_ratio": sp / ideal}
        row["compiled_over_eager"] = statistics.median(
            a / b for a, b in zip(times[("eager", t)], times[("compiled", t)], strict=True))
        rows.append(row)
    return {"tokens": n, "prompt_len": len(prompt), "rows": rows}


# ---- 2. speculative ------------------------------------------------------------------------------------


def bench_speculative(model, draft_model, prompts, args) -> dict:
    n = args.spec_tokens
    kw = dict(ignore_eos=True, compile=True, max_draft_tokens=args.max_k)
    prompts = prompts[: args.prompts]
    auto = speculative_generate(model, prompts[0], n, draft_tier="auto", **kw)  # costs, compiles
    costs = auto.extra.get("costs")  # None: auto's probe chose plain decoding, measuring nothing
    configs = {"auto": dict(draft_tier="auto")}
    for t in (1, 2, 3):
        configs[f"tier {t}"] = dict(draft_tier=t, draft_tokens="auto")
    if draft_model is not None:
        configs["separate model"] = dict(draft_model=draft_model, draft_tokens="auto")
        speculative_generate(model, prompts[0], 8, **configs["separate model"], **kw)
    cfg_costs = {}
    for name, c in configs.items():  # warm-up: every graph compiled, costs measured once each
        out = speculative_generate(model, prompts[0], n, costs=costs, **c, **kw)
        cfg_costs[name] = out.extra.get("costs", costs)
    plain_s, prompt_s, spec_s = [], [], {name: [] for name in configs}
    stats = {name: {"acc": 0, "dra": 0, "identical": True, "k": None, "draft": None}
             for name in configs}
    for rep in range(args.repeats):
        plain_s.append(0.0)
        prompt_s.append(0.0)
        for name in configs:
            spec_s[name].append(0.0)
        for p in prompts:
            want = generate(model, p, n, ignore_eos=True, compile=True)
            plain_s[-1] += want.stats.seconds
            prompt_s[-1] += want.stats.prefill_seconds
            for name, c in configs.items():
                out = speculative_generate(model, p, n, costs=cfg_costs[name], **c, **kw)
                spec_s[name][-1] += out.stats.seconds
                st = stats[name]
                st["identical"] &= out.tokens == want.tokens
                if rep == 0:
                    st["acc"] += out.stats.accepted
                    st["dra"] += out.stats.drafted
                choice = out.extra.get("choice")
                st["k"], st["draft"] = (choice.k, choice.draft) if choice else (None, None)
    rows = []
    for name in configs:
        st = stats[name]
        rows.append({
            "draft": name, "chosen_draft": st["draft"], "k": st["k"],
            "acceptance_rate": st["acc"] / st["dra"] if st["dra"] else 0.0,
            "plain_tokens_per_s": len(prompts) * n / statistics.median(plain_s),
            "speculative_tokens_per_s": len(prompts) * n / statistics.median(spec_s[name]),
            "speedup": statistics.median(a / b for a, b in zip(plain_s, spec_s[name], strict=True)),
            # after the prompt: both without plain decoding's prompt time (the same forward
            # for both; what speculative decoding spends choosing stays in its time)
            "speedup_after_prompt": statistics.median(
                (a - p) / (b - p) for a, b, p in zip(plain_s, spec_s[name], prompt_s, strict=True)),
            "identical": st["identical"],
        })
    return {"prompts": len(prompts), "new_tokens": n, "costs": costs.to_dict() if costs else None,
            "auto_choice": auto.extra["choice"].to_dict(), "rows": rows}


# ---- 3. batches and transformers --------------------------------------------------------------------------


def _hf_model(model):
    import transformers

    d = {k: v for k, v in model.config.to_dict().items() if not k.startswith("matformer")}
    d.pop("layer_intermediate_sizes", None)
    d.pop("layer_kv_heads", None)
    cfg = transformers.LlamaConfig(**{**d, "architectures": ["LlamaForCausalLM"]})
    w = model.model.embed_tokens.weight
    hf = transformers.LlamaForCausalLM(cfg).to(w.device, w.dtype).eval()
    missing = hf.load_state_dict(model.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    return hf


def _hf_seconds(hf, prompts, n) -> tuple[float, list[list[int]]]:
    dev = hf.device
    ids = torch.tensor(prompts, device=dev)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, cache_implementation="static",
                          pad_token_id=0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out[:, ids.shape[1]:].tolist()


def bench_batches(model, prompts, args) -> dict:
    n = args.tokens
    hf = None if args.no_hf else _hf_model(model)
    rows = []
    for B in sorted({1, args.batch}):
        ps = prompts[:B]
        runs = {"eager": lambda ps=ps: generate_batch(model, ps, n, ignore_eos=True),
                "compiled": lambda ps=ps: generate_batch(model, ps, n, ignore_eos=True,
                                                         compile=True)}
        for f in runs.values():
            f()  # warm-up / compile
        secs = {m: [] for m in runs}
        outs = {}
        if hf is not None:
            _hf_seconds(hf, ps, n)  # warm-up
            secs["transformers"] = []
        for _ in range(args.repeats):
            for m, f in runs.items():
                o = f()
                secs[m].append(o[0].stats.seconds)
                outs[m] = [x.tokens for x in o]
            if hf is not None:
                s, outs["transformers"] = _hf_seconds(hf, ps, n)
                secs["transformers"].append(s)
        med = {m: statistics.median(v) for m, v in secs.items()}
        row = {"batch": B, "tokens_per_s": {m: B * n / s for m, s in med.items()},
               "compiled_over_eager": med["eager"] / med["compiled"],
               "same_tokens_as_eager": {m: o == outs["eager"] for m, o in outs.items()}}
        if hf is not None:
            row["compiled_over_transformers"] = med["transformers"] / med["compiled"]
        rows.append(row)
    return {"tokens": n, "rows": rows}


# ---- main ---------------------------------------------------------------------------------------------------


def _print(result: dict) -> None:
    if "tiers" in result:
        print(f"\n1. decoding at each tier (batch 1, greedy; {result['tiers']['tokens']} tokens)")
        print(f"{'tier':>4} {'width':>6} {'non-emb':>9} {'FLOP ratio':>10} | {'eager tok/s':>11} "
              f"{'speed-up':>8} {'/ideal':>6} | {'compiled tok/s':>14} {'speed-up':>8} "
              f"{'/ideal':>6} | {'compiled/eager':>14}")
        for r in result["tiers"]["rows"]:
            e, c = r["eager"], r["compiled"]
            print(f"{r['tier']:>4} {r['width']:>6} {r['non_embedding_params'] / 1e6:>8.1f}M "
                  f"{r['flop_ratio_speedup']:>9.2f}x | {e['tokens_per_s']:>11.1f} "
                  f"{e['speedup']:>7.2f}x {e['fraction_of_flop_ratio']:>6.2f} | "
                  f"{c['tokens_per_s']:>14.1f} {c['speedup']:>7.2f}x "
                  f"{c['fraction_of_flop_ratio']:>6.2f} | {r['compiled_over_eager']:>13.2f}x")
    if "speculative" in result:
        s = result["speculative"]
        print(f"\n2. speculative decoding, compiled, greedy, full width ({s['prompts']} prompts x "
              f"{s['new_tokens']} tokens)")
        print(f"{'draft':<15} {'chose':<20} {'k':>3} {'accept%':>8} {'plain tok/s':>11} "
              f"{'spec tok/s':>10} {'speed-up':>8} {'after prompt':>12} {'identical':>9}")
        for r in s["rows"]:
            print(f"{r['draft']:<15} {str(r['chosen_draft'] or '-')[:20]:<20} {str(r['k']):>3} "
                  f"{100 * r['acceptance_rate']:>8.1f} {r['plain_tokens_per_s']:>11.1f} "
                  f"{r['speculative_tokens_per_s']:>10.1f} {r['speedup']:>7.2f}x "
                  f"{r['speedup_after_prompt']:>11.2f}x {'yes' if r['identical'] else 'NO':>9}")
        c = s["costs"]
        print("measured costs (ms): target step {:.2f}; draft steps {}; verify {}".format(
            1e3 * c["target_step"],
            ", ".join(f"{k} {1e3 * v:.2f}" for k, v in c["draft_steps"].items()),
            ", ".join(f"k={k} {1e3 * v:.2f}" for k, v in c["verify"].items())))
    if "batches" in result:
        print(f"\n3. batches ({result['batches']['tokens']} new tokens per row, tier 0)")
        for r in result["batches"]["rows"]:
            rates = ", ".join(f"{m} {v:.1f}" for m, v in r["tokens_per_s"].items())
            hf = (f", compiled/transformers {r['compiled_over_transformers']:.2f}x"
                  if "compiled_over_transformers" in r else "")
            print(f"batch {r['batch']}: tok/s {rates}; compiled/eager "
                  f"{r['compiled_over_eager']:.2f}x{hf}; same tokens as eager "
                  f"{r['same_tokens_as_eager']}")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few tokens (smoke run)")
    ap.add_argument("--random", action="store_true", help="random weights (no training)")
    ap.add_argument("--ckpt", default=None, help="target checkpoint trained by `matformer train`")
    ap.add_argument("--draft-ckpt", default=None, help="an independently trained small model")
    ap.add_argument("--no-draft-model", action="store_true")
    ap.add_argument("--train-steps", type=int, default=300, help="steps when training here")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--work", default="runs/bench-decode", help="where models trained here go")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per run")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=4, help="prompts for speculative decoding")
    ap.add_argument("--spec-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-k", type=int, default=8, help="largest draft length the choice considers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: tiers,spec,batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="decode in this dtype (and train in it, through autocast, when training "
                    "here); bfloat16 is what a GPU serves in")
    ap.add_argument("--out", default=str(RESULTS / "decode.json"))
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.layers, args.heads, args.kv_heads = 128, 1024, 2, 4, 2
        args.tokens, args.spec_tokens, args.repeats, args.prompts, args.batch = 12, 16, 1, 2, 4
        args.max_k = 2
        args.train_steps = min(args.train_steps, 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, draft, prompts, what = load_models(args)
    result: dict = {"benchmark": "decode", "args": vars(args), "weights": what,
                    "torch": torch.__version__, "machine": platform.machine(),
                    "device": device_name(args.device),
                    "threads": torch.get_num_threads(), "config": model.config.to_dict()}
    skip = set(args.skip.split(","))
    if "tiers" not in skip:
        result["tiers"] = bench_tiers(model, prompts[0], args)
    if "spec" not in skip:
        result["speculative"] = bench_speculative(model, draft, prompts, args)
    if "batch" not in skip:
        result["batches"] = bench_batches(model, prompts, args)
    result["seconds"] = time.perf_counter() - t0
    print(f"\n{what}; {result['device']}, {result['threads']} threads; {result['seconds']:.0f}s")
    _print(result)
    out = Path(args.out)
    write_json(out, result)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
