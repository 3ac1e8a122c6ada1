"""The manifest of a multi-tier repo: `matformer_manifest.json` at the repo's top.

`matformer slice SRC -o REPO --tiers 1,2,3` writes REPO/tier-1/, REPO/tier-2/, ... (each a
complete checkpoint folder with its tokenizer) and this manifest: schema version, base width,
and per tier its width, folder and files with sizes and sha256. A loader reads the manifest,
picks one tier, fetches only that tier's files and checks each against its size and hash
(`verify_file`). A repo is multi-tier when it has the manifest and no config.json at its top.
See docs/SLICING.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError, TierError
from matformer.io.atomic import atomic_write
from matformer.io.files import open_regular, read_json
from matformer.io.folder import Folder
from matformer.tiers import tier_of, width_of

MANIFEST_NAME = "matformer_manifest.json"
MANIFEST_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ManifestFile:
    path: str
    """'/'-separated, relative to the repo's top, directly inside its tier's folder."""
    size: int
    sha256: str


@dataclass(frozen=True)
class TierEntry:
    """One tier of a multi-tier repo."""

    tier: int
    intermediate_size: int
    folder: str
    files: tuple[ManifestFile, ...]


@dataclass(frozen=True)
class Manifest:
    base_intermediate_size: int
    tiers: dict[int, TierEntry]

    def pick(self, tier: int | None, width: int | None = None, source: str = MANIFEST_NAME) -> TierEntry:
        """The tier entry that runs `tier` (or the per-layer maximum `width`): that tier when
        stored, else the narrowest stored tier that holds its width (the loader then slices at
        run time). No request, or one wider than every stored tier, is a TierError."""
        held = ", ".join(f"{t} (width {e.intermediate_size})" for t, e in sorted(self.tiers.items()))
        if tier is None and width is None:
            raise TierError(f"{source} is a multi-tier repo holding tiers {held}; pass tier= (or "
                            f"--tier) to choose one")
        if tier is not None and tier in self.tiers:
            return self.tiers[tier]
        want = width_of(self.base_intermediate_size, tier) if tier is not None else int(width or 0)
        wider = [e for e in self.tiers.values() if e.intermediate_size >= want]
        if not wider:
            what = f"tier {tier}" if tier is not None else "the widths asked for"
            raise TierError(f"{source} holds tiers {held}; {what} needs width {want}, wider than "
                            f"all of them — use the full checkpoint")
        return min(wider, key=lambda e: e.intermediate_size)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _file_entries(root: Path, folder: str) -> list[dict[str, Any]]:
    return [{"path": f"{folder}/{p.name}", "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted((root / folder).iterdir())
            if p.is_file() and not p.name.startswith(".")]


def build_manifest(root: Path, base: int, folders: dict[int, str],
                   widths: dict[int, int]) -> dict[str, Any]:
    """The manifest object for tier folders already written under `root`."""
    return {
        "format": "matformer-manifest",
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "base_intermediate_size": base,
        "tiers": {
            str(t): {"intermediate_size": widths[t], "folder": folders[t],
                     "files": _file_entries(root, folders[t])}
            for t in sorted(folders)
        },
    }


def write_manifest(root: Path, base: int, folders: dict[int, str], widths: dict[int, int]) -> Path:
    """Hash the tier folders under `root` and write the manifest atomically; returns its path."""
    obj = build_manifest(root, base, folders, widths)
    path = root / MANIFEST_NAME
    try:
        return atomic_write(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the manifest ({e.strerror or e})") from None


def _safe_relpath(p: Any, where: str) -> str:
    """A manifest path must stay inside the repo: relative, '/'-separated, no '..'."""
    if not isinstance(p, str) or not p:
        raise CheckpointError(f"{where}: expected a relative file path, got {p!r}")
    parts = p.split("/")
    if p.startswith("/") or "\\" in p or ":" in p or any(x in ("", ".", "..") for x in parts):
        raise CheckpointError(f"{where}: path {p!r} is not a plain relative path inside the repo")
    return p


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_file(f: Any, folder: str, where: str) -> ManifestFile:
    if not isinstance(f, dict):
        raise CheckpointError(f"{where}: expected an object")
    path = _safe_relpath(f.get("path"), f"{where}.path")
    if not path.startswith(folder + "/") or path.count("/") != folder.count("/") + 1:
        raise CheckpointError(f"{where}: {path!r} is not a file directly in folder {folder!r}")
    size, digest = f.get("size"), f.get("sha256")
    if not _int(size) or size < 0:
        raise CheckpointError(f"{where}: size must be a non-negative integer, got {size!r}")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise CheckpointError(f"{where}: sha256 must be 64 lowercase hex digits, got {digest!r}")
    return ManifestFile(path, size, digest)


def _parse_tier(key: Any, entry: Any, base: int, source: str) -> TierEntry:
    where = f"{source}: tiers[{key!r}]"
    if not (isinstance(key, str) and re.fullmatch(r"[0-9]{1,3}", key)):
        raise CheckpointError(f"{where}: tier keys must be small non-negative integers written "
                              f"with the digits 0-9")
    t = int(key)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: expected an object")
    folder = _safe_relpath(entry.get("folder"), f"{where}.folder")
    width = entry.get("intermediate_size")
    if not _int(width) or tier_of(base, width) != t:
        raise CheckpointError(f"{where}: intermediate_size {width!r} is not tier {t} of base {base}")
    files = entry.get("files")
    if not isinstance(files, list) or not files:
        raise CheckpointError(f"{where}.files: expected a non-empty list")
    checked = tuple(_parse_file(f, folder, f"{where}.files[{k}]") for k, f in enumerate(files))
    if not any(c.path == f"{folder}/config.json" for c in checked):
        raise CheckpointError(f"{where}: the file list has no {folder}/config.json")
    if not any(c.path.endswith(".safetensors") for c in checked):
        raise CheckpointError(f"{where}: the file list names no .safetensors weights; a tier "
                              f"lists every file it is loaded from")
    if len({c.path for c in checked}) != len(checked):
        raise CheckpointError(f"{where}: the file list names a file twice")
    return TierEntry(t, width, folder, checked)


def parse_manifest(obj: Any, source: str = MANIFEST_NAME) -> Manifest:
    """Validate a manifest object (every path, size and hash) before anything is fetched."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    version = obj.get("schema_version")
    if not _int(version):
        raise CheckpointError(f"{source}: missing or invalid 'schema_version' ({version!r})")
    if version > MANIFEST_SCHEMA_VERSION:
        raise CheckpointError(f"{source}: schema_version {version} is newer than this matformer "
                              f"reads ({MANIFEST_SCHEMA_VERSION}); upgrade matformer")
    base = obj.get("base_intermediate_size")
    if not _int(base) or base <= 0:
        raise CheckpointError(f"{source}: 'base_intermediate_size' must be a positive integer, "
                              f"got {base!r}")
    tiers = obj.get("tiers")
    if not isinstance(tiers, dict) or not tiers:
        raise CheckpointError(f"{source}: 'tiers' must be a non-empty object of tier -> files")
    entries = [_parse_tier(k, e, base, source) for k, e in tiers.items()]
    return Manifest(base, {e.tier: e for e in entries})


def read_manifest(path: Path, folder: Folder | None = None) -> Manifest:
    """The validated manifest at `path` (read through `folder`, the repo opened once, if given)."""
    if folder is not None:
        obj = folder.read_json(MANIFEST_NAME)
    else:
        obj = read_json(path)
    return parse_manifest(obj, source=str(path))


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    with os.fdopen(os.dup(fd), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, f: ManifestFile, folder: Folder | None = None) -> None:
    """`path` must have the manifest's size and sha256 (a truncated, replaced or corrupt file is
    a CheckpointError naming it). With `folder` (the tier folder, opened once), the file is
    opened through it, so a later open of the same name in this load must be this same file."""
    try:
        fd = folder.open(path.name) if folder is not None else open_regular(path)
    except CheckpointError as e:
        if "no such file" in str(e):
            raise CheckpointError(f"{path}: listed in {MANIFEST_NAME} but missing") from None
        raise
    try:
        size = os.fstat(fd).st_size
        digest = _sha256_fd(fd) if size == f.size else ""
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if size != f.size:
        raise CheckpointError(f"{path}: size {size} bytes, the manifest says {f.size} — a "
                              f"truncated or replaced file; download it again")
    if digest != f.sha256:
        raise CheckpointError(f"{path}: sha256 {digest} does not match the manifest ({f.sha256}) "
                              f"— the file is corrupt or was replaced; download it again")
