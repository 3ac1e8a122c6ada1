"""The server's counters and histograms, written as Prometheus text for `GET /metrics`.

Kept by hand (no client library): a few counters with labels, two gauges read at scrape time,
and cumulative histograms with fixed buckets. The engine thread and the request handlers both
update them, under one lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + body + "}"


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Histogram:
    """A cumulative histogram (seconds)."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(LATENCY_BUCKETS):
            if value <= edge:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """Everything `/metrics` reports. `gauges` are read at scrape time (queue depth, rows)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(
            lambda: defaultdict(float))
        self.histograms: dict[str, Histogram] = {"time_to_first_token_seconds": Histogram(),
                                                 "time_per_output_token_seconds": Histogram(),
                                                 "step_seconds": Histogram()}
        self.gauges: dict[str, Callable[[], float]] = {}

    HELP = {
        "requests_total": "HTTP requests answered, by endpoint and status code",
        "prompt_tokens_total": "prompt tokens prefilled",
        "generated_tokens_total": "tokens generated, by the width that generated them",
        "width_steps_total": "decoding steps run, by width (a step of several widths counts each)",
        "time_to_first_token_seconds": "time from a request's arrival to its first token",
        "time_per_output_token_seconds": "time between a request's consecutive tokens",
        "step_seconds": "wall time of one scheduler step (every width group and prefill chunk)",
        "speculative_rounds_total": "speculative rounds (drafts + one verify forward) of a lone "
                                    "greedy request, by its width",
        "speculative_drafted_tokens_total": "draft tokens proposed by speculative rounds, by the "
                                            "width they were verified at",
        "speculative_accepted_tokens_total": "draft tokens the verifier accepted, by its width",
        "queue_depth": "requests waiting to join the running batch",
        "running_requests": "requests in the running batch",
    }

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            self.histograms[name].observe(seconds)

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        with self.lock:
            for name, series in sorted(self.counters.items()):
                full = f"matformer_{name}"
                out += [f"# HELP {full} {self.HELP.get(name, name)}", f"# TYPE {full} counter"]
                out += [f"{full}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
            for name, h in self.histograms.items():
                full = f"matformer_{name}"
                out += [f"# HELP {full} {self.HELP[name]}", f"# TYPE {full} histogram"]
                out += [f'{full}_bucket{{le="{edge:g}"}} {n}'
                        for edge, n in zip(LATENCY_BUCKETS, h.counts, strict=True)]
                out += [f'{full}_bucket{{le="+Inf"}} {h.total}', f"{full}_sum {h.sum:.6f}",
                        f"{full}_count {h.total}"]
        for name, read in sorted(self.gauges.items()):
            full = f"matformer_{name}"
            out += [f"# HELP {full} {self.HELP.get(name, name)}", f"# TYPE {full} gauge",
                    f"{full} {read():g}"]
        return "\n".join(out) + "\n"
