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

Every `Source` carries its model family (`Source.family`, a `models.registry.Family` found from
config.json), so a verb resolves SRC once and dispatches on it. A Hugging Face Gemma 3n
checkpoint (`registry.GEMMA3N`) resolves too, folder or Hub id, with no parsed config
(matformer.slicing.gemma3n reads its config.json itself): its files are fetched as for ours
(config, index, shards, and the companions the caller names). `read_config_file(path)` reads one
config.json as its family's config.

Where the tokenizer lives: beside the weights, in the same folder (`Source.folder`). `slice
--tiers` copies it into each tier folder, where the manifest lists (and hashes) it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matformer.errors import CheckpointError, ConfigError, DataError, TierError
from matformer.io.files import is_regular, read_json
from matformer.io.folder import Folder
from matformer.io.gemma3_text import text_checkpoint
from matformer.io.gguf_source import gguf_checkpoint
from matformer.io.hub import download, fetch_weights, is_repo_id, snapshot_commit, split_revision
from matformer.io.layout import CONFIG_NAME, INDEX_NAME, Layout, resolve_files
from matformer.io.manifest import MANIFEST_NAME, Manifest, TierEntry, read_manifest, verify_file
from matformer.models.registry import (
    LM,
    Config,
    Family,
    check_loadable,
    config_from_dict,
    family_of,
)
from matformer.tiers import WidthRequest

TOKENIZER_NAME = "tokenizer.json"
# Files that travel with the weights: the tokenizer, generation settings, and the training
# settings that name the data and held-out split (so `eval` of a slice uses the same split).
COMPANION_FILES = (
    TOKENIZER_NAME,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # the chat template as transformers >= 4.50 saves it
    "chat_template.json",
    "train_config.json",
    "preprocessor_config.json",  # a MatViT's image normalisation
)


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: everything a loader needs, all on the local disk."""

    spec: str
    """What the caller gave (path or repo id), for messages."""
    kind: str
    """'folder', 'file', 'hub' or 'gguf' (a .gguf file: `folder` is its converted copy)."""
    folder: Path
    """The local folder with config.json and the weights (a multi-tier repo: the tier folder)."""
    layout: Layout
    stored_config: Config | None
    """The parsed config.json; None only when the folder has none (`config` then raises)."""
    repo_id: str | None = None
    revision: str | None = None
    """Hub: the commit every file came from."""
    manifest: Manifest | None = None
    tier_entry: TierEntry | None = None
    """Multi-tier repo: the manifest entry of the tier folder in use."""
    listed: frozenset[str] | None = None
    """Multi-tier repo: the file names the manifest lists (and that were hash-checked) in the
    tier folder; nothing else in it is read. None: no such restriction."""
    family: Family = LM
    """The model family config.json describes (one matformer does not load, e.g. Gemma 3n, has
    no stored_config)."""

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def config(self) -> Config:
        check_loadable(self.family, str(self.config_path))
        if self.stored_config is None:
            raise CheckpointError(f"{self.config_path}: no config.json beside the weights; a "
                                  f"checkpoint needs one")
        return self.stored_config

    @property
    def multi_tier(self) -> bool:
        return self.tier_entry is not None

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer.json beside the weights, or None (Hub: only fetched with companions;
        a tier of a multi-tier repo: only when the manifest lists it)."""
        return self.companion(TOKENIZER_NAME)

    def companion(self, name: str) -> Path | None:
        """A regular file `name` beside the weights that may be read (see `listed`), or None."""
        if self.listed is not None and name not in self.listed:
            return None
        p = self.folder / name
        return p if is_regular(p) else None

    def require_tokenizer(self) -> Path:
        p = self.tokenizer_path
        if p is None:
            raise DataError(f"{self.folder / TOKENIZER_NAME}: no tokenizer in this checkpoint "
                            f"(tokenizer.json is missing beside {self.describe()}'s weights); "
                            f"checkpoints written by `matformer train` carry one")
        return p

    def inputs(self) -> list[Path]:
        """What a command reading this source must never write over (`io.outputs`): its whole
        folder (a multi-tier repo: the repo root too), or for a bare .safetensors file given as
        SRC, that file and the config and companion files read beside it."""
        if self.kind == "gguf":  # the .gguf file (or its folder) and its converted copy
            return [Path(self.spec), self.folder]
        if self.kind != "file":
            root = self.folder.parent if self.tier_entry is not None else self.folder
            return [self.folder, root]
        names = [CONFIG_NAME, *COMPANION_FILES, *self.layout.shards]
        return [self.folder / n for n in names] + [Path(self.spec)]

    def read_files(self) -> list[Path]:
        """What a command writing one FILE (a report, a plot, a GGUF) must never replace: the
        files the checkpoint consists of (config.json, the weights and their index, the companion
        files, a multi-tier repo's manifest, a training run's log and resumable states under
        checkpoints/). Other files beside them may be replaced: `eval runs/demo --json-out
        runs/demo/eval.json --plot runs/demo/elastic.png` (the demo, run again) rewrites its own
        report. A whole-folder save uses `inputs` instead."""
        if self.kind in ("file", "gguf"):
            return self.inputs()
        names = [CONFIG_NAME, *COMPANION_FILES, *self.layout.shards, INDEX_NAME, MANIFEST_NAME,
                 "train_log.jsonl", "checkpoints"]
        files = [self.folder / n for n in names]
        if self.tier_entry is not None:
            files.append(self.folder.parent / MANIFEST_NAME)
        return files

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


def _config_json(path: Path, folder: Folder | None) -> Any:
    """The parsed config.json (through `folder`, the checkpoint folder opened once, when
    given), or None if absent."""
    if folder is not None:
        if folder.exists(path.name):
            return folder.read_json(path.name, error=ConfigError)
        folder.check_current(f"{path.name} disappeared")  # a save swapped the folder meanwhile
        return None
    return read_json(path, error=ConfigError) if path.exists() else None


def _parsed(obj: Any, path: Path) -> Config:
    cfg = config_from_dict(obj, source=str(path))  # the LM's, or a MatViT's (model_type vit)
    cfg.check_tier_label(source=str(path))
    return cfg


def read_config_file(path: str | os.PathLike, expect: type[Config] | None = None) -> Config:
    """A config.json file (a regular file, strict JSON; see io.files.read_json) as the config of
    the family it describes (or, given `expect`, as that config class), its tier label checked;
    errors name the file."""
    p = Path(path)
    obj = read_json(p, error=ConfigError)
    if expect is None:
        return _parsed(obj, p)
    cfg = expect.from_dict(obj, source=str(p))
    cfg.check_tier_label(source=str(p))
    return cfg


def _config_and_family(path: Path, folder: Folder | None = None) -> tuple[Config | None, Family]:
    """(config, family): a family matformer does not load (Gemma 3n) is left to its own reader
    (config None)."""
    obj = _config_json(path, folder)
    family = family_of(obj)
    if obj is None or not family.loadable:
        return None, family
    return _parsed(obj, path), family


@dataclass(frozen=True)
class TierRepo:
    """A multi-tier repo resolved without choosing a tier (`resolve_any`): its manifest, and
    each tier's `Source` on demand (only that tier's files are fetched and checked)."""

    spec: str
    kind: str
    """'folder' or 'hub'."""
    root: Path
    """The local folder holding the manifest (a Hub repo: its snapshot folder)."""
    manifest: Manifest
    repo_id: str | None = None
    revision: str | None = None
    """Hub: the commit the manifest came from (every tier is fetched at it)."""

    def tier_source(self, tier: int) -> Source:
        """The Source of the folder that stores `tier` (as `resolve_source(spec, tier=tier)`)."""
        if self.repo_id is not None:
            return _hub_multi_tier(self.spec, self.repo_id, self.revision, tier, None)
        fo = Folder(self.root)
        entry = self.manifest.pick(tier, None, source=self.spec)
        return _tier_source(self.spec, "folder", self.root, fo.sub(entry.folder), self.manifest,
                            entry)

    def describe(self) -> str:
        if self.repo_id is not None and self.revision and "@" not in self.spec:
            return f"{self.spec}@{self.revision[:12]}"
        return self.spec


def _widest(widths: int | Sequence[int] | None) -> int | None:
    if widths is None:
        return None
    return int(widths) if isinstance(widths, int) else max(int(w) for w in widths)


def resolve_source(src: str | os.PathLike | Source, *, tier: int | None = None,
                   widths: int | Sequence[int] | None = None, revision: str | None = None,
                   companions: bool | Sequence[str] = False,
                   request: WidthRequest | None = None) -> Source:
    """Resolve `src` (see the module docstring) into a `Source`.

    `tier` / `widths` (or a whole `request`, whose `layer_tiers` count too): what will run; only
    a multi-tier repo uses them (to pick the tier folder that holds the widest layer asked
    for), a plain checkpoint is sliced at run time by the loader. `revision`: Hub branch, tag
    or commit (`org/name@rev` works too). `companions`: also fetch the tokenizer and the other
    `COMPANION_FILES` of a Hub repo, or (a sequence) the files of those names (absent ones are
    fine; local files are always there). A `Source` is returned as it is."""
    if isinstance(src, Source):
        return src
    if request is not None:
        if tier is not None or widths is not None:
            raise TierError("give tier/widths or a request, not both")
        tier, widest = request.pick()
        widths = widest
    found = _resolve(src, tier, _widest(widths), revision, companions, whole_repo=False)
    assert isinstance(found, Source)
    return found


def resolve_any(src: str | os.PathLike | Source, *, tier: int | None = None,
                revision: str | None = None,
                companions: bool | Sequence[str] = False) -> Source | TierRepo:
    """As `resolve_source`, except that a multi-tier repo given no `tier` is a `TierRepo` (its
    manifest; each tier on demand) instead of an error: what `matformer info REPO` describes."""
    if isinstance(src, Source):
        return src
    return _resolve(src, tier, None, revision, companions, whole_repo=tier is None)


def _resolve(src: str | os.PathLike, tier: int | None, width: int | None, revision: str | None,
             companions: bool | Sequence[str], whole_repo: bool) -> Source | TierRepo:
    spec = os.fspath(src)
    p = Path(spec)
    if os.path.lexists(p):
        folder = gguf_checkpoint(p)  # a .gguf SRC: its checkpoint folder, converted once
        if folder is not None:
            found = _local(spec, folder, tier, width, whole_repo)
            return replace(found, kind="gguf") if isinstance(found, Source) else found
        folder = text_checkpoint(p)  # a Gemma3ForConditionalGeneration: its text model, once
        if folder is not None:
            return _local(spec, folder, tier, width, whole_repo)
        return _local(spec, p, tier, width, whole_repo)
    if is_repo_id(spec) and not looks_local(spec):
        return _hub(spec, revision, tier, width, companions, whole_repo)
    raise CheckpointError(f"{spec}: no such file or folder (and not a Hub repo id like org/name)")


_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".pt", ".pth", ".gguf", ".csv", ".txt",
                  ".jsonl", ".parquet", ".arrow", ".npy", ".png", ".jpg", ".tar", ".gz", ".zip")


def looks_local(spec: str) -> bool:
    """Whether a SRC that does not exist names a local place rather than a Hub repo (then it is
    a one-line 'no such file or folder' at once, with no network request): './x', '../x', '~x',
    an absolute path, more than one '/', a first component that exists here ('runs/typo' when
    runs/ exists), or a name ending in a file suffix ('model.safetensors', 'x/config.json').
    Only the bare `org/name[@revision]` form goes to the Hub."""
    name = spec.split("@", 1)[0]
    if spec.startswith(("./", "../", "/", "~", ".\\")) or "\\" in name or name.count("/") != 1:
        return True
    if name.lower().endswith(_FILE_SUFFIXES):
        return True
    return os.path.lexists(name.split("/", 1)[0])


def _local(spec: str, p: Path, tier: int | None, width: int | None,
           whole_repo: bool = False) -> Source | TierRepo:
    if os.path.isfile(p):
        if p.suffix not in (".safetensors", ".bin"):
            raise CheckpointError(f"{p}: not a folder or a .safetensors file")
        fo = Folder(p.parent)
        if not fo.exists(p.name):
            raise CheckpointError(f"{p}: no such file")
        layout = Layout(p.parent, [p.name], pickle=p.suffix == ".bin", dir=fo)
        config, family = _config_and_family(p.parent / CONFIG_NAME, fo)
        return Source(spec, "file", p.parent, layout, config, family=family)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise CheckpointError(f"{p}: not a folder or a .safetensors file")
    fo = Folder(p)
    if fo.is_file(MANIFEST_NAME) and not fo.exists(CONFIG_NAME):
        manifest = read_manifest(p / MANIFEST_NAME, fo)
        if whole_repo:
            return TierRepo(spec, "folder", p, manifest)
        entry = manifest.pick(tier, width, source=spec)
        tier_dir = fo.sub(entry.folder)
        return _tier_source(spec, "folder", p, tier_dir, manifest, entry)
    layout = resolve_files(fo)  # before config.json, as ever (a racing save: see io.folder)
    config, family = _config_and_family(p / CONFIG_NAME, fo)
    return Source(spec, "folder", p, layout, config, family=family)


def _tier_source(spec: str, kind: str, root: Path, tier_dir: Folder, manifest: Manifest,
                 entry: TierEntry, **hub: str | None) -> Source:
    """The Source of one tier folder: every listed file hash-checked through the folder opened
    once, and every file the load will read listed."""
    listed = frozenset(f.path.rsplit("/", 1)[1] for f in entry.files)
    for f in entry.files:
        verify_file(root / f.path, f, tier_dir)
    layout = resolve_files(tier_dir)
    reads = [CONFIG_NAME, *layout.shards] + ([layout.index.name] if layout.index else [])
    unlisted = [n for n in reads if n not in listed]
    if unlisted:
        raise CheckpointError(f"{tier_dir.path}: {', '.join(unlisted)} would be read but "
                              f"{MANIFEST_NAME} does not list (and hash) it; refusing files "
                              f"added to a tier folder after it was written")
    config, family = _config_and_family(tier_dir.path / CONFIG_NAME, tier_dir)
    return Source(spec, kind, tier_dir.path, layout, config, manifest=manifest, tier_entry=entry,
                  listed=listed, family=family, **hub)


def _hub_config(spec: str, repo: str, rev: str | None) -> Path | None:
    """The repo's config.json downloaded, or None when it has none."""
    try:
        return download(repo, CONFIG_NAME, rev, missing_ok=True)
    except CheckpointError as e:  # maybe a mistyped local path: say both
        raise CheckpointError(f"{e} (no local folder {spec!r} either)") from None


def _hub(spec: str, revision: str | None, tier: int | None, width: int | None,
         companions: bool | Sequence[str], whole_repo: bool = False) -> Source | TierRepo:
    repo, rev = split_revision(spec, revision)
    config = _hub_config(spec, repo, rev)
    if config is None:
        if whole_repo:
            path, commit = _hub_manifest(repo, rev)
            return TierRepo(spec, "hub", path.parent, read_manifest(path, Folder(path.parent)),
                            repo_id=repo, revision=commit)
        return _hub_multi_tier(spec, repo, rev, tier, width)
    commit = snapshot_commit(config, CONFIG_NAME, rev)
    fetched = fetch_weights(repo, config.parent, commit)
    for name in COMPANION_FILES if companions is True else companions or ():
        download(repo, name, commit, missing_ok=True)
    fo = Folder(config.parent)
    layout = resolve_files(fo)
    if layout.shards != fetched.shards:
        raise CheckpointError(f"{repo}: the downloaded snapshot {config.parent} holds other "
                              f"weights than the index names; clear it from the cache")
    text = text_checkpoint(config.parent)  # a Gemma3ForConditionalGeneration: its text model
    if text is not None:
        found = _local(spec, text, tier, width)
        assert isinstance(found, Source)  # the text folder holds a config.json
        return replace(found, kind="hub", repo_id=repo, revision=commit)
    parsed, family = _config_and_family(config, fo)
    return Source(spec, "hub", config.parent, layout, parsed, repo_id=repo, revision=commit,
                  family=family)


def _hub_manifest(repo: str, rev: str | None) -> tuple[Path, str]:
    """(the downloaded manifest of a Hub multi-tier repo, the commit it came from)."""
    path = download(repo, MANIFEST_NAME, rev, missing_ok=True)
    if path is None:
        raise CheckpointError(f"{repo}: the repo has no {CONFIG_NAME} (and no {MANIFEST_NAME}); "
                              f"it is not a matformer checkpoint")
    return path, snapshot_commit(path, MANIFEST_NAME, rev)


def _hub_multi_tier(spec: str, repo: str, rev: str | None, tier: int | None,
                    width: int | None) -> Source:
    path, commit = _hub_manifest(repo, rev)
    root = path.parent
    fo = Folder(root)
    manifest = read_manifest(path, fo)
    entry = manifest.pick(tier, width, source=spec)
    for f in entry.files:  # only this tier's files, every one checked before use
        got = download(repo, f.path, commit)
        assert got is not None
        if got != root / f.path:
            raise CheckpointError(f"{repo}: {f.path} resolved outside the snapshot folder {root}")
    return _tier_source(spec, "hub", root, fo.sub(entry.folder), manifest, entry,
                        repo_id=repo, revision=commit)
