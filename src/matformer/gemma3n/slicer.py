"""`slice_gemma3n`: cut a Gemma 3n checkpoint (multimodal or text-only; a folder or a Hub repo
id) into a smaller one, streamed tensor by tensor, written atomically.

The output goes through the checkpoint writer's public folder replacement
(`io.checkpoint.replace_folder`, io.swap): everything is written and fsynced in a temporary
folder beside OUT, config.json last, then swapped in, so OUT holds the old checkpoint or the new
one, never a half-written mix. Tokenizer, processor and generation files are copied unchanged;
so are the vision and audio towers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..io.checkpoint import plan_shards, replace_folder
from ..io.layout import CONFIG_NAME, INDEX_NAME
from ..io.safetensors import nbytes_of, write_file
from ..io.source import Source
from .plan import Gemma3nPlan, plan_gemma3n
from .shapes import parameter_groups
from .source import COMPANION_FILES, companions_of, open_source
from .stream import Job, RangeReader, file_order, map_tensors


@dataclass
class Gemma3nSliceResult:
    path: Path
    plan: Gemma3nPlan
    files: list[str]
    bytes_read: int
    bytes_written: int
    seconds: float
    parameters: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        p = self.parameters
        return (f"{self.path}: {len(self.plan.keep)} layers, {p['effective'] / 1e9:.3f}B effective "
                f"parameters ({p['total'] / 1e9:.3f}B in all); {len(self.files)} files, read "
                f"{self.bytes_read / 1e6:.1f} MB, wrote {self.bytes_written / 1e6:.1f} MB in "
                f"{self.seconds:.2f} s")


def write_folder(out: Path, config: dict[str, Any], jobs: Sequence[Job],
                 produce: Callable[[str], Any], extra: dict[str, Path],
                 max_shard_size: int | str) -> list[str]:
    """Shards (+ index above one), the extra files, then config.json, atomically; returns the
    names written."""
    specs = [(j.out_name, j.dtype, j.out_shape) for j in jobs]
    shards = plan_shards(specs, max_shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [
        f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    def fill(tmp: Path) -> set[str]:
        written: set[str] = set()
        for name, path in extra.items():
            shutil.copyfile(path, tmp / name)
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            written.add(name)
        weight_map: dict[str, str] = {}
        for fname, shard in zip(names, shards, strict=True):
            write_file(tmp / fname, shard, produce, metadata={"format": "pt"})
            weight_map.update({s[0]: fname for s in shard})
        written.update(names)
        if n > 1:
            total = sum(nbytes_of(d, s) for _, d, s in specs)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(tmp / INDEX_NAME, index)
            written.add(INDEX_NAME)
        _write_json(tmp / CONFIG_NAME, config)  # last: a folder with a config is complete
        written.add(CONFIG_NAME)
        return written

    replace_folder(out, fill)
    return sorted(names + list(extra) + [CONFIG_NAME] + ([INDEX_NAME] if n > 1 else []))


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def slice_gemma3n(
    src: str | os.PathLike | Source,
    out: str | Path,
    *,
    tier: int | None = None,
    widths: int | Sequence[int] | None = None,
    layer_tiers: Sequence[int] | None = None,
    skip_layers: Sequence[int] | None = None,
    config_csv: str | None = None,
    config_name: str | None = None,
    max_shard_size: int | str = "5GB",
    revision: str | None = None,
    log: Callable[[str], None] | None = None,
    reader_options: dict[str, int] | None = None,
) -> Gemma3nSliceResult:
    """Slice the Gemma 3n checkpoint `src` (folder or Hub repo id, `revision` for the latter)
    into `out` (see the package docstring for the options and docs/GEMMA3N.md for the rules).
    Everything is validated before anything is written; a failure leaves `out` as it was."""
    t0 = time.perf_counter()
    resolved, source, ck = open_source(src, revision, companions=COMPANION_FILES)
    folder = resolved.folder
    try:
        out_path = Path(out)
        if out_path.exists() and out_path.resolve() == folder.resolve():
            raise CheckpointError(f"{out_path}: is the source folder; write the slice to another "
                                  f"folder")
        plan = plan_gemma3n(source, tier=tier, widths=widths, layer_tiers=layer_tiers,
                            skip_layers=skip_layers, config_csv=config_csv, config_name=config_name)
        if log:
            log(plan.explanation)
        jobs = map_tensors(plan, file_order(ck), str(folder))
        by_name = {j.out_name: j for j in jobs}
        reader = RangeReader(ck, **(reader_options or {}))
        files = write_folder(out_path, plan.config, jobs, lambda n: reader.read(by_name[n]),
                             companions_of(resolved), max_shard_size)
    finally:
        ck.close()
    written = sum((out_path / f).stat().st_size for f in files)
    params = parameter_groups({j.out_name: j.out_shape for j in jobs}, source.prefix)
    return Gemma3nSliceResult(out_path, plan, files, reader.bytes_read, written,
                              time.perf_counter() - t0, params)
