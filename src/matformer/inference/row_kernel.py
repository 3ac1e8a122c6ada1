"""Hand-written C++ kernels for the compiled decoding step on a CPU with one thread.

Two operators, called from the compiled graph like any extern kernel (about 2 us a call):

- `torch.ops.matformer.row_matmul(x, weight)`: one row by a float16 or bfloat16 weight.
  `matvec.row_linear` otherwise writes it as a multiply-and-sum that inductor compiles into a
  vectorized reduction; for a half-precision weight that loop converts the (cached) input row
  again for every weight row, keeps two accumulators and multiplies and adds separately, so
  converting, not memory, bounds it: 15-18 GB/s, where a plain sum reads 32. The kernel converts
  each weight vector once in registers (F16C; a shift for bfloat16) into four independent float32
  accumulators: 17-25 GB/s in the same graph (`benchmarks/speed/matvec.py`, "C kernel"). For
  float32 weights inductor's reduction is as fast and fuses with its neighbours, so it stays.
- `torch.ops.matformer.decode_attention(q, k, v, mask, scale)`: attention of up to `MAX_ROWS`
  query rows (a step, a verify) over the static cache, any dtype, grouped KV heads, a boolean
  mask. PyTorch's CPU flash attention costs about 50 us a call whatever the work (blocking,
  buffers, a parallel loop; a float16 call also needed float32 copies of the cache, 25-35 us
  more), which was 0.3-0.5 ms of a 41.7M step of 4-7 ms; the kernel takes about 15 us.

No library we use ships either: MKL/oneDNN read float16 at 17-23 GB/s one call at a time,
inductor's C++ GEMM template needs weights frozen into the graph, and llama.cpp's kernels are its
own. The weights are read along unit-stride rows, with loads addressed by stepped pointers: the
same loop with indexed loads ran 25% slower on the development CPU (AMD EPYC, AVX-512).

The same library holds `decode_step.cpp` (`decode_step.py`: a whole step as one call, on
these products and this attention); what both files share is `cpu_simd.h`.

`row_kernel.cpp` is built on first use with the system C++ compiler (`$CXX`, else `c++` or
`g++`: what `torch.compile` needs anyway) against torch's headers, `-march=native` (the two
sources side by side, about 9 s), once per source, torch, compiler and CPU, into
`compile_cache_dir()/row_kernel/` (written beside, then moved in; a failed build is remembered
there and not retried), reported by `compile_stats().kernel_seconds` and its one-line
description. Compiled steps use the kernels with one torch thread only, on an x86-64 CPU with
AVX-512 or AVX2+F16C+FMA, decided outside the traced code by `refresh()`. They are
single-threaded: with more threads inductor's reductions and PyTorch's attention run in
parallel. A version whose product split its rows over torch's threads (`at::parallel_for`,
OpenMP) decoded the 41.7M float16 model no faster than inductor at two threads (3.4-3.8 against
3.2 ms a step) and slower at one.
Anywhere else (no compiler, another CPU, `MATFORMER_ROW_KERNEL=0`) decoding keeps inductor's
reductions and PyTorch's attention, with the same results up to the order of float32 sums.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from matformer.inference.compile_cache import (
    KEY_PARTS,
    compile_cache_dir,
    cpu_flags,
    record_kernel_build_seconds,
)

SOURCES = tuple(Path(__file__).with_name(n)
                for n in ("row_kernel.cpp", "decode_step.cpp", "cpu_simd.h"))
"""What the library is built from (the header included by both files)."""
ENV = "MATFORMER_ROW_KERNEL"
"""Set to 0 to keep inductor's reductions (the kernel is never built or called)."""


def _row_matmul_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(1, weight.shape[0], dtype=torch.float32)


def _decode_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


def _decode_step_shape(layers: list[torch.Tensor], globals: list[torch.Tensor],
                       layer_ints: list[int], ints: list[int], eps: float, tokens: list[int],
                       col: int, pad: int) -> torch.Tensor:
    return globals[0].new_empty(1, len(tokens), globals[2].shape[0])


def _decode_round_shape(layers: list[torch.Tensor], draft_layers: list[torch.Tensor],
                        globals: list[torch.Tensor], layer_ints: list[int],
                        draft_layer_ints: list[int], ints: list[int], eps: float, token: int,
                        k: int, col: int, pad: int) -> torch.Tensor:
    return globals[0].new_empty(2 * k + 1, dtype=torch.long)


_SCHEMAS = {
    "row_matmul": ("(Tensor x, Tensor weight) -> Tensor", _row_matmul_shape),
    "decode_attention": ("(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor",
                         _decode_attention_shape),
    # one whole step (decode_step.py); it writes the token's keys and values into the cache
    # tensors among `layers`, and runs eagerly only (never traced)
    "decode_step": ("(Tensor(a!)[] layers, Tensor[] globals, int[] layer_ints, int[] ints, "
                    "float eps, int[] tokens, int col, int pad) -> Tensor", _decode_step_shape),
    # a greedy draft-and-verify round at two settings of one model over one cache
    "decode_round": ("(Tensor(a!)[] layers, Tensor(b!)[] draft_layers, Tensor[] globals, "
                     "int[] layer_ints, int[] draft_layer_ints, int[] ints, float eps, "
                     "int token, int k, int col, int pad) -> Tensor", _decode_round_shape),
}


def _define_operators() -> None:
    """The operators' schemas and shape functions (the CPU code comes from the built library),
    once per process: a second import of this module (a test that purges `sys.modules`) finds
    them defined."""
    for name, (schema, shape) in _SCHEMAS.items():
        try:
            getattr(torch.ops.matformer, name)
            continue
        except (AttributeError, RuntimeError):
            pass
        torch.library.define(f"matformer::{name}", schema)
        torch.library.register_fake(f"matformer::{name}")(shape)


_define_operators()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    return ["-O3", "-march=native", "-std=c++17", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{p}" for p in cpp_extension.include_paths())]


def _commands(cxx: str, out: str) -> tuple[list[list[str]], list[str]]:
    """The compile commands (one per source, run at once: each spends most of its 8-10 s on
    torch's headers) and the link command making `out`."""
    from torch.utils import cpp_extension

    libs = cpp_extension.library_paths()
    objects = [f"{out}.{p.stem}.o" for p in SOURCES if p.suffix == ".cpp"]
    compiles = [[cxx, *_flags(), "-c", str(p), "-o", o]
                for p, o in zip((p for p in SOURCES if p.suffix == ".cpp"), objects, strict=True)]
    link = [cxx, "-shared", *objects, "-o", out, *(f"-L{p}" for p in libs),
            *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu"]
    return compiles, link


def _run_all(compiles: list[list[str]], link: list[str]) -> str | None:
    """Run the compiles side by side, then the link; the first failure's messages, or None."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in compiles]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            errors.append(err)
    if errors:
        return errors[0]
    done = subprocess.run(link, capture_output=True, text=True, timeout=300)
    return (done.stderr or "link failed") if done.returncode != 0 else None


def _build(cxx: str, folder: Path) -> Path | None:
    """The kernel's library for this source, torch, compiler and CPU, built once (a few
    seconds); None when it cannot be (the compiler's complaint is kept beside it, and not
    retried)."""
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([
        *(p.read_text() for p in SOURCES), cxx, version, torch.__version__, str(torch.version.git_version),
        os.path.dirname(torch.__file__), platform.machine(), " ".join(cpu_flags())]).encode()
    ).hexdigest()[:24]
    lib, failed = folder / f"row_kernel-{key}.so", folder / f"row_kernel-{key}.failed"
    if lib.exists():
        return lib
    if failed.exists():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".row_kernel-", suffix=".so")
    os.close(fd)
    compiles, link = _commands(cxx, tmp)
    try:
        t0 = time.perf_counter()
        error = _run_all(compiles, link)
        # compilation the user waits for: reported beside the graphs' (`compile_stats`)
        record_kernel_build_seconds(time.perf_counter() - t0)
        if error is not None:
            failed.write_text(error)
            return None
        os.replace(tmp, lib)
        return lib
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        for path in (tmp, *(c[-1] for c in compiles)):  # the library, the object files
            if os.path.exists(path):
                os.unlink(path)


def wanted() -> bool:
    """Whether this process may build and use the kernel: an x86-64 CPU, a C++ compiler, and
    not `MATFORMER_ROW_KERNEL=0`."""
    return (os.environ.get(ENV) != "0"
            and platform.machine().lower() in ("x86_64", "amd64") and _compiler() is not None)


_LOADED: list[str] = []
"""The library this process loaded (at most one: its operator can be registered only once)."""
_FAILED: list[str] = []
"""Why this process could not build or load it (tried once)."""


def available() -> bool:
    """Whether the kernels are built and loaded here (builds them on the first call)."""
    if _LOADED:
        return True
    if _FAILED or not wanted():
        return False
    path = _build(str(_compiler()), compile_cache_dir() / "row_kernel")
    if path is None:
        _FAILED.append("the C++ compiler could not build row_kernel.cpp and decode_step.cpp")
        return False
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        _FAILED.append(f"{path}: {e}")
        return False
    _LOADED.append(str(path))
    return True


def isa() -> str | None:
    """The instruction set the kernel was built for ("avx512" or "avx2", as `-march=native`
    picks from the CPU's flags), or None when it is not available."""
    if not available():
        return None
    flags = set(cpu_flags())
    return "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

HALF = (torch.float16, torch.bfloat16)
"""The half-precision dtypes, and the weight dtypes compiled steps use the product for. For
float32 weights it reads about as fast as inductor's reduction in a graph (21.8-24.7 against
21.0-23.7 GB/s, `benchmarks/speed/matvec.py`), but the reduction fuses with its neighbours and
the call does not: the 41.7M float32 step ran 6.8 against 6.4 ms with it."""

ENABLED = False
"""Whether compiled steps call the kernel: set by `refresh()` outside the traced code (which
reads it as a constant, guarded like any module global), and part of every compiled step's key
(`compile_cache.KEY_PARTS`)."""
KEY_PARTS["row_kernel"] = lambda: ENABLED


def refresh() -> bool:
    """Decide, before a compiled step runs, whether it uses the kernels: with one torch thread
    (they are single-threaded), where they are built (building them on the first call)."""
    global ENABLED
    ENABLED = torch.get_num_threads() == 1 and available()
    return ENABLED


MAX_ROWS = 8
"""The most query rows `decode_attention` takes (a verify of k + 1 <= 8 tokens)."""


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.linear(x, weight)` is one the kernel does faster (when `ENABLED`): one row of
    x on the CPU, a half-precision weight read along unit-stride rows."""
    return (ENABLED and x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dim() == 2 and x.shape[:-1].numel() == 1 and weight.dtype in HALF
            and weight.stride(-1) == 1 and x.dtype.is_floating_point)


def row_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) for one row x (shape (..., in)) as the C kernel, in
    float32 (shape (..., out)); call only where `applies(x, weight)`."""
    y = torch.ops.matformer.row_matmul(x.reshape(1, x.shape[-1]).float(), weight)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                      is_causal: bool = False, scale: float | None = None,
                      enable_gqa: bool = False) -> bool:
    """Whether `F.scaled_dot_product_attention(q, k, v, ...)` is one `decode_attention` computes
    (when `ENABLED`): at most `MAX_ROWS` query rows per head on the CPU, one dtype, unit-stride
    head vectors, no dropout and no causal flag, and a boolean mask broadcast over heads."""
    if not (ENABLED and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
            and q.device.type == "cpu" and q.shape[2] <= MAX_ROWS and q.dtype in KERNEL_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and k.shape == v.shape
            and k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3]
            and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
            and dropout_p == 0.0 and not is_causal):
        return False
    heads, kv_heads = q.shape[1], k.shape[1]
    if not (heads == kv_heads or (enable_gqa and heads % kv_heads == 0)):
        return False
    m = attn_mask
    return m is None or (m.dtype == torch.bool and m.dim() == 4 and m.shape[1] == 1
                         and m.shape[2] in (1, q.shape[2]) and m.shape[3] == k.shape[2]
                         and m.shape[0] in (1, q.shape[0]))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for a few query rows as the C kernel (float32 inside),
    in q's dtype; call only where `attention_applies` with the same arguments."""
    s = scale if scale is not None else q.shape[-1] ** -0.5
    return torch.ops.matformer.decode_attention(q, k, v, attn_mask, s).to(q.dtype)
