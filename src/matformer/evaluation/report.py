"""Text the CLI prints for what evaluation returns: the `matformer eval` table and the
`--compare` table. The library returns data (`EvalReport`, `Comparison`); these turn it into
text. Torch-free: it reads fields, never tensors. (The `matformer generate` summary lines are
`matformer.inference.text`.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from matformer.models.lm.shapes import format_count
from matformer.tiers import describe_widths

if TYPE_CHECKING:
    from matformer.evaluation.compare import Comparison
    from matformer.evaluation.lm import EvalReport, WidthResult


def _short_name(r: WidthResult) -> str:
    if r.kind in ("tier", "heads"):
        return r.name
    return (r.kind + " " + ",".join(str(w) for w in r.widths))[:24]


def format_eval_report(report: EvalReport) -> str:
    """The plain-text report of `matformer eval`: a header, one row per width, and the
    speculative decoding table when there is one."""
    lines = [
        f"matformer eval: {report.source}",
        f"data: {report.data} — {report.windows} windows x {report.seq_len} tokens "
        f"({report.tokens} predicted tokens per width); device {report.device}, {report.dtype}",
        f"reference (full) width: {describe_widths(report.base_width, report.reference_widths)}; "
        f"consistency = greedy-token match and {report.kl_direction}",
    ]
    if report.compile_seconds is not None:
        lines.append(f"compiled in {report.compile_seconds:.1f} s (torch.compile, warm-up calls; "
                     f"not in the decode speeds)")
    lines.append("")
    head = (f"{'width':<24} {'non-emb params':>14} {'loss':>7} {'ppl':>9} {'match%':>7} "
            f"{'KL':>8} {'eval tok/s':>11} {'decode tok/s':>12} {'KV B/tok':>9}")
    lines += [head, "-" * len(head)]
    for r in report.results:
        dec = f"{r.decode_tokens_per_s:12.1f}" if r.decode_tokens_per_s is not None else f"{'-':>12}"
        lines.append(
            f"{_short_name(r):<24} {format_count(r.non_embedding_params):>14} {r.loss:7.4f} "
            f"{r.perplexity:9.2f} {100 * r.greedy_match:7.2f} {r.kl_from_reference:8.4f} "
            f"{r.tokens_per_s:11.0f} {dec} {r.kv_cache_bytes_per_token:9,d}"
        )
    if report.speculative:
        lines += ["", *_speculative_table(report)]
    return "\n".join(lines)


def _speculative_table(report: EvalReport) -> list[str]:
    s = report.speculative_settings
    lines = [
        f"speculative decoding (greedy, target = reference width, shared KV cache; "
        f"{s.get('prompts')} prompts x {s.get('prompt_len')} tokens, "
        f"{s.get('new_tokens')} new tokens each, draft_tokens={s.get('draft_tokens')}"
        f"{', compiled' if s.get('compiled') else ''}; plain decoding timed beside each row, "
        f"prompt by prompt)",
    ]
    head = (f"{'draft':<24} {'k':>9} {'accept%':>8} {'plain tok/s':>12} {'spec tok/s':>11} "
            f"{'speed-up':>9} {'identical':>9}")
    lines += [head, "-" * len(head)]
    for sp in report.speculative:
        k = sp.draft_tokens if sp.chosen_draft_tokens is None else sp.chosen_draft_tokens
        lines.append(
            f"{sp.draft_name[:24]:<24} {str(k):>9} {100 * sp.acceptance_rate:8.1f} "
            f"{sp.plain_tokens_per_s:12.1f} {sp.speculative_tokens_per_s:11.1f} "
            f"{sp.speedup:8.2f}x {'yes' if sp.identical else 'NO':>9}"
        )
    c, costs = report.speculative_choice, report.speculative_costs
    if c and costs:
        why = c.get("reason") or "no draft expected to pay"
        pick = (f"plain decoding ({why})" if c["draft"] is None else
                f"{c['draft']}, k={c['k']} at acceptance {100 * c['acceptance']:.0f}% ({why})")
        steps = ", ".join(f"{n} {1e3 * t:.2f}" for n, t in costs["draft_steps"].items())
        verify = ", ".join(f"k={k} {1e3 * t:.2f}" for k, t in sorted(costs["verify"].items()))
        plain = costs.get("plain_step") or costs["target_step"]
        lines += [f"auto chose {pick}, from costs measured here once, in "
                  f"{1e3 * costs.get('seconds', 0.0):.0f} ms before the timed rows (ms): plain "
                  f"step {1e3 * plain:.2f}; target step {1e3 * costs['target_step']:.2f}; "
                  f"draft steps {steps}; verify {verify}"]
    elif c:  # chosen without timing: the parameter counts or the probe's agreement settled it
        lines += [f"auto chose plain decoding ({c.get('reason') or 'no draft expected to pay'}),"
                  f" timing nothing"]
    return lines


def format_comparison(c: Comparison) -> str:
    """`matformer eval A --compare B,C`: one row per tier, one loss column per checkpoint."""
    names = [n if len(n) <= 28 else "…" + n[-27:] for n in c.checkpoints]
    colw = max(10, *(len(n) for n in names))
    lines = [f"matformer eval --compare: {c.data} — {c.windows} windows x {c.seq_len} tokens",
             "held-out loss, nats/token (lower is better); the same windows for every checkpoint",
             "tier    FFN  non-emb params  " + "  ".join(f"{n:>{colw}}" for n in names)]
    for k, t in enumerate(c.tiers):
        cells = "  ".join(f"{c.losses[i][k]:>{colw}.4f}" for i in range(len(names)))
        lines.append(f"{t:>4}  {c.widths[k]:>5}  {format_count(c.non_embedding_params[k]):>14}  "
                     f"{cells}")
    return "\n".join(lines)


def format_vit_report(report: Any) -> str:
    """The plain-text report of `matformer eval` of a MatViT (a `VisionEvalReport` or its dict):
    a header and one row per width."""
    d = report.to_dict() if hasattr(report, "to_dict") else report
    lines = [f"{d['source']}: MatViT, {d['num_images']} held-out images ({d['data']}), "
             f"{d['num_classes']} classes; reference (agreement, retrieval gallery): "
             f"{d['reference']}, {d['threads']} threads",
             "",
             "| width | heads | non-emb params | top-1 | agreement with full | retrieval vs full "
             "gallery | images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in d["results"]:
        heads = r["kv_heads"]
        h = str(heads[0]) if len(set(heads)) == 1 else ",".join(map(str, heads))
        lines.append(f"| {r['name']} | {h} | {format_count(r['non_embedding_params'])} | "
                     f"{r['top1']:.2%} | {r['agreement']:.2%} | {r['retrieval']:.2%} | "
                     f"{r['images_per_s']:,.0f} |")
    return "\n".join(lines)
