"""`slice_gemma3n`: cut a Gemma 3n checkpoint (multimodal or text-only; a folder or a Hub repo
id) into a smaller one, streamed tensor by tensor, written atomically.

The output goes through the checkpoint writer's public folder writer (`io.checkpoint.write_folder`:
shards split as transformers does with a save id in each, the index, config.json last, through
`replace_folder`/io.swap): everything is written and fsynced in a temporary folder beside OUT,
then swapped in, so OUT holds the old checkpoint or the new one, never a half-written mix. Tokenizer, processor and generation files are copied unchanged;
so are the vision and audio towers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matformer.io.checkpoint import write_folder
from matformer.io.layout import CONFIG_NAME, INDEX_NAME, resolve_files
from matformer.io.outputs import check_output_folder
from matformer.io.source import Source
from matformer.io.tensors import TensorReader
from matformer.slicing.gemma3n.plan import Gemma3nPlan, plan_gemma3n
from matformer.slicing.gemma3n.shapes import parameter_groups
from matformer.slicing.gemma3n.source import COMPANION_FILES, companions_of, open_source
from matformer.slicing.gemma3n.stream import file_order, map_tensors


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
        check_output_folder(out_path, protect=[*resolved.inputs(), config_csv], what="slice")
        plan = plan_gemma3n(source, tier=tier, widths=widths, layer_tiers=layer_tiers,
                            skip_layers=skip_layers, config_csv=config_csv, config_name=config_name)
        if log:
            log(plan.explanation)
        jobs = map_tensors(plan, file_order(ck), str(folder))
        by_name = {j.out_name: j for j in jobs}
        # Readahead on: most Gemma 3n tensors (the towers, the embeddings) are copied whole.
        reader = TensorReader(ck, readahead=True, **(reader_options or {}))
        extra = companions_of(resolved)
        write_folder(out_path, json.dumps(plan.config, indent=2, sort_keys=True) + "\n",
                     [(j.out_name, j.dtype, j.out_shape) for j in jobs],
                     lambda n: reader.read(by_name[n].read), max_shard_size, extra)
    finally:
        ck.close()
    layout = resolve_files(out_path)
    files = sorted([*layout.shards, *([INDEX_NAME] if layout.index else []), CONFIG_NAME, *extra])
    written = sum((out_path / f).stat().st_size for f in files)
    params = parameter_groups({j.out_name: j.out_shape for j in jobs}, source.prefix)
    return Gemma3nSliceResult(out_path, plan, files, reader.bytes_read, written,
                              time.perf_counter() - t0, params)
