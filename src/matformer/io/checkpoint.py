"""Loading and saving checkpoints: the public API of the spec (docs/FORMAT.md).

- `load_state_dict(src)`: tensors of a folder, a single .safetensors file, or a Hub repo id.
- `load_model(src, tier=None, widths=None, dtype=None, kv_heads=None, layer_kv_heads=None,
  layer_tiers=None)`:
  build the model on the meta device and assign the tensors read into memory (one read per
  tensor, about 1x the checkpoint in memory, no memory map); the stored widths and heads are checked against config.json and the
  shapes, a requested width / head count is applied as runtime slicing.
- `write_checkpoint(out_dir, config, specs, produce)`: the streaming writer (one tensor in
  memory at a time); `save_model(model, out_dir)` is built on it.
- `checkpoint_info(src)`: what `matformer info` prints; reads headers only, imports no torch.
  `repo_info(repo)`: the same for a multi-tier repo and every tier in it.

Whatever the model family, the family record (`models.registry`) says which tensors a config
describes, which are per-layer, embedding or tied, and which model class to build.

Writes are atomic per folder: everything goes into a temporary folder beside the target, is
fsynced, then swapped in with one `renameat2(RENAME_EXCHANGE)` (the old folder stays complete
until the instant the new one replaces it), so a crash leaves the old checkpoint or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matformer.errors import CheckpointChanged, CheckpointError, ConfigError
from matformer.io.atomic import atomic_write, fsync_file
from matformer.io.layout import (
    CONFIG_NAME,
    INDEX_NAME,
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAVE_ID_KEY,
    SINGLE_NAMES,
    Checkpoint,
    Layout,
    open_checkpoint,
)
from matformer.io.manifest import MANIFEST_NAME
from matformer.io.safetensors import nbytes_of, st_dtype, write_file
from matformer.io.source import Source, TierRepo, resolve_source
from matformer.io.swap import atomic_folder
from matformer.io.tensors import ReadJob, TensorReader
from matformer.models.registry import Config, expected_shapes, family_of_config, family_of_model
from matformer.tiers import (
    WidthRequest,
    runnable_kv_heads,
    runnable_tiers,
    uniform_tier,
)

if TYPE_CHECKING:
    import torch

# Tensors of old transformers checkpoints that carry no weights (recomputed at run time).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_FLOAT_ST = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


# ---- checking a checkpoint against its config ------------------------------------------


def check_shapes(found: Mapping[str, tuple[int, ...]], config: Config, where: str,
                  file_of: Callable[[str], str] | None = None) -> None:
    """Tensor names and shapes must be what config.json describes (spec §2 detection). The
    layer count is compared first, before anything proportional to the config's sizes is built."""
    fam = family_of_config(config)
    layers = {at[0] for n in found if (at := fam.layer_of(n)) is not None}
    on_disk = max(layers) + 1 if layers else 0
    if on_disk != config.num_hidden_layers:
        raise CheckpointError(f"{where}: config.json says num_hidden_layers="
                              f"{config.num_hidden_layers} but the weights hold {on_disk} layers; "
                              f"the config does not describe these weights")
    want = expected_shapes(config)
    for name, shape in found.items():
        if name not in want:
            continue
        if tuple(shape) != want[name]:
            hint = ""
            axis = fam.nested(name) if fam.nested is not None else None
            if axis is not None and axis[0] == "ffn":
                hint = (f" (config.json says intermediate_size={config.intermediate_size}; the "
                        f"stored FFN width must match it)")
            elif axis is not None and axis[0] == "heads":
                hint = (f" (config.json says num_key_value_heads={config.num_key_value_heads}, "
                        f"num_attention_heads={config.num_attention_heads}, head_dim="
                        f"{config.head_dim}; the stored heads must match them)")
            loc = f"{file_of(name)}: " if file_of else ""
            raise CheckpointError(f"{where}: {loc}tensor {name!r} has shape {list(shape)}, "
                                  f"config.json expects {list(want[name])}{hint}")
    missing = [n for n in want if n not in found]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: tensors {missing[:3]}{more} are missing from the "
                              f"checkpoint")
    tied = fam.tied if config.tie_word_embeddings else {}
    extra = [n for n in found if n not in want and not _IGNORED.search(n) and n not in tied]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise CheckpointError(f"{where}: unexpected tensors {extra[:3]}{more} (not part of a "
                              f"model described by config.json)")


# ---- loading --------------------------------------------------------------------------------


def open_checked(source: Source, reader: str) -> Checkpoint:
    """The validated safetensors headers of a resolved source, every tensor checked against its
    config (a missing or misshapen tensor is reported against the source, not later against an
    output); pickle weights refused, naming `reader` (e.g. "slicing"). The caller closes it."""
    if source.layout.pickle:
        raise CheckpointError(f"{source.folder}: holds pickle (.bin) weights; {reader} reads "
                              f"safetensors only (load_model(..., allow_pickle=True) and save_model convert them)")
    ck = open_checkpoint(source.layout)
    try:
        check_shapes({n: t.shape for n, t in ck.tensors.items()}, source.config,
                     str(source.folder), lambda n: ck.where[n])
    except BaseException:
        ck.close()
        raise
    return ck


def _load_pickle(layout: Layout) -> dict[str, torch.Tensor]:
    import torch

    out: dict[str, torch.Tensor] = {}
    for s in layout.shards:
        try:
            part = torch.load(layout.folder / s, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{layout.folder / s}: cannot load the pickle ({e})") from None
        for k, v in part.items():
            if k in out:
                raise CheckpointError(f"{layout.folder}: tensor {k!r} is in two .bin shards")
            out[k] = v
    return out


def _tensors(layout: Layout, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], Checkpoint | None]:
    if layout.pickle:
        if not allow_pickle:
            raise CheckpointError(
                f"{layout.folder}: only pickle weights ({layout.shards[0]}) found; pickles can "
                f"run arbitrary code when loaded, so they are refused. Convert the checkpoint to "
                f"safetensors, or pass allow_pickle=True if you trust its source"
            )
        return _load_pickle(layout), None
    out: dict[str, torch.Tensor] = {}
    by_shard: dict[str, list[str]] = {}
    # Read into the process's own memory (one pread per tensor, from the descriptors the
    # headers were validated from), not mapped: a map of a shard that another tool truncates in
    # place kills the process with SIGBUS when it touches the lost pages, which Python cannot
    # catch; a read of a file cut short is a one-line CheckpointError. Memory stays 1x.
    with open_checkpoint(layout) as ck, TensorReader(ck, readahead=True) as reader:
        for n, s in ck.where.items():
            by_shard.setdefault(s, []).append(n)
        for names in by_shard.values():
            for n in names:
                out[n] = reader.read(ReadJob(n))
    return out, ck


_READ_ATTEMPTS = 3


def _check_float(dtypes: Mapping[str, Any], where: str,
                 file_of: Callable[[str], str] | None) -> None:
    """Model weights are floating point: an integer or bool tensor is refused, never cast."""
    for name, dt in dtypes.items():
        if not dt.is_floating_point and not _IGNORED.search(name):
            loc = f"{file_of(name)}: " if file_of else ""
            raise CheckpointError(f"{where}: {loc}tensor {name!r} is {st_dtype(dt)}; model "
                                  f"weights must be F32, F16 or BF16 (not a model checkpoint?)")


def consistent_read(read: Callable[[], Any], src: Any) -> Any:
    """`read()`, again when a save replaced the checkpoint while it was read
    (`CheckpointChanged`): each attempt reads one version whole; after the last, the error."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return read()
        except CheckpointChanged:
            if isinstance(src, Source) or attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def load_state_dict(src: str | os.PathLike | Source, revision: str | None = None, *,
                    tier: int | None = None, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (folder, .safetensors file, Hub repo id, or multi-tier repo
    with `tier`; see `io.source`), validated, read into CPU tensors of the process's own
    (writing to one never changes the file; truncating the file never touches them)."""
    def read() -> dict[str, torch.Tensor]:
        return _tensors(resolve_source(src, tier=tier, revision=revision).layout, allow_pickle)[0]

    return consistent_read(read, src)


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32"}
    name = aliases.get(name, name)
    if name not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"dtype {dtype!r} is not one of float32, float16, bfloat16")
    return getattr(torch, name)


def _SkipMetaInit():
    """A torch function mode that skips random init of meta tensors: their values are replaced
    by the checkpoint anyway, and the first `normal_` on a meta tensor costs ~3 s in torch 2.x
    (it loads the Python decompositions)."""
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") in ("normal_", "uniform_", "kaiming_uniform_",
                                                  "trunc_normal_"):
                t = args[0] if args else kwargs.get("tensor")
                if getattr(t, "is_meta", False):
                    return t
            return func(*args, **kwargs)

    return _Mode()


def load_model(src: str | os.PathLike | Source, tier: int | None = None,
               widths: int | Sequence[int] | None = None, dtype: Any = None,
               revision: str | None = None, device: Any = None, *,
               kv_heads: int | None = None, layer_kv_heads: Sequence[int] | None = None,
               allow_pickle: bool = False,
               layer_tiers: Sequence[int] | None = None) -> torch.nn.Module:
    """Config + weights -> the model of the family config.json describes (`MatFormerLM`,
    `MatViT`, ...), without a second copy of the weights.

    `tier` (absolute: width = base >> tier), `layer_tiers` or `widths` selects the active width
    (one `tiers.WidthRequest` with the heads), `kv_heads` /
    `layer_kv_heads` the active KV heads, by runtime slicing; asking for more than the
    checkpoint stores raises a TierError before any tensor is read. `dtype` converts the
    floating-point weights (default: as stored). `src`: anything `io.source.resolve_source`
    takes (of a multi-tier repo only the folder of the tier asked for is fetched and checked)."""
    import torch

    request = WidthRequest(tier=tier, layer_tiers=layer_tiers, widths=widths, kv_heads=kv_heads,
                           layer_kv_heads=layer_kv_heads)

    def read() -> tuple[Source, Config, dict[str, torch.Tensor]]:
        source = resolve_source(src, request=request, revision=revision)
        config = type(source.config).from_dict(source.config.to_dict())  # the model may change it
        # Checked before any tensor is read.
        request.resolve(config, holder=f"{source.describe()}: this checkpoint",
                        heads_remedy="load a checkpoint that stores them")
        sd, ck = _tensors(source.layout, allow_pickle)
        file_of = (lambda n: ck.where[n]) if ck is not None else None
        _check_float({k: v.dtype for k, v in sd.items()}, str(source.folder), file_of)
        check_shapes({k: tuple(v.shape) for k, v in sd.items()}, config, str(source.folder),
                     file_of)
        return source, config, sd

    # One version whole, even while a save replaces the checkpoint (read again if it did).
    source, config, sd = consistent_read(read, src)
    layout = source.layout
    for k in [k for k in sd if _IGNORED.search(k)]:
        del sd[k]
    target = _resolve_dtype(dtype)
    if target is None:
        floats = {v.dtype for v in sd.values() if v.is_floating_point()}
        if len(floats) == 1 and str(next(iter(floats))).removeprefix("torch.") in (
                "float32", "float16", "bfloat16"):
            target = next(iter(floats))
        else:  # mixed or exotic storage: use the config's dtype for every weight
            target = config.dtype
    for k, v in sd.items():
        if v.dtype != target:
            sd[k] = v.to(target)
    fam = family_of_config(config)
    tied = fam.tied if config.tie_word_embeddings else {}
    for name, shared in tied.items():  # one tensor on disk; the model holds it under both names
        sd[name] = sd[shared]
    config.torch_dtype = str(target).removeprefix("torch.")
    with torch.device("meta"), _SkipMetaInit():
        model = fam.model_class()(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # already shape-checked; keep the message short anyway
        raise CheckpointError(f"{layout.folder}: {str(e).splitlines()[0]}") from None
    for name, shared in tied.items():  # assign=True gave each name its own Parameter: tie again
        _set_parameter(model, name, model.get_parameter(shared))
    if device is not None:
        model.to(device)
    if request:
        model.apply(request)
    return model


def _set_parameter(model: Any, name: str, param: Any) -> None:
    """model.<name> = param, for a dotted parameter name."""
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, param)


# ---- writing --------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers); 'KiB', 'MiB', 'GiB' are binary."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0 or size >= 2**62:
            raise CheckpointError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max_shard_size {size!r} is not a size like '5GB' or '500MB'")
    unit = (m.group(2) or "b").lower()
    mult = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
            "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    value = float(m.group(1)) * mult
    if not value < 2**62:  # '9' * 400 + 'GB' is infinite as a float: no file is that large
        raise CheckpointError(f"max_shard_size {str(size)[:40]!r} is larger than any file")
    n = int(value)
    if n <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return n


def plan_shards(specs: Sequence[tuple[str, str, Sequence[int]]], max_shard_size: int | str
                ) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Greedy in order: a shard is closed when the next tensor would take it over the limit; a
    tensor larger than the limit gets a shard of its own."""
    limit = parse_size(max_shard_size)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, dtype, shape in specs:
        n = nbytes_of(dtype, shape)
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append((name, dtype, tuple(int(d) for d in shape)))
        used += n
    return shards


RESERVED_NAMES = {CONFIG_NAME, INDEX_NAME, PICKLE_INDEX, PICKLE_SINGLE, *SINGLE_NAMES,
                  MANIFEST_NAME}
"""Names a checkpoint's own files use: an extra file by one of these names would replace or
shadow the weights, the index or the config and make the checkpoint unloadable."""


def _check_plain_name(name: str) -> str:
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..")
            or "\x00" in name):
        raise CheckpointError(f"extra file name {name!r} must be a plain file name")
    if name in RESERVED_NAMES or _SHARD_RE.match(name) or name.startswith(".matformer"):
        raise CheckpointError(f"extra file name {name!r} is reserved for the checkpoint's own "
                              f"files; give the file another name")
    return name


def _old_checkpoint_files(folder: Path) -> set[str]:
    """Names in an existing folder that belong to its checkpoint (not carried into the new one)."""
    names = {CONFIG_NAME, INDEX_NAME, PICKLE_INDEX, PICKLE_SINGLE, *SINGLE_NAMES}
    with contextlib.suppress(Exception):
        wm = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        names.update(v for v in wm.values() if isinstance(v, str))
    with contextlib.suppress(Exception):
        names.update(entry.name for entry in folder.iterdir() if _SHARD_RE.match(entry.name))
    return names


_ID_SLOT = b'"' + SAVE_ID_KEY.encode() + b'":"' + b"0" * 16 + b'"'


def _write_shards(tmp: Path, names: list[str], plan: list[list[tuple[str, str, tuple[int, ...]]]],
                  produce: Callable[[str], Any]) -> tuple[dict[str, str], int, str]:
    """Write the shards; returns (weight_map, total bytes, save id). The save id, recorded in
    every shard and the index so that a load never mixes two saves, is a checksum of all the
    tensor bytes: the same weights always give the same files (reproducible slices), and two
    saves that differ in any byte differ in it (up to a 2^-64 chance). It is patched into each
    shard's header once all data is written."""
    crc, adler = 0, 1
    weight_map: dict[str, str] = {}
    total = 0

    def observe(buf: memoryview) -> None:
        nonlocal crc, adler
        crc, adler = zlib.crc32(buf, crc), zlib.adler32(buf, adler)

    for fname, shard in zip(names, plan, strict=True):
        write_file(tmp / fname, shard, produce, metadata={"format": "pt", SAVE_ID_KEY: "0" * 16},
                   observe=observe)
        for name, dtype, shape in shard:
            weight_map[name] = fname
            total += nbytes_of(dtype, shape)
    save_id = f"{crc:08x}{adler:08x}"
    for fname in names:
        with open(tmp / fname, "r+b") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            head = f.read(n)
            at = head.find(_ID_SLOT)
            f.seek(8 + at + len(_ID_SLOT) - 17)
            f.write(save_id.encode())
            f.flush()
            os.fsync(f.fileno())
    return weight_map, total, save_id


def replace_folder(out_dir: str | os.PathLike, fill: Callable[[Path], set[str]]) -> Path:
    """Write a checkpoint folder with `fill(tmp) -> names written` and put it in place of
    `out_dir` atomically (io.swap: symlinks written through, files others add kept, per-file
    replacement where the folder cannot be swapped)."""
    return atomic_folder(out_dir, fill, _old_checkpoint_files)


def _write_extra(folder: Path, extra_files: Mapping[str, str | os.PathLike | bytes] | None) -> set[str]:
    names: set[str] = set()
    for name, content in (extra_files or {}).items():
        _check_plain_name(name)
        dst = folder / name
        if isinstance(content, (bytes, bytearray, memoryview)):
            atomic_write(dst, bytes(content))
        else:
            try:
                shutil.copyfile(content, dst)
            except OSError as e:
                raise CheckpointError(f"{content}: cannot copy into the checkpoint as {name} "
                                      f"({e.strerror or e})") from None
            fsync_file(dst)
        names.add(name)
    return names


def write_checkpoint(out_dir: str | os.PathLike, config: Config,
                     specs: Sequence[tuple[str, str, Sequence[int]]],
                     produce: Callable[[str], torch.Tensor], max_shard_size: int | str = "5GB",
                     extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> Path:
    """Write a checkpoint tensor by tensor: `specs` is [(name, safetensors dtype like "BF16",
    shape)] in file order, `produce(name)` returns that tensor (CPU or not, any layout) and is
    called once per name, one at a time, so a source larger than memory can be streamed.

    config.json describes the tensors written: `intermediate_size` must match the FFN shapes and
    the head counts the attention shapes, `matformer_tier` is derived from the sizes,
    `matformer_base_intermediate_size`, `matformer_base_num_key_value_heads` and `head_dim`
    always set.
    Atomic: the folder holds the old checkpoint or the new one, never a mix."""
    specs = [(n, st_dtype(d), tuple(int(x) for x in s)) for n, d, s in specs]
    if config.tie_word_embeddings:  # tied: written once
        specs = [s for s in specs if s[0] not in family_of_config(config).tied]
    check_shapes({n: s for n, _, s in specs}, config, str(out_dir))
    config = type(config).from_dict(config.to_dict())  # a copy; tier recomputed below
    floats = {d for n, d, _ in specs if d in _FLOAT_ST}
    if len(floats) == 1:
        config.torch_dtype = _FLOAT_ST[next(iter(floats))]
    config.matformer_tier = uniform_tier(config.base, config.layer_widths)
    return write_folder(out_dir, config.to_json_string(), specs, produce, max_shard_size,
                        extra_files)


def write_folder(out_dir: str | os.PathLike, config_json: str,
                 specs: Sequence[tuple[str, str, Sequence[int]]],
                 produce: Callable[[str], Any], max_shard_size: int | str = "5GB",
                 extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> Path:
    """The writing half of `write_checkpoint`, for a config of any model family (`config_json`:
    the text of config.json, not checked here): the extra files, the shards (split at
    `max_shard_size`, each tensor from `produce(name)`, one at a time, a save id in each), the
    index above one shard, then config.json last; all in place of `out_dir` atomically
    (`replace_folder`). matformer.slicing.gemma3n writes its slices through it."""
    for name in extra_files or {}:
        _check_plain_name(name)
    plan = plan_shards(specs, max_shard_size)
    n = len(plan)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    def fill(tmp: Path) -> set[str]:
        written = _write_extra(tmp, extra_files)
        weight_map, total, save_id = _write_shards(tmp, names, plan, produce)
        written.update(names)
        if n > 1:
            index = {"metadata": {"total_size": total, SAVE_ID_KEY: save_id},
                     "weight_map": dict(sorted(weight_map.items()))}
            atomic_write(tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
            written.add(INDEX_NAME)
        atomic_write(tmp / CONFIG_NAME, config_json)  # last: a folder with a config is complete
        written.add(CONFIG_NAME)
        return written

    return replace_folder(out_dir, fill)


def _unwrap(model: Any) -> Any:
    # DDP wraps in .module, torch.compile in ._orig_mod; their state dicts carry prefixes.
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module
        else:
            return model


def save_model(model: Any, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
               extra_files: Mapping[str, str | os.PathLike | bytes] | None = None) -> Path:
    """Save config.json + safetensors (sharded above `max_shard_size`, decimal units).

    The config describes the tensors written — the stored widths and heads — whatever the model
    is running at: a full model running at tier 2 with 1 KV head writes `matformer_tier: 0` and
    its stored `num_key_value_heads`."""
    model = _unwrap(model)
    config = model.config.with_widths(model.stored_widths).with_kv_heads(model.stored_kv_heads)
    sd = model.state_dict()
    if config.tie_word_embeddings:
        for name in family_of_model(model).tied:
            sd.pop(name, None)
    specs = [(k, st_dtype(v.dtype), tuple(v.shape)) for k, v in sd.items()]
    return write_checkpoint(out_dir, config, specs, sd.__getitem__, max_shard_size, extra_files)


# ---- info -----------------------------------------------------------------------------------


def checkpoint_info(src: str | os.PathLike | Source, revision: str | None = None, *,
                    tier: int | None = None) -> dict[str, Any]:
    """Everything `matformer info` shows, from config.json and the safetensors headers (no
    tensor data is read, torch is not imported). `tier` picks the folder of a multi-tier repo
    (without it, see `repo_info`). Raises CheckpointError/ConfigError on any inconsistency a
    load would refuse."""
    return consistent_read(lambda: _info(resolve_source(src, tier=tier, revision=revision)), src)


def repo_info(repo: TierRepo) -> dict[str, Any]:
    """`matformer info` of a multi-tier repo: its manifest (base width, tiers) and, per stored
    tier, `checkpoint_info` of its folder (widths, heads, parameters, files)."""
    tiers = [consistent_read(lambda t=t: _info(repo.tier_source(t)), repo.spec)
             for t in sorted(repo.manifest.tiers)]
    return {
        "source": repo.spec,
        "folder": str(repo.root),
        "revision": repo.revision,
        "multi_tier": True,
        "manifest": MANIFEST_NAME,
        "matformer_base_intermediate_size": repo.manifest.base_intermediate_size,
        "stored_tiers": sorted(repo.manifest.tiers),
        "tiers": tiers,
    }


def _info(source: Source) -> dict[str, Any]:
    layout, config = source.layout, source.config
    fam = family_of_config(config)
    if layout.pickle:
        raise CheckpointError(f"{layout.folder}: only pickle (.bin) weights; matformer reads "
                              f"safetensors (pickles can run code when loaded)")
    with open_checkpoint(layout) as ck:
        tensors = ck.tensors
    check_shapes({n: t.shape for n, t in tensors.items()}, config, str(layout.folder),
                  lambda n: ck.where[n])
    tied = fam.tied if config.tie_word_embeddings else {}
    counted = {n: t for n, t in tensors.items() if not _IGNORED.search(n) and n not in tied}
    emb = sum(t.numel for n, t in counted.items() if fam.is_embedding(n))
    total = sum(t.numel for t in counted.values())
    dtypes = sorted({t.dtype for t in tensors.values()})
    widths = config.layer_widths
    base = config.base
    runnable = runnable_tiers(base, widths)
    files = [{"name": name, "size": size} for name, size in ck.files]
    if layout.index is not None:
        files.insert(0, {"name": layout.index.name,
                         "size": os.stat(layout.index.name, dir_fd=layout.opened().fd).st_size})
    return {
        "source": source.spec,
        "folder": str(layout.folder),
        "revision": source.revision,
        "family": fam.name,
        "manifest_tier": source.tier_entry.tier if source.tier_entry is not None else None,
        "intermediate_size": config.intermediate_size,
        "matformer_base_intermediate_size": base,
        "matformer_tier": config.stored_tier,
        "stored_widths": widths,
        "runnable_tiers": runnable,
        "runnable_widths": [base >> t for t in runnable],
        "num_key_value_heads": config.num_key_value_heads,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "matformer_base_num_key_value_heads": config.base_kv_heads,
        "runnable_kv_heads": runnable_kv_heads(config.base_kv_heads, config.layer_kv_heads),
        "files": files,
        "num_tensors": len(tensors),
        "tensor_bytes": sum(t.nbytes for t in tensors.values()),
        "num_parameters": {"embedding": emb, "non_embedding": total - emb, "total": total},
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "summary": fam.summary(config) if fam.summary is not None else fam.name,
        **(fam.info(config) if fam.info is not None else {}),
    }
