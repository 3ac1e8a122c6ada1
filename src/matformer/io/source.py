"""What SRC means: the one place that turns a user's checkpoint argument into local files.

`resolve_source(src, tier=..., revision=...)` accepts
- a checkpoint folder (config.json + safetensors weights; a tokenizer beside them if any),
- a `.safetensors` file (config.json in the same folder),
- a Hub repo id `org/name[@revision]` (downloaded through `io.hub`, every file pinned to the
  commit config.json came from),
- a multi-tier repo written by `matformer slice SRC -o REPO --tiers ...` (local or on the Hub:
  `matformer_manifest.json` and no config.json at the top) plus the tier to run: the folder of
  that tier (or of the narrowest stored tier that holds it), with only its files fetched and
  each checked against the manifest's size and sha256;
and returns one `Source`: the local folder, its weight files (`Layout`), the parsed config, the
tokenizer file if there is one, the manifest entry for a multi-tier repo, the Hub commit. Every
verb and every public loading function goes through it. Torch is never imported here.

Where the tokenizer lives: beside the weights, in the same folder (`Source.folder`). `slice
--tiers` copies it into each tier folder, where the manifest lists (and hashes) it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import MatFormerConfig
from ..errors import CheckpointError, DataError
from .hub import download, fetch_weights, is_repo_id, snapshot_commit, split_revision
from .layout import CONFIG_NAME, Layout, resolve_files
from .manifest import MANIFEST_NAME, Manifest, TierEntry, read_manifest, verify_file

TOKENIZER_NAME = "tokenizer.json"
# Files that travel with the weights: the tokenizer, generation settings, and the training
# settings that name the data and held-out split (so `eval` of a slice uses the same split).
COMPANION_FILES = (
    TOKENIZER_NAME,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "train_config.json",
)


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: everything a loader needs, all on the local disk."""

    spec: str
    """What the caller gave (path or repo id), for messages."""
    kind: str
    """'folder', 'file' or 'hub'."""
    folder: Path
    """The local folder with config.json and the weights (a multi-tier repo: the tier folder)."""
    layout: Layout
    stored_config: MatFormerConfig | None
    """The parsed config.json; None only when the folder has none (`config` then raises)."""
    repo_id: str | None = None
    revision: str | None = None
    """Hub: the commit every file came from."""
    manifest: Manifest | None = None
    tier_entry: TierEntry | None = None
    """Multi-tier repo: the manifest entry of the tier folder in use."""

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def config(self) -> MatFormerConfig:
        if self.stored_config is None:
            raise CheckpointError(f"{self.config_path}: no config.json beside the weights; a "
                                  f"checkpoint needs one")
        return self.stored_config

    @property
    def multi_tier(self) -> bool:
        return self.tier_entry is not None

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer.json beside the weights, or None (Hub: only fetched with companions)."""
        p = self.folder / TOKENIZER_NAME
        return p if p.is_file() else None

    def require_tokenizer(self) -> Path:
        p = self.tokenizer_path
        if p is None:
            raise DataError(f"{self.folder / TOKENIZER_NAME}: no tokenizer in this checkpoint "
                            f"(tokenizer.json is missing beside {self.describe()}'s weights); "
                            f"checkpoints written by `matformer train` carry one")
        return p

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """'runs/demo', 'acme/x@<commit>', 'repo (tier-2/)'."""
        name = self.spec
        if self.repo_id is not None and self.revision and "@" not in name:
            name = f"{name}@{self.revision[:12]}"
        if self.tier_entry is not None:
            name += f" ({self.tier_entry.folder}/)"
        return name


def read_config(path: Path) -> MatFormerConfig | None:
    """config.json of a checkpoint, its tier label checked against its sizes; None if absent
    (a bare state dict can still be loaded; a model cannot)."""
    if not path.exists():
        return None
    cfg = MatFormerConfig.from_json_file(path)
    cfg.check_tier_label(source=str(path))
    return cfg


def _widest(widths: int | Sequence[int] | None) -> int | None:
    if widths is None:
        return None
    return int(widths) if isinstance(widths, int) else max(int(w) for w in widths)


def resolve_source(src: str | os.PathLike | Source, *, tier: int | None = None,
                   widths: int | Sequence[int] | None = None, revision: str | None = None,
                   companions: bool = False) -> Source:
    """Resolve `src` (see the module docstring) into a `Source`.

    `tier` / `widths`: what will run; only a multi-tier repo uses them (to pick the tier
    folder), a plain checkpoint is sliced at run time by the loader. `revision`: Hub branch, tag
    or commit (`org/name@rev` works too). `companions`: also fetch the tokenizer and the other
    `COMPANION_FILES` of a Hub repo (absent ones are fine; local files are always there).
    A `Source` is returned as it is."""
    if isinstance(src, Source):
        return src
    spec = os.fspath(src)
    p = Path(spec)
    if p.exists():
        return _local(spec, p, tier, _widest(widths))
    if is_repo_id(spec):
        return _hub(spec, revision, tier, _widest(widths), companions)
    raise CheckpointError(f"{spec}: no such file or folder (and not a Hub repo id like org/name)")


def _local(spec: str, p: Path, tier: int | None, width: int | None) -> Source:
    if p.is_file():
        if p.suffix not in (".safetensors", ".bin"):
            raise CheckpointError(f"{p}: not a folder or a .safetensors file")
        layout = Layout(p.parent, [p.name], pickle=p.suffix == ".bin")
        return Source(spec, "file", p.parent, layout, read_config(p.parent / CONFIG_NAME))
    manifest_path = p / MANIFEST_NAME
    if manifest_path.is_file() and not (p / CONFIG_NAME).exists():
        manifest = read_manifest(manifest_path)
        entry = manifest.pick(tier, width, source=spec)
        for f in entry.files:
            verify_file(p / f.path, f)
        folder = p / entry.folder
        return Source(spec, "folder", folder, resolve_files(folder),
                      read_config(folder / CONFIG_NAME), manifest=manifest, tier_entry=entry)
    return Source(spec, "folder", p, resolve_files(p), read_config(p / CONFIG_NAME))


def _hub(spec: str, revision: str | None, tier: int | None, width: int | None,
         companions: bool) -> Source:
    repo, rev = split_revision(spec, revision)
    try:
        config = download(repo, CONFIG_NAME, rev, missing_ok=True)
    except CheckpointError as e:  # maybe a mistyped local path: say both
        raise CheckpointError(f"{e} (no local folder {spec!r} either)") from None
    if config is None:
        return _hub_multi_tier(spec, repo, rev, tier, width)
    commit = snapshot_commit(config, CONFIG_NAME, rev)
    layout = fetch_weights(repo, config.parent, commit)
    if companions:
        for name in COMPANION_FILES:
            download(repo, name, commit, missing_ok=True)
    return Source(spec, "hub", config.parent, layout, read_config(config), repo_id=repo,
                  revision=commit)


def _hub_multi_tier(spec: str, repo: str, rev: str | None, tier: int | None,
                    width: int | None) -> Source:
    path = download(repo, MANIFEST_NAME, rev, missing_ok=True)
    if path is None:
        raise CheckpointError(f"{repo}: the repo has no {CONFIG_NAME} (and no {MANIFEST_NAME}); "
                              f"it is not a matformer checkpoint")
    commit = snapshot_commit(path, MANIFEST_NAME, rev)
    manifest = read_manifest(path)
    entry = manifest.pick(tier, width, source=spec)
    root = path.parent
    for f in entry.files:  # only this tier's files, every one checked before use
        got = download(repo, f.path, commit)
        assert got is not None
        if got != root / f.path:
            raise CheckpointError(f"{repo}: {f.path} resolved outside the snapshot folder {root}")
        verify_file(got, f)
    folder = root / entry.folder
    return Source(spec, "hub", folder, resolve_files(folder), read_config(folder / CONFIG_NAME),
                  repo_id=repo, revision=commit, manifest=manifest, tier_entry=entry)
