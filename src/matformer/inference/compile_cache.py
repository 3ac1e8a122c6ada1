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

Those caches alone leave every new process paying dynamo's tracing of the step, AOTAutograd
and building guards (4-9 s at any model size on the shared 2-core machine, 11% of a first
compile at the small shapes). `PrecompiledStep` removes those too: each graph of the step is
compiled ahead of time (`torch.compile(fn).aot_compile`, PyTorch's precompile), and the whole
result (the graph's kernels, the bytecode that calls them and its guards) is saved as one file
in `compile_cache_dir()/steps`; a later process that calls the step with the same model and
shapes loads that file and runs it without tracing anything (what is left: importing
inductor's runtime, loading the kernels' libraries, two compiler probes torch runs in every
process). A saved graph is only used when (1) its file name, a digest of everything the graph
may depend on besides its guards (`model_key`, `step_key`: torch, Python and matformer
versions, threads, the CPU's instruction sets, the model's class, config, parameter shapes and
dtypes and module types, the width setting, every argument's shapes, strides, dtypes and
values, inference and grad mode), matches; (2) the source of every function it traced is
unchanged; and (3) its guards (tensor shapes, dtypes and strides, the widths and every other
number read from the modules, module globals) pass for the call. Weights are inputs of the
graph, never baked in, so another checkpoint of the same shape reuses the graph with its own
weights. A file that fails any check, or cannot be read, is compiled again and replaced.

`compile_stats()` counts, for this process, the graphs compiled or loaded precompiled, the wall
time of the calls that did it and inductor's cache hits and misses; `CompileStats.since(before)`
is what one call (a `generate`, an `eval`) spent, which the command line reports.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
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
    _remember_isa_builds(folder)  # first: the probe below is remembered for later processes
    if inductor_config.cpp.vec_isa_ok is None and _vec_isa_usable(folder):
        # Every set the CPU reports is usable (probed here once, or by an earlier process):
        # set before the first compile, so the first run's kernels are keyed as later runs'.
        inductor_config.cpp.vec_isa_ok = True
    _remember_headers(folder)
    _ENABLED.append(folder)
    return folder


ISA_BUILDS = "vec_isa_builds.json"
HEADERS = "precompiled_headers.json"


def _read_answers(path: Path) -> dict[str, Any]:
    """The answers kept in `path` (a JSON object), or none when it is missing or torn."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _keep_answer(path: Path, key: str, value: Any) -> None:
    """Add `key: value` to the answers in `path`, atomically (written beside it, then moved
    over it: a reader sees the old file or the new one); a folder that cannot be written
    keeps nothing."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps({**_read_answers(path), key: value}))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)


def _remember_headers(folder: Path) -> None:
    """Keep where inductor's precompiled C++ header is (`codecache._precompile_header`), in
    `folder`: to find it, every process runs the preprocessor over the header and hashes its
    output in two child processes (a tenth of a second to a third, most of what loading a
    precompiled step spends outside Python). The answer is reused while the header file and
    its .gch exist and torch (its install), the header, the command line and the compiler (its
    path, size and time) are those it was found with; otherwise inductor's own way runs."""
    try:
        from torch._inductor import codecache
    except ImportError:
        return
    original = getattr(codecache, "_precompile_header", None)
    if original is None or getattr(original, "_matformer_remembers", False):
        return
    path = folder / HEADERS

    def precompile_header(header: str, hashable_cmd_line: str, **command: Any) -> str:
        key = _digest([_install_key(), header, hashable_cmd_line,
                       sorted((k, _plain(v)) for k, v in command.items())])
        found = _read_answers(path).get(key)
        if isinstance(found, str) and os.path.isfile(found) and os.path.isfile(found + ".gch"):
            return found
        found = original(header, hashable_cmd_line, **command)
        _keep_answer(path, key, found)
        return found

    precompile_header._matformer_remembers = True  # type: ignore[attr-defined]
    codecache._precompile_header = precompile_header


def _plain(value: Any) -> Any:
    """A compile option as the same text in every process (an instruction set by its name,
    flags and macros, not by its repr, which holds an address)."""
    if hasattr(value, "build_arch_flags"):
        return [type(value).__name__, str(value), value.build_arch_flags(),
                list(value.build_macro())]
    return repr(value)


@functools.cache
def _install_key() -> list[Any]:
    """torch's version and install (its files' time) and the C++ compiler inductor runs (its
    path, size and time): what a precompiled header depends on besides its command line."""
    import shutil

    import torch

    def stat(p: str | None) -> list[Any]:
        try:
            st = os.stat(p) if p else None
        except OSError:
            st = None
        return [p, st.st_size, st.st_mtime_ns] if st else [p]

    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        cc = shutil.which(get_cpp_compiler())
    except Exception:  # noqa: BLE001 - torch internals: no compiler known, no reuse across it
        cc = None
    return [torch.__version__, torch.version.git_version, stat(torch.__file__),
            stat(os.path.realpath(cc) if cc else None)]


def _remember_isa_builds(folder: Path) -> None:
    """Keep inductor's per-feature instruction probes (`VecISA.check_build`: can this compiler
    build, and this CPU load, a test library using AVX-512 BF16, VNNI, ...) in `folder`, as
    `vec_isa.json` keeps the base probe: each costs a child Python in every process (a
    quarter of a precompiled step's loading). A probe that succeeded once on this torch, CPU,
    compiler and flags is not run again; one that failed is (it may have timed out)."""
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:
        return
    original = cpu_vec_isa.VecISA.check_build
    if getattr(original, "_matformer_remembers", False):
        return
    base = [_vec_isa_key(), _install_key()]
    path = folder / ISA_BUILDS

    def check_build(isa: Any, code: str) -> bool:
        key = _digest([base, str(isa), isa.build_arch_flags(), code])
        if _read_answers(path).get(key) is True:
            return True
        ok = original(isa, code)
        if ok:
            _keep_answer(path, key, True)
        return ok

    check_build._matformer_remembers = True  # type: ignore[attr-defined]
    cpu_vec_isa.VecISA.check_build = check_build  # type: ignore[method-assign]


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
    precompiled: int = 0
    """Of `graphs`, those loaded whole from `compile_cache_dir()/steps` (nothing traced)."""
    saved: int = 0
    """Of `graphs`, those compiled ahead of time and saved there for later processes."""
    kernel_seconds: float = 0.0
    """Seconds building matformer's own C++ kernels (`row_kernel`; before any decoding call)."""
    native_calls: int = 0
    """Decoding forwards that ran as C++ calls (`decode_step`, a speculative round's k + 1 in
    one): nothing of theirs is compiled."""

    def since(self, before: CompileStats) -> CompileStats:
        """What was compiled between `before` and this snapshot."""
        return CompileStats(self.graphs - before.graphs, self.seconds - before.seconds,
                            self.cache_hits - before.cache_hits,
                            self.cache_misses - before.cache_misses,
                            self.precompiled - before.precompiled, self.saved - before.saved,
                            self.kernel_seconds - before.kernel_seconds,
                            self.native_calls - before.native_calls)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: what was compiled or loaded, in how long, how, and where it is kept:
        'compiled 2 graphs in 41.3 s (saved for later runs: 2; cache: ~/.cache/matformer/
        inductor)', 'loaded 2 precompiled graphs in 0.41 s (nothing traced or built; cache:
        ...)', 'compiled 1 graph and loaded 1 precompiled graph in ...', or that nothing was."""
        kernels = (f"C++ kernels built in {self.kernel_seconds:.1f} s"
                   if self.kernel_seconds else None)
        if not self.graphs:
            why = ("nothing to compile (decoding steps ran as one C++ call each"
                   if self.native_calls else
                   "nothing compiled (every graph was already compiled in this process")
            return f"{why}{f'; {kernels}' if kernels else ''})"
        built = self.graphs - self.precompiled
        secs = f"{self.seconds:.2f}" if self.seconds < 10 else f"{self.seconds:.1f}"
        what = [f"compiled {built} graph{'s' if built != 1 else ''}"] if built else []
        if self.precompiled:
            what.append(f"loaded {self.precompiled} precompiled "
                        f"graph{'s' if self.precompiled != 1 else ''}")
        detail = []
        if self.saved:
            detail.append(f"saved for later runs: {self.saved}")
        if built > self.saved or self.cache_hits or self.cache_misses:  # dynamo's own compile
            detail.append(f"kernels built: {self.cache_misses}, loaded from the cache: "
                          f"{self.cache_hits}")
        if not built:
            detail.append("nothing traced or built")
        if kernels:
            detail.append(kernels)
        return (f"{' and '.join(what)} in {secs} s ({', '.join(detail)}; "
                f"cache: {compile_cache_dir()})")


_SECONDS = [0.0]
_KERNEL_SECONDS = [0.0]
_PRECOMPILE = {"saved": 0, "loaded": 0}
"""Graphs `PrecompiledStep`s compiled and saved, and loaded (which dynamo does not count)."""
_PRECOMPILE_SECONDS = [0.0]


def precompile_seconds() -> float:
    """Seconds `PrecompiledStep`s have spent compiling ahead of time, saving and loading graphs
    in this process (dynamo's own compile-time record does not include them)."""
    return _PRECOMPILE_SECONDS[0]


def _counters() -> Any:
    """dynamo's counters, or None when dynamo was never imported (nothing compiled; importing
    it would cost seconds)."""
    utils = sys.modules.get("torch._dynamo.utils")
    return getattr(utils, "counters", None)


def compiled_graphs() -> int:
    """Graphs compiled (by dynamo or ahead of time) or loaded precompiled in this process."""
    counters = _counters()
    dynamo = int(counters["stats"]["unique_graphs"]) if counters is not None else 0
    return dynamo + _PRECOMPILE["loaded"]


def record_compile_seconds(seconds: float) -> None:
    """Add the wall time of a call that compiled (`StaticDecoder` calls it)."""
    _SECONDS[0] += seconds


_NATIVE_CALLS = [0]


def record_native_call(forwards: int = 1) -> None:
    """Count decoding forwards that ran as C++ calls (`static_cache` calls it; a speculative
    round's draft steps and verify are k + 1 forwards of one call)."""
    _NATIVE_CALLS[0] += forwards


def record_kernel_build_seconds(seconds: float) -> None:
    """Add the time a C++ kernel build took (`row_kernel` calls it)."""
    _KERNEL_SECONDS[0] += seconds


def compile_stats() -> CompileStats:
    """This process's compilation so far."""
    counters = _counters()
    if counters is None:
        return CompileStats(compiled_graphs(), _SECONDS[0], precompiled=_PRECOMPILE["loaded"],
                            saved=_PRECOMPILE["saved"], kernel_seconds=_KERNEL_SECONDS[0],
                            native_calls=_NATIVE_CALLS[0])
    ind = counters["inductor"]
    return CompileStats(compiled_graphs(), _SECONDS[0], int(ind["fxgraph_cache_hit"]),
                        int(ind["fxgraph_cache_miss"]), _PRECOMPILE["loaded"], _PRECOMPILE["saved"],
                        _KERNEL_SECONDS[0], _NATIVE_CALLS[0])


STEPS = "steps"
"""Subfolder of `compile_cache_dir()` holding the precompiled graphs, one file each."""


def _describe(x: Any, depth: int = 0) -> Any:
    """What a compiled graph may depend on in an argument: a tensor's shape, strides, dtype,
    device and kind; a plain value itself; an object's attributes (three levels deep)."""
    import torch

    if isinstance(x, torch.Tensor):
        return ["tensor", list(x.shape), list(x.stride()), str(x.dtype), str(x.device),
                x.is_inference(), x.requires_grad]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    if isinstance(x, list | tuple):
        return [_describe(v, depth + 1) for v in x]
    if isinstance(x, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(x.items(), key=str)}
    name = f"{type(x).__module__}.{type(x).__qualname__}"
    if depth >= 3 or not hasattr(x, "__dict__"):
        return name
    return [name, {k: _describe(v, depth + 1) for k, v in sorted(vars(x).items())
                   if not k.startswith("__")}]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cpu_flags() -> list[str]:
    """The instruction-set flags the kernel reports for the CPU (/proc/cpuinfo's `flags`, or
    `Features` on ARM), sorted; empty where there is no such file."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def _cpu_key() -> list[Any]:
    """The CPU the kernels were built for: architecture, ATen's vector capability and the
    instruction-set flags the kernel reports (without importing inductor, seconds)."""
    import platform

    import torch

    return [platform.machine(), torch.backends.cpu.get_cpu_capability(), cpu_flags()]


KEY_PARTS: dict[str, Callable[[], Any]] = {}
"""Process settings a compiled step's graph depends on beyond torch's own, by name: modules the
step calls into register a function returning theirs (`row_kernel`: whether its kernels are
used), and every `model_key` includes them."""


def model_key(model: Any, fn: Callable, backend: str) -> str:
    """What `fn`'s graphs may depend on in `model` and the process, besides the width setting
    and the guards: a digest of the module's class, config, training flag, every parameter's
    and buffer's name, shape, strides, dtype and device, every submodule's class (not the
    weights: they are inputs of the graph), and of the torch, Python and matformer versions,
    threads, the CPU's instruction sets, the process settings modules registered in
    `KEY_PARTS` (whether compiled steps call the C kernels), inference and grad mode. Models with
    one key share graphs."""
    import torch

    cfg = getattr(model, "config", None)
    to_dict = getattr(cfg, "to_dict", None)
    tensors = [(n, _describe(t)) for n, t in (*model.named_parameters(),
                                              *model.named_buffers())]
    return _digest({
        "fn": f"{fn.__module__}.{fn.__qualname__}", "backend": backend,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _describe(to_dict() if callable(to_dict) else cfg),
        "training": model.training, "tensors": tensors,
        "modules": [f"{type(m).__module__}.{type(m).__qualname__}" for m in model.modules()],
        "torch": [torch.__version__, torch.version.git_version], "python": sys.version,
        "matformer": getattr(sys.modules.get("matformer"), "__version__", None), "threads": torch.get_num_threads(),
        "cpu": _cpu_key(), "parts": {k: part() for k, part in sorted(KEY_PARTS.items())}, "inference_mode": torch.is_inference_mode_enabled(),
        "grad": torch.is_grad_enabled(), "default_dtype": str(torch.get_default_dtype())})


def step_key(model_digest: str, model: Any, args: tuple[Any, ...]) -> str:
    """The file name of the graph for a call: the model's key, its width setting and every
    other argument's shapes, strides, dtypes and values."""
    return _digest([model_digest, _describe(getattr(model, "setting", None)),
                    [_describe(a) for a in args]])


def _sources_unchanged(compiled: Any) -> bool:
    """Whether every function the saved graph traced has the source it had then."""
    from torch._dynamo import package

    try:
        for src in compiled.source_info().inlined_sources:
            module = importlib.import_module(src.module)
            if package._hash_sourcelines(module, src.firstlineno, src.lastlineno) != src.checksum:
                return False
    except Exception:  # noqa: BLE001 - a module gone or torch internals changed: not usable
        return False
    return True


def _keep_serializable(entries: Any) -> list[bool]:
    """Guard filter: keep every guard that can be saved, those on module globals included (a
    flag the traced code read must still hold when a later process loads the graph); drop the
    kinds torch cannot save (object identities: which function or module a name is) and those
    on dynamo's own copy of the builtins, which a new process does not have."""
    from torch._dynamo.guards import CheckFunctionManager

    unsupported = CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES
    return [e.guard_type not in unsupported
            and not (e.is_global and e.name.startswith("G['__builtins_dict"))
            for e in entries]


class PrecompiledStep:
    """`fn(model, *args)` compiled ahead of time, one graph per (model key, setting, shapes),
    each kept in `folder` (default `compile_cache_dir()/steps`) and loaded by later processes
    instead of traced again. Call it as `fn`; among the graphs of the model's key
    (`model_key`, computed once per model object), the one whose guards pass runs. `fn` must
    compile with fullgraph (one graph, no breaks)."""

    def __init__(self, fn: Callable, backend: str | Callable = "inductor", mode: str | None = None,
                 folder: Path | None = None) -> None:
        self.fn = fn
        self.backend = backend
        self.mode = mode
        self.folder = folder
        # AOTCompiledFunctions by model key, most recently used first; each model's key
        self._graphs: dict[str, list[Any]] = {}
        self._models: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._jit: Callable | None = None  # dynamo's compile, once a graph was not precompilable
        self._lock = threading.Lock()

    def steps_dir(self) -> Path:
        return self.folder if self.folder is not None else enable_compile_cache() / STEPS

    def __call__(self, model: Any, *rest: Any) -> Any:
        args = (model, *rest)
        key = self._models.get(model)
        graphs = self._graphs.get(key, ()) if key is not None else ()
        for i, g in enumerate(graphs):
            if g.guard_check(*args):
                if i:
                    graphs.insert(0, graphs.pop(i))  # type: ignore[attr-defined]
                return g.fn(*args)
        if self._jit is None:
            with self._lock:
                t0 = time.perf_counter()
                g = self._obtain(args)
                _PRECOMPILE_SECONDS[0] += time.perf_counter() - t0
            if g is not None:
                return g.fn(*args)
        return self._jit(*args)  # type: ignore[misc]

    def _obtain(self, args: tuple[Any, ...]) -> Any:
        """The graph for `args`: loaded from its file when that passes every check, else
        compiled now and saved; None when it cannot be compiled ahead of time."""
        model = args[0]
        mkey = model_key(model, self.fn, f"{self.backend}/{self.mode}")  # again: dtypes change
        self._models[model] = mkey
        graphs = self._graphs.setdefault(mkey, [])
        for g in graphs:  # another model object of this key compiled it
            if g.guard_check(*args):
                return g
        path = self.steps_dir() / f"{step_key(mkey, model, args[1:])}.pt2"
        loaded = self._load(path, args)
        if loaded is not None:
            _PRECOMPILE["loaded"] += 1
            graphs.insert(0, loaded)
            return loaded
        import torch

        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):
                wrapper = torch.compile(self.fn, mode=self.mode, backend=self.backend,
                                        dynamic=False, fullgraph=True,
                                        options={"guard_filter_fn": _keep_serializable})
            compiled = wrapper.aot_compile((args, {}))  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - not precompilable (a backend without it): from now
            # on dynamo's own compile (with inductor's kernel cache) runs what no graph here does
            self._jit = torch.compile(self.fn, mode=self.mode, backend=self.backend,
                                      dynamic=False, fullgraph=True)
            return None
        graphs.insert(0, compiled)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            compiled.save_compiled_function(str(path))  # written whole, then renamed
        except Exception:  # noqa: BLE001 - not serializable or no room: this process only
            return compiled
        _PRECOMPILE["saved"] += 1
        return compiled

    def _load(self, path: Path, args: tuple[Any, ...]) -> Any:
        """The graph saved at `path` when it exists, loads, traced unchanged sources and its
        guards pass for `args`; else None (and a file that failed is compiled again)."""
        if not path.is_file():
            return None
        import torch

        try:
            with path.open("rb") as f:
                compiled = torch.compiler.load_compiled_function(f, f_globals=self.fn.__globals__)
        except Exception:  # noqa: BLE001 - corrupt, or another torch/Python: compile again
            return None
        if not _sources_unchanged(compiled) or not compiled.guard_check(*args):
            return None
        return compiled
