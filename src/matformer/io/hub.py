"""Fetching a checkpoint from the Hugging Face Hub through huggingface_hub.

huggingface_hub does the HTTP, the cache, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`; it
downloads into `<blob>.incomplete` and renames only a complete file, so a cut download is never
served from the cache as if complete. We add: config.json first, then the index, then only the
shard files the index names, each name validated before it becomes a URL or a path; every file
of one load comes from the same commit (the one config.json resolved to), so a push between two
requests cannot mix two versions.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError
from .layout import CONFIG_NAME, INDEX_NAME, SINGLE_NAMES, Layout, parse_index

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_repo_id(src: str) -> bool:
    name = src.split("@", 1)[0]
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(".safetensors")


def split_revision(src: str, revision: str | None) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); an explicit `revision` wins."""
    if "@" in src:
        repo, rev = src.split("@", 1)
        return repo, revision or rev or None
    return src, revision


def fetch(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None,
          endpoint: str | None = None, token: str | bool | None = None) -> Layout:
    """Download (or find in the cache) config.json, the index and the needed shards of a Hub
    model repo; returns the layout of the local snapshot folder."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    def get(filename: str, rev: str | None) -> Path | None:
        """Local path of `filename`, or None when the repo (at `rev`) has no such file."""
        try:
            return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=cache_dir,
                                        endpoint=endpoint, token=token))
        except RemoteEntryNotFoundError:
            return None
        except LocalEntryNotFoundError as e:
            # Offline: a file the Hub said was absent is recorded in the cache (.no_exist);
            # anything else not cached is an error, never "absent".
            cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=rev)
            if cached is not None and not isinstance(cached, str):
                return None
            raise CheckpointError(
                f"{repo_id}: {filename} is not in the local cache and the Hub cannot be reached "
                f"(offline mode or network error: {_short(e)})"
            ) from None
        except Exception as e:  # HTTP, auth, repo not found, disk: report, never swallow
            raise CheckpointError(f"{repo_id}: cannot download {filename} ({_short(e)})") from None

    config = get(CONFIG_NAME, revision)
    if config is None:
        raise CheckpointError(f"{repo_id}: the repo has no {CONFIG_NAME}")
    snapshot = config.parent
    # Pin every further request to the commit config.json came from (snapshots/<commit>/...).
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    idx = get(INDEX_NAME, commit)
    if idx is not None:
        wm = parse_index(idx)
        shards = sorted(set(wm.values()))  # names already checked by parse_index
        for s in shards:
            got = get(s, commit)
            if got is None:
                raise CheckpointError(f"{repo_id}: {INDEX_NAME} names shard {s!r}, which is not in "
                                      f"the repo")
            if got.parent != snapshot:
                raise CheckpointError(f"{repo_id}: {s} resolved outside the snapshot folder")
        return Layout(snapshot, shards, snapshot / INDEX_NAME, wm)
    for name in SINGLE_NAMES:
        if get(name, commit) is not None:
            return Layout(snapshot, [name])
    raise CheckpointError(f"{repo_id}: no safetensors weights in the repo (looked for "
                          f"{INDEX_NAME}, {', '.join(SINGLE_NAMES)}); pickle .bin repos are not "
                          f"downloaded")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()
