"""Decoding through transformers' `generate`: matformer's class vs transformers' Llama, same weights.

A random model of a preset (default `small`: hidden 256, 6 layers) is saved and sliced to a
uniform tier (a plain Llama checkpoint) and to a Mix'n'Match setting. Timed, alternating, each
--repeats times (greedy, --new tokens after a --prompt-token prompt, batch 1):

- `llama`: transformers' `LlamaForCausalLM.from_pretrained(tier).generate` (the reference);
- `matformer-hf`: `matformer.hf.MatFormerForCausalLM.from_pretrained(tier).generate`;
- `matformer`: matformer's own `generate` on `load_model(tier)`;
- `mixnmatch-hf`: `AutoModelForCausalLM.from_pretrained(mixnmatch).generate` (no Llama can load
  it: reported beside the tier, not as a ratio).

Reported: median tokens/s and the ratio of each to `llama`, and whether the greedy tokens of the
three uniform runs are the same.

    .venv/bin/python -m benchmarks.speed.hf                  # ~1 minute on 2 busy cores
    .venv/bin/python -m benchmarks.speed.hf --quick          # a smoke run
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, hardware, parser, write_json


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser(__doc__, full_doc=True)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="debug preset, 16 new tokens, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS / "hf.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.new, args.repeats = "debug", 16, 1

    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from matformer import (
        MatFormerConfig,
        MatFormerLM,
        generate,
        load_model,
        save_model,
        slice_checkpoint,
    )
    from matformer.hf import MatFormerForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MatFormerConfig.from_preset(args.preset)
    n = cfg.num_hidden_layers
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        save_model(MatFormerLM(cfg).eval(), root / "full")
        slice_checkpoint(root / "full", root / "tier", tier=1)
        mnm = [cfg.base >> (1 + i % 2) for i in range(n)]  # tiers 1 and 2, alternating
        slice_checkpoint(root / "full", root / "mnm", widths=mnm)
        prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_tokens))
        runs: dict[str, Any] = {
            "llama": LlamaForCausalLM.from_pretrained(root / "tier").eval(),
            "matformer-hf": MatFormerForCausalLM.from_pretrained(root / "tier").eval(),
            "matformer": load_model(root / "tier"),
            "mixnmatch-hf": AutoModelForCausalLM.from_pretrained(root / "mnm").eval(),
        }

        def once(name: str) -> tuple[float, list[int]]:
            model = runs[name]
            t0 = time.perf_counter()
            if name == "matformer":
                toks = generate(model, prompt[0].tolist(), args.new, ignore_eos=True).tokens
            else:
                with torch.no_grad():
                    out = model.generate(prompt, max_new_tokens=args.new, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
                toks = out[0, prompt.shape[1]:].tolist()
            return args.new / (time.perf_counter() - t0), toks

        for name in runs:  # warm-up
            once(name)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.repeats):
            for name in runs:
                rate, tokens[name] = once(name)
                rates[name].append(rate)
    med = {name: statistics.median(r) for name, r in rates.items()}
    same = tokens["llama"] == tokens["matformer-hf"] == tokens["matformer"]
    print(f"{args.preset}: hidden {cfg.hidden_size}, {n} layers; {args.prompt_tokens}-token prompt, "
          f"{args.new} new tokens, greedy, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'run':<14}{'tokens/s':>10}{'vs llama':>10}")
    for name, v in med.items():
        print(f"{name:<14}{v:>10.1f}{v / med['llama']:>9.2f}x")
    print(f"greedy tokens equal (llama, matformer-hf, matformer): {same}")
    doc = {"preset": args.preset, "widths_tier": cfg.base >> 1, "widths_mixnmatch": mnm,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new,
           "repeats": args.repeats, "threads": args.threads, "tokens_per_s": med,
           "all_rates": rates, "ratio_vs_llama": {k: v / med["llama"] for k, v in med.items()},
           "greedy_tokens_equal": same, "hardware": hardware()}
    write_json(args.out, doc)
    return doc


if __name__ == "__main__":
    main()
