"""--compile reports the compile time apart from the decoding speed (issue 24)."""

from __future__ import annotations

from types import SimpleNamespace

from matformer.cli.generate import compile_report
from matformer.inference.sampling import GenerationStats


def test_compile_time_is_taken_out_of_the_speed() -> None:
    out = SimpleNamespace(stats=GenerationStats(prompt_tokens=3, new_tokens=10, seconds=3.0))
    assert compile_report(1.0, [out]) == ("compiled in 1.0 s; decoding without the "
                                          "compilation: 5.0 tokens/s")
    assert compile_report(3.0, [out]).endswith("n/a")  # all of the time was compiling
