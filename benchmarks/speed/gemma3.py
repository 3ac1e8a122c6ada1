"""Gemma 3 text: load time and greedy decode tokens/s of matformer vs transformers'
Gemma3ForCausalLM on the same random weights in the same run (ratios), plus matformer's tiers.

A random Gemma 3 shaped like the 270M's block (hidden 640, FFN 2048, 4 heads on 1 KV head of
256, sliding window 512, every 6th layer global), with a smaller vocabulary and fewer layers so
it runs on a shared CPU in seconds; float32. Load: `load_model` vs `from_pretrained` of the same
folder (best of `--repeats`). Decode: greedy, `--new` tokens after a `--prompt`-token prompt
(longer than the window, so sliding layers mask), best of `--repeats`; both produce the same
tokens (checked). Writes benchmarks/results/gemma3.json.

  python -m benchmarks.speed.gemma3 --threads 1
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, hardware, parser, write_json


def build(folder: Path, layers: int, vocab: int, window: int) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=640, intermediate_size=2048, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=window,
        max_position_embeddings=32768, query_pre_attn_scalar=256)
    transformers.Gemma3ForCausalLM(cfg).eval().save_pretrained(folder)


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS / "gemma3.json"))
    args = p.parse_args()

    import torch
    import transformers

    from matformer.inference.decode import generate
    from matformer.io.checkpoint import load_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "g3"
        build(folder, args.layers, args.vocab, args.window)
        t_ours, ours = best(lambda: load_model(folder), args.repeats)
        t_hf, hf = best(lambda: transformers.Gemma3ForCausalLM.from_pretrained(folder).eval(),
                        args.repeats)
    prompt = torch.randint(0, args.vocab, (args.prompt,),
                           generator=torch.Generator().manual_seed(0)).tolist()

    def ours_decode(**kw):
        return generate(ours, prompt, max_new_tokens=args.new, ignore_eos=True, **kw).tokens

    def hf_decode():
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new, do_sample=False,
                              min_new_tokens=args.new)
        return out[0, len(prompt):].tolist()

    s_ours, tok_ours = best(ours_decode, args.repeats)
    s_hf, tok_hf = best(hf_decode, args.repeats)
    tiers = {}
    for tier in (1, 2):
        s, _ = best(lambda tier=tier: ours_decode(tier=tier), args.repeats)
        tiers[tier] = args.new / s
    row = {
        "family": "gemma3", "layers": args.layers, "vocab": args.vocab, "window": args.window,
        "prompt": args.prompt, "new_tokens": args.new, "threads": args.threads,
        "load_s": {"matformer": t_ours, "transformers": t_hf, "ratio": t_ours / t_hf},
        "decode_tok_s": {"matformer": args.new / s_ours, "transformers": args.new / s_hf,
                         "ratio": s_hf / s_ours},
        "decode_tok_s_tiers": tiers,
        "same_tokens": tok_ours == tok_hf,
        "hardware": hardware(),
    }
    print(f"{'':14} {'matformer':>10} {'transformers':>13} {'ratio':>7}")
    print(f"{'load s':14} {t_ours:10.3f} {t_hf:13.3f} {t_ours / t_hf:7.2f}")
    print(f"{'decode tok/s':14} {args.new / s_ours:10.1f} {args.new / s_hf:13.1f} "
          f"{s_hf / s_ours:7.2f}")
    print("tiers: " + ", ".join(f"tier {t} {v:.1f} tok/s" for t, v in tiers.items())
          + f"; same greedy tokens: {row['same_tokens']}")
    write_json(args.out, row)


if __name__ == "__main__":
    main()
