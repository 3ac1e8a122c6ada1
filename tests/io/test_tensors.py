"""`io.tensors`: the one ranged reader behind slicing, GGUF export and Gemma 3n. Every read is
checked against numpy slicing of the same values, with the bytes and reads it should take."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from matformer.errors import CheckpointError
from matformer.io.layout import open_checkpoint, resolve_files
from matformer.io.safetensors import st_dtype, write_file
from matformer.io.tensors import ReadJob, TensorReader, merge_ranges


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    write_file(path, [(n, st_dtype(t.dtype), tuple(t.shape)) for n, t in tensors.items()],
               lambda n: tensors[n])
    return path


def _reader(folder: Path, **options: int) -> TensorReader:
    return TensorReader(open_checkpoint(resolve_files(folder)), **options)


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.matrix": torch.randn(40, 24, generator=g),
        "b.cube": torch.randn(6, 5, 4, generator=g),
        "c.half": torch.randn(16, 12, generator=g).to(torch.float16),
        "d.bf16": torch.randn(16, 12, generator=g).to(torch.bfloat16),
        "e.bias": torch.randn(24, generator=g),
    }
    _save(tmp_path / "ck", tensors)
    return tmp_path / "ck", tensors


def test_a_row_prefix_is_one_read_of_exactly_its_bytes(stored):
    folder, t = stored
    with _reader(folder) as r:
        got = r.read(ReadJob("a.matrix", rows=((0, 7),)))
        assert torch.equal(got, t["a.matrix"][:7])
        assert (r.reads, r.bytes_read) == (1, 7 * 24 * 4)
        cube = r.read(ReadJob.prefix("b.cube", (6, 5, 4), (2, 5, 4)))  # any rank
        assert torch.equal(cube, t["b.cube"][:2])
        assert r.reads == 2


def test_a_column_prefix_reads_one_run_per_row(stored):
    folder, t = stored
    with _reader(folder) as r:
        job = ReadJob.prefix("a.matrix", (40, 24), (40, 5))
        assert job == ReadJob("a.matrix", cols=((0, 5),))
        assert torch.equal(r.read(job), t["a.matrix"][:, :5])
        assert (r.reads, r.bytes_read) == (40, 40 * 5 * 4)


def test_several_row_and_column_ranges_exact_and_chunked_agree(stored):
    folder, t = stored
    rows, cols = ((2, 5), (9, 10), (30, 40)), ((1, 3), (10, 11), (20, 24))
    want = t["a.matrix"].numpy()[np.r_[2:5, 9:10, 30:40]][:, np.r_[1:3, 10:11, 20:24]]
    for opts in ({}, {"exact_run_limit": 0, "chunk_bytes": 200}, {"exact_run_limit": 0},
                 {"exact_run_limit": 0, "readahead": True}):
        with _reader(folder, **opts) as r:
            got = r.read_array(ReadJob("a.matrix", rows=rows, cols=cols))
            assert np.array_equal(got, want), opts
    with _reader(folder) as r:  # rows only, several ranges: one read per range
        assert np.array_equal(r.read_array(ReadJob("a.matrix", rows=rows)),
                              t["a.matrix"].numpy()[np.r_[2:5, 9:10, 30:40]])
        assert r.reads == 3


def test_chunked_column_reads_hold_one_chunk_not_the_tensor(tmp_path):
    rows, cols = 2000, 2000  # 16 MB of float32
    table = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    _save(tmp_path / "big", {"table": table})
    del table
    job = ReadJob("table", cols=((0, 8), (1000, 1016), (1990, 2000)))  # 34 columns kept
    chunk = 64 << 10
    with _reader(tmp_path / "big", exact_run_limit=0, chunk_bytes=chunk) as r:
        tracemalloc.start()
        try:
            got = r.read_array(job)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        step = chunk // (cols * 4)  # 8 rows per chunk
        assert r.reads == rows // step
    out_bytes = rows * 34 * 4
    assert peak < out_bytes + 2 * chunk + (64 << 10), peak  # output + one chunk, not 16 MB
    full = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    assert np.array_equal(got, full[:, np.r_[0:8, 1000:1016, 1990:2000]])


def test_conversion_to_float32_and_stored_types(stored):
    folder, t = stored
    with _reader(folder) as r:
        for name in ("c.half", "d.bf16"):
            job = ReadJob(name, rows=((0, 3),), cols=((2, 7),), to="F32")
            want = t[name][:3, 2:7].float()
            assert np.array_equal(r.read_array(job), want.numpy())
            assert torch.equal(r.read(job), want)
        bf = r.read(ReadJob("d.bf16", cols=((0, 4),)))
        assert bf.dtype == torch.bfloat16 and torch.equal(bf, t["d.bf16"][:, :4])
        assert r.read_array(ReadJob("c.half")).dtype == np.float16
        assert np.array_equal(r.read_array(ReadJob("e.bias", to="F32")), t["e.bias"].numpy())
        assert r.read_array(ReadJob("a.matrix", rows=((0, 0),))).shape == (0, 24)


def test_a_file_cut_short_after_opening_names_the_file_and_the_tensor(stored):
    folder, _ = stored
    path = folder / "model.safetensors"
    with _reader(folder) as r:
        os.truncate(path, path.stat().st_size - 10)  # inside the last tensor, e.bias
        with pytest.raises(CheckpointError) as e:
            r.read(ReadJob("e.bias"))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'e.bias'" in msg and "ended early" in msg


@pytest.mark.parametrize("job, words", [
    (ReadJob("a.matrix", rows=((0, 41),)), "rows ranges"),
    (ReadJob("a.matrix", cols=((5, 9), (3, 4))), "columns ranges"),
    (ReadJob("b.cube", cols=((0, 2),)), "need a matrix"),
    (ReadJob("a.matrix", to="F16"), "cannot convert it to F16"),
])
def test_bad_jobs_are_one_line_errors(stored, job, words):
    folder, _ = stored
    with _reader(folder) as r, pytest.raises(CheckpointError, match=words) as e:
        r.read_array(job)
    assert "\n" not in str(e.value) and job.src in str(e.value)


def test_prefix_refuses_blocks_that_are_not_prefixes():
    with pytest.raises(CheckpointError, match="cannot read block"):
        ReadJob.prefix("w", (4, 8), (5, 8))
    with pytest.raises(CheckpointError, match="cannot read block"):
        ReadJob.prefix("w", (4, 8, 2), (4, 4, 2))
    assert ReadJob.prefix("w", (4, 8), (2, 3)) == ReadJob("w", rows=((0, 2),), cols=((0, 3),))
    assert ReadJob.prefix("w", (4, 8), (4, 8)) == ReadJob("w")


def test_merge_ranges_joins_touching_neighbours():
    assert merge_ranges([(0, 2), (2, 4), (6, 8), (8, 9)]) == ((0, 4), (6, 9))
    assert merge_ranges([]) == ()


def test_a_closed_checkpoint_is_an_error_not_a_bad_descriptor(stored):
    folder, _ = stored
    r = _reader(folder)
    r.close()
    with pytest.raises(CheckpointError, match="closed before reading"):
        r.read(ReadJob("a.matrix"))
