"""Compilation paid once: where compiled decode steps are kept, and what compiling cost.

`torch.compile` of the static-cache step (`static_cache.StaticDecoder`) spends most of its time
in inductor: generating and building C++ (CPU) or Triton (GPU) kernels, tens of seconds to
minutes for a real model. PyTorch keeps what inductor built on disk (the FX graph cache and the
AOTAutograd cache, keyed by the graph, the inputs' shapes and the torch version), so a second
process that traces the same graph loads the kernels instead of building them.
`enable_compile_cache()` turns both caches on and points them at matformer's cache folder
(`$MATFORMER_CACHE/inductor`, default `~/.cache/matformer/inductor`; a TORCHINDUCTOR_CACHE_DIR
the user set wins), so a second `matformer generate --compile` of the same checkpoint reuses
the first one's kernels. Inductor also probes, in every process, which vector instructions
(AVX2, AVX-512, AMX) its C++ kernels may use, by building and loading a test library per
instruction set in child processes (seconds on a busy machine). `enable_compile_cache` runs
that probe once, before the first compile; when it finds every set the CPU reports usable, the
finding is kept beside the kernels (`vec_isa.json`, keyed by the torch version and the CPU's
flags), later processes skip the probe, and every process compiles with
`torch._inductor.config.cpp.vec_isa_ok = True` (which then means exactly what the probe found;
the setting is part of the kernels' cache key, so the first run's kernels are the later runs').
What is not cached across processes: dynamo's tracing of the Python step (paid again).

`compile_stats()` counts, for this process, the graphs compiled, the wall time of the calls
that compiled them and inductor's cache hits and misses; `CompileStats.since(before)` is what
one call (a `generate`, an `eval`) spent, which the command line reports.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def _torch_default_dir() -> str | None:
    """The folder inductor picks by itself (and writes into TORCHINDUCTOR_CACHE_DIR once it has
    been asked), when it was imported already: that is not a choice of the user's."""
    utils = sys.modules.get("torch._inductor.runtime.cache_dir_utils")
    try:
        return os.path.abspath(utils.default_cache_dir()) if utils is not None else None
    except Exception:  # noqa: BLE001 - torch internals: no default known
        return None


def compile_cache_dir() -> Path:
    """Where compiled kernels are kept: TORCHINDUCTOR_CACHE_DIR when the user set it, else
    $MATFORMER_CACHE/inductor, else ~/.cache/matformer/inductor."""
    user = os.environ.get(CACHE_ENV)
    if user and os.path.abspath(user) != _torch_default_dir():
        return Path(user)
    root = os.environ.get("MATFORMER_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "matformer") / "inductor"


_ENABLED: list[Path] = []


def enable_compile_cache() -> Path:
    """Turn on inductor's on-disk FX graph cache and the AOTAutograd cache in
    `compile_cache_dir()` (once per process, before the first compile: inductor reads the
    folder from the environment); returns the folder."""
    if _ENABLED:
        return _ENABLED[0]
    folder = compile_cache_dir()  # before torch's imports below set the variable themselves
    os.environ[CACHE_ENV] = str(folder)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    if inductor_config.cpp.vec_isa_ok is None and _vec_isa_usable(folder):
        # Every set the CPU reports is usable (probed here once, or by an earlier process):
        # set before the first compile, so the first run's kernels are keyed as later runs'.
        inductor_config.cpp.vec_isa_ok = True
    _ENABLED.append(folder)
    return folder


def _vec_isa_key() -> dict[str, Any] | None:
    """What the vector-instruction probe's finding depends on: the torch version and the
    instruction sets the CPU reports (None off x86 or when torch's probe is not as expected)."""
    try:
        import torch
        from torch._inductor import cpu_vec_isa

        flags = cpu_vec_isa.x86_isa_checker()
        candidates = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
                      if all(f in flags for f in str(isa).split())]
    except (ImportError, AttributeError):
        return None
    return {"torch": torch.__version__, "cpu_flags": sorted(flags), "candidates": candidates} \
        if candidates else None


def _read_vec_isa(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "vec_isa.json").read_text())
    except (OSError, ValueError):
        return None


def _vec_isa_usable(folder: Path) -> bool:
    """Whether inductor's probe finds every vector instruction set the CPU reports usable:
    from `folder`'s vec_isa.json when it matches this torch and CPU, else by probing now (once
    per machine and torch version: the finding is written there)."""
    key = _vec_isa_key()
    if key is None:
        return False
    if _read_vec_isa(folder) == key:
        return True
    try:
        from torch._inductor import cpu_vec_isa

        found = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
    except (ImportError, AttributeError):
        return False
    if found != key["candidates"]:
        return False
    tmp = folder / f"vec_isa.json.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(key))
        tmp.replace(folder / "vec_isa.json")
    except OSError:
        tmp.unlink(missing_ok=True)
    return True


@dataclass
class CompileStats:
    """Compilation in this process (`compile_stats()`), or in one call (`since`)."""

    graphs: int = 0
    """Graphs dynamo compiled."""
    seconds: float = 0.0
    """Wall time of the decoding calls that compiled them (a step's own time included)."""
    cache_hits: int = 0
    """Graphs whose kernels inductor loaded from its on-disk cache."""
    cache_misses: int = 0
    """Graphs inductor built (and stored)."""

    def since(self, before: CompileStats) -> CompileStats:
        """What was compiled between `before` and this snapshot."""
        return CompileStats(self.graphs - before.graphs, self.seconds - before.seconds,
                            self.cache_hits - before.cache_hits,
                            self.cache_misses - before.cache_misses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: 'compiled 2 graphs in 41.3 s (kernels built: 2, loaded from the cache: 0;
        cache: ~/.cache/matformer/inductor)', or that nothing was compiled."""
        if not self.graphs:
            return "nothing compiled (every graph was already compiled in this process)"
        return (f"compiled {self.graphs} graph{'s' if self.graphs != 1 else ''} in "
                f"{self.seconds:.1f} s (kernels built: {self.cache_misses}, loaded from the "
                f"cache: {self.cache_hits}; cache: {compile_cache_dir()})")


_SECONDS = [0.0]


def _counters() -> Any:
    """dynamo's counters, or None when dynamo was never imported (nothing compiled; importing
    it would cost seconds)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return getattr(utils, "counters", None)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process."""
    counters = _counters()
    return int(counters["stats"]["unique_graphs"]) if counters is not None else 0


def record_compile_seconds(seconds: float) -> None:
    """Add the wall time of a call that compiled (`StaticDecoder` calls it)."""
    _SECONDS[0] += seconds


def compile_stats() -> CompileStats:
    """This process's compilation so far."""
    counters = _counters()
    if counters is None:
        return CompileStats(seconds=_SECONDS[0])
    ind = counters["inductor"]
    return CompileStats(compiled_graphs(), _SECONDS[0], int(ind["fxgraph_cache_hit"]),
                        int(ind["fxgraph_cache_miss"]))
