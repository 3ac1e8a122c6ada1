"""Per family (Llama 3 rope, Mistral window, Qwen2 biases, Qwen3 q/k norms, Gemma 3):
load time and greedy decode tokens/s, matformer vs the family's own transformers class on the
same weights, in the same run.

For each family a random model (--hidden, --layers, ... ; the same shape for all) is saved by
transformers' `save_pretrained`. Then, alternating the two sides --repeats times:

- load: `matformer.load_model(folder)` vs `<Family>ForCausalLM.from_pretrained(folder)` in this
  process (imports warmed first), to the end of a first forward of 16 tokens;
- decode: greedy, --new tokens after a --prompt-token prompt, batch 1, eager, KV cache:
  `matformer.inference.decode.generate` vs transformers' `generate(do_sample=False)` (dynamic
  cache), EOS ignored on both sides; both produce the same tokens (checked: reported as
  `same_tokens`).

Reported: medians, and ratios ours/theirs (load: lower is better; decode: higher is better).

    .venv/bin/python -m benchmarks.speed.families              # ~2 min on 2 busy cores
    .venv/bin/python -m benchmarks.speed.families --quick      # smoke run
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, hardware, parser, write_json

FAMILIES = {
    "llama3 (rope llama3)": ("Llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    "mistral (window 64)": ("Mistral", {"sliding_window": 64}),
    "qwen2 (q/k/v biases)": ("Qwen2", {"tie_word_embeddings": True}),
    "qwen3 (q/k norms)": ("Qwen3", {"head_dim": 64}),
    # Gemma 3's defaults are a 2B's (head_dim 256): the same head size as the others here, a
    # window the run exceeds (sliding and global layers both work), every 2nd layer global.
    "gemma3 (window 32)": ("Gemma3", {"head_dim": 32, "query_pre_attn_scalar": 32,
                                      "sliding_window": 32, "sliding_window_pattern": 2}),
}
CONFIG_CLASSES = {"Gemma3": "Gemma3TextConfig"}
"""transformers' config class when it is not `<kind>Config` (Gemma3Config is the multimodal one)."""


def _save(kind: str, kw: dict, shape: dict, folder: Path) -> None:
    import transformers

    cfg = getattr(transformers, CONFIG_CLASSES.get(kind, f"{kind}Config"))(**{**shape, **kw})
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(cfg)
    model.save_pretrained(folder)


def _load_ours(folder: Path, ids: torch.Tensor) -> tuple[float, torch.nn.Module]:
    from matformer.io.checkpoint import load_model

    t0 = time.perf_counter()
    model = load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        model(ids)
    return time.perf_counter() - t0, model


def _load_theirs(kind: str, folder: Path, ids: torch.Tensor) -> tuple[float, torch.nn.Module]:
    import transformers

    t0 = time.perf_counter()
    model = getattr(transformers, f"{kind}ForCausalLM").from_pretrained(
        folder, dtype=torch.float32).eval()
    with torch.no_grad():
        model(ids)
    return time.perf_counter() - t0, model


def _decode_ours(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    from matformer.inference.decode import generate

    t0 = time.perf_counter()
    out = generate(model, prompt, n, ignore_eos=True)
    return n / (time.perf_counter() - t0), list(out.tokens)


def _decode_theirs(model, prompt: list[int], n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return n / (time.perf_counter() - t0), out[0, len(prompt):].tolist()


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads, max_position_embeddings=1024)
    import transformers  # noqa: F401  (warm imports: not part of a load time)

    import matformer.io.checkpoint  # noqa: F401

    ids = torch.arange(16).view(1, 16) % args.vocab
    prompt = [(7 * i + 3) % args.vocab for i in range(args.prompt)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, kw) in FAMILIES.items():
            folder = Path(tmp) / kind
            _save(kind, kw, shape, folder)
            loads: dict[str, list[float]] = {"ours": [], "theirs": []}
            rates: dict[str, list[float]] = {"ours": [], "theirs": []}
            same = True
            for _ in range(args.repeats):
                t, ours = _load_ours(folder, ids)
                loads["ours"].append(t)
                t, theirs = _load_theirs(kind, folder, ids)
                loads["theirs"].append(t)
                r, a = _decode_ours(ours, prompt, args.new)
                rates["ours"].append(r)
                r, b = _decode_theirs(theirs, prompt, args.new)
                rates["theirs"].append(r)
                same = same and a == b
                del ours, theirs
            med = {k: statistics.median(v) for k, v in {**{f"load_{s}": loads[s] for s in loads},
                                                        **{f"tok_s_{s}": rates[s]
                                                           for s in rates}}.items()}
            rows.append({"family": name, "transformers_class": f"{kind}ForCausalLM",
                         **{k: round(v, 4) for k, v in med.items()},
                         "load_ratio": round(med["load_ours"] / med["load_theirs"], 3),
                         "decode_ratio": round(med["tok_s_ours"] / med["tok_s_theirs"], 3),
                         "same_tokens": same, "samples": {"load": loads, "tok_s": rates}})
            print(f"{name:24s} load {med['load_ours']:.3f}s vs {med['load_theirs']:.3f}s "
                  f"({rows[-1]['load_ratio']:.2f}x)   decode {med['tok_s_ours']:.1f} vs "
                  f"{med['tok_s_theirs']:.1f} tok/s ({rows[-1]['decode_ratio']:.2f}x)  "
                  f"same tokens: {same}")
    return {"benchmark": "families", "shape": shape, "prompt_tokens": args.prompt,
            "new_tokens": args.new, "repeats": args.repeats, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "hardware": hardware(), "rows": rows}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny shape, one repeat")
    p.add_argument("--out", default=str(RESULTS / "families.json"))
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.new, args.repeats = 64, 2, 512, 16, 1
    doc = run(args)
    print(f"wrote {write_json(args.out, doc)}")


if __name__ == "__main__":
    main()
