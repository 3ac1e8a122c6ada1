"""The strict safetensors reader and the streaming writer (spec §3).

Every malformed file must raise our CheckpointError naming the file; every file we accept must
also be accepted by the reference reader (we match or exceed its checks); our writer's files load
in the reference reader bit for bit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from matformer.errors import CheckpointError
from matformer.io.checkpoint import load_state_dict
from matformer.io.safetensors import (
    MAX_HEADER_BYTES,
    build_header,
    read_header,
    write_file,
)


def raw_file(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    js = json.dumps(header).encode()
    if pad:
        js += b" " * (-len(js) % 8)
    path.write_bytes(struct.pack("<Q", len(js)) + js + data)
    return path


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.tensor(1.5, dtype=torch.float16),  # 0-dim
        "e": torch.zeros(0, 4),  # empty
        "f": torch.tensor([True, False, True]),
        "g": torch.arange(5, dtype=torch.uint8),
    }


def test_reference_file_reads_bit_exact(tmp_path):
    ts = sample_tensors()
    save_file(ts, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    h = read_header(tmp_path / "ref.safetensors")
    assert set(h.tensors) == set(ts)
    assert h.metadata == {"format": "pt"}
    got = load_state_dict(tmp_path / "ref.safetensors")
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert torch.equal(got[k], v), k


def test_writer_output_loads_in_reference_reader(tmp_path):
    ts = sample_tensors()
    specs = [(k, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64",
                  torch.float16: "F16", torch.bool: "BOOL", torch.uint8: "U8"}[v.dtype], v.shape)
             for k, v in ts.items()]
    calls = []

    def produce(name):
        calls.append(name)
        return ts[name]

    size = write_file(tmp_path / "ours.safetensors", specs, produce)
    assert calls == list(ts)  # one call per tensor, in file order
    assert size == (tmp_path / "ours.safetensors").stat().st_size
    ref = load_file(tmp_path / "ours.safetensors")
    for k, v in ts.items():
        assert torch.equal(ref[k], v), k
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    # The data buffer starts 8-aligned.
    assert read_header(tmp_path / "ours.safetensors").header_len % 8 == 0


def test_writer_rejects_tensor_that_disagrees_with_its_spec(tmp_path):
    with pytest.raises(CheckpointError, match="announced as F32 \\[2, 2\\]"):
        write_file(tmp_path / "x.safetensors", [("w", "F32", (2, 2))], lambda n: torch.zeros(2, 3))


def test_writer_makes_column_slices_contiguous(tmp_path):
    full = torch.randn(4, 8)
    view = full[:, :3]  # strided view, as down_proj[:, :m]
    write_file(tmp_path / "v.safetensors", [("w", "F32", (4, 3))], lambda n: view)
    assert torch.equal(load_file(tmp_path / "v.safetensors")["w"], view)


# ---- every check of the spec §3, each with its own message -------------------------------

GOOD = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}


def _write(tmp_path, header=GOOD, data=b"\0" * 12, **kw) -> Path:
    return raw_file(tmp_path / "w.safetensors", header, data, **kw)


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({**GOOD, "x": {**GOOD["x"], "dtype": "F13"}}, b"\0" * 12, "unknown dtype 'F13'"),
        ({**GOOD, "x": {**GOOD["x"], "shape": [3]}}, b"\0" * 12, "needs 12 bytes but .* span 8"),
        ({**GOOD, "y": {**GOOD["y"], "data_offsets": [4, 8]}, "x": {**GOOD["x"], "data_offsets": [0, 8]}},
         b"\0" * 12, "span 4|overlaps"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
          "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12, "hole"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlaps"),
        (GOOD, b"\0" * 16, "4 trailing bytes"),
        (GOOD, b"\0" * 10, "not fully covered, truncated"),
        ({**GOOD, "x": {**GOOD["x"], "data_offsets": [8, 0]}}, b"\0" * 12, "end before"),
        ({**GOOD, "x": {**GOOD["x"], "data_offsets": [-1, 7]}}, b"\0" * 12, "invalid data_offsets"),
        ({**GOOD, "x": {**GOOD["x"], "data_offsets": [0, 8.0]}}, b"\0" * 12, "invalid data_offsets"),
        ({**GOOD, "x": {**GOOD["x"], "shape": [2, "a"]}}, b"\0" * 12, "invalid shape"),
        ({**GOOD, "x": {**GOOD["x"], "shape": [True, 2]}}, b"\0" * 12, "invalid shape"),
        ({**GOOD, "x": {**GOOD["x"], "shape": [2**40, 2**40]}}, b"\0" * 12, "overflows 64 bits"),
        ({**GOOD, "x": {"dtype": "F32", "shape": [2]}}, b"\0" * 12, "missing keys"),
        ({**GOOD, "x": [1, 2]}, b"\0" * 12, "not an object"),
        ({**GOOD, "__metadata__": {"format": 1}}, b"\0" * 12, "__metadata__ must map strings"),
    ],
)
def test_header_checks(tmp_path, header, data, message):
    p = _write(tmp_path, header, data)
    with pytest.raises(CheckpointError, match=message) as e:
        read_header(p)
    assert str(p) in str(e.value)


def test_duplicate_keys_are_rejected(tmp_path):
    # The reference reader keeps the last duplicate; an ambiguous file is refused here.
    js = (b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
          b'"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    p = tmp_path / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(js)) + js + b"\0" * 4)
    with pytest.raises(CheckpointError, match="key 'x' twice"):
        read_header(p)


def test_git_lfs_pointer_is_named(tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        read_header(p)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "too short"),
        (b"\1\0\0", "too short"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "not valid UTF-8"),
        (struct.pack("<Q", 4) + b"{x:1", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    ],
)
def test_framing_checks(tmp_path, raw, message):
    p = tmp_path / "f.safetensors"
    p.write_bytes(raw)
    with pytest.raises(CheckpointError, match=message):
        read_header(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")


def test_truncated_download_is_detected(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "full.safetensors")
    raw = (tmp_path / "full.safetensors").read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 100):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            read_header(tmp_path / "cut.safetensors")


def test_build_header_is_padded_and_parseable():
    head, sizes = build_header([("a", "BF16", (3,)), ("b", "F32", ())])
    (n,) = struct.unpack("<Q", head[:8])
    assert n % 8 == 0 and len(head) == 8 + n and sizes == [6, 4]
    obj = json.loads(head[8:])
    assert obj["a"]["data_offsets"] == [0, 6] and obj["b"]["data_offsets"] == [6, 10]


# ---- property-based: mutations of valid files only ever raise our error type ---------------

_VALID_CACHE: dict[str, bytes] = {}


def _valid_bytes(tmp: Path) -> bytes:
    if "v" not in _VALID_CACHE:
        save_file({"a": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int16),
                   "c": torch.randn(2).to(torch.bfloat16)}, tmp / "valid.safetensors",
                  metadata={"format": "pt"})
        _VALID_CACHE["v"] = (tmp / "valid.safetensors").read_bytes()
    return _VALID_CACHE["v"]


def _reference_accepts(p: Path) -> bool:
    try:
        with safe_open(p, "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


def _check_only_our_error(p: Path) -> None:
    try:
        read_header(p)
    except CheckpointError as e:
        assert str(p) in str(e)
        return
    # Whatever we accept, the reference reader accepts too (we match or exceed its checks),
    # and the loader reads the tensors the header points at.
    assert _reference_accepts(p), "accepted a file the reference reader refuses"
    load_state_dict(p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_bytes_raise_only_checkpoint_error(tmp_path, data):
    raw = bytearray(_valid_bytes(tmp_path))
    (n,) = struct.unpack("<Q", raw[:8])
    kind = data.draw(st.sampled_from(["flip", "truncate", "append", "length"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, 8 + n - 1))  # header bytes, length prefix included
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        raw += bytes(data.draw(st.binary(min_size=1, max_size=16)))
    else:
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    p = tmp_path / "m.safetensors"
    p.write_bytes(bytes(raw))
    _check_only_our_error(p)


_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_header_fields_raise_only_checkpoint_error(tmp_path, data):
    raw = _valid_bytes(tmp_path)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    name = data.draw(st.sampled_from(sorted(header)))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "drop", "body"]))
    if name == "__metadata__" or field == "whole":
        header[name] = data.draw(_json_value)
    elif field == "drop":
        del header[name]
    elif field == "body":
        body = body[: data.draw(st.integers(0, len(body)))] + data.draw(st.binary(max_size=8))
    elif field == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F4", "X"]) | _json_value)
    elif field == "shape":
        header[name]["shape"] = data.draw(st.lists(st.integers(-2, 2**33), max_size=3) | _json_value)
    else:
        lo, hi = header[name]["data_offsets"]
        delta = data.draw(st.lists(st.integers(-9, 9), min_size=2, max_size=2))
        header[name]["data_offsets"] = [lo + delta[0], hi + delta[1]]
    p = raw_file(tmp_path / "h.safetensors", header, body, pad=data.draw(st.booleans()))
    _check_only_our_error(p)
