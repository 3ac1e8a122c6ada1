"""Downloading files from the Hugging Face Hub through huggingface_hub: the one place that does.

huggingface_hub does the HTTP, the cache, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`; it
downloads into `<blob>.incomplete` and renames only a complete file, so a cut download is never
served from the cache as if complete. We add: one-line `CheckpointError`s instead of HTTP
tracebacks, "absent" told apart from "unreachable" (offline, an absence the Hub reported before
is remembered in the cache; anything else not cached is an error, never "absent"), and
`fetch_weights`: the index first, then only the shard files it names, each name validated before
it becomes a URL or a path. Callers pin every file of one load to one commit (`snapshot_commit`)
so a push between two requests cannot mix two versions. `io.source` decides which files to get.
"""

from __future__ import annotations

import functools
import re
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from matformer.errors import CheckpointError
from matformer.io.layout import INDEX_NAME, SINGLE_NAMES, Layout, parse_index

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_repo_id(src: str) -> bool:
    name = src.split("@", 1)[0]
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(".safetensors")


def split_revision(src: str, revision: str | None) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); an explicit `revision` wins."""
    if "@" in src:
        repo, rev = src.split("@", 1)
        return repo, revision or rev or None
    return src, revision


def snapshot_commit(path: Path, filename: str, revision: str | None) -> str | None:
    """The commit a downloaded file came from (its cache folder is snapshots/<commit>/...),
    to pin further requests of the same load; `revision` when the path does not say."""
    root = path.parents[filename.count("/")]
    return root.name if _COMMIT.fullmatch(root.name) else revision


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:  # gaierror included: no such name, no resolver, no network
        return False
    return True


@functools.cache
def hub_reachable(host: str) -> bool:
    """Whether the Hub endpoint's host name resolves (asked once per host and process, bounded
    to 3 s). With no network huggingface_hub retries a failed lookup five times with back-off
    (about 25 s and a screen of retry warnings) before its error; a name that does not resolve
    means no Hub, so `download` goes to the local cache at once instead."""
    answer: list[bool] = []
    probe = threading.Thread(target=lambda: answer.append(_resolves(host)), daemon=True)
    probe.start()
    probe.join(3.0)
    return bool(answer and answer[0])


def download(repo_id: str, filename: str, revision: str | None = None, *,
             missing_ok: bool = False) -> Path | None:
    """Local path of `filename` of the Hub repo (downloaded, or from the cache).

    With `missing_ok`, None when the repo (at `revision`) has no such file; otherwise its absence
    is a CheckpointError. Unreachable (offline, network, auth) is always a CheckpointError."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    host = urlsplit(constants.ENDPOINT).hostname
    local_only = bool(host) and not hub_reachable(host)
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                    local_files_only=local_only))
    except RemoteEntryNotFoundError:
        if missing_ok:
            return None
        raise CheckpointError(f"{repo_id}: the repo has no {filename}") from None
    except LocalEntryNotFoundError as e:
        # Offline: a file the Hub said was absent is recorded in the cache (.no_exist).
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
        if missing_ok and cached is not None and not isinstance(cached, str):
            return None
        why = (f"its host {host} does not resolve: no network?" if local_only
               else f"offline mode or network error: {_short(e)}")
        raise CheckpointError(
            f"{repo_id}: {filename} is not in the local cache and the Hub cannot be reached "
            f"({why})"
        ) from None
    except Exception as e:  # HTTP, auth, repo not found, disk: report, never swallow
        raise CheckpointError(f"{repo_id}: cannot download {filename} ({_short(e)})") from None


def fetch_weights(repo_id: str, folder: Path, commit: str | None) -> Layout:
    """The weights of the checkpoint whose config.json was downloaded into `folder`: the index
    and the shards it names, or the first single-file name present; all at `commit`."""
    idx = download(repo_id, INDEX_NAME, commit, missing_ok=True)
    if idx is not None:
        wm = parse_index(idx)
        shards = sorted(set(wm.values()))  # names already checked by parse_index
        for s in shards:
            got = download(repo_id, s, commit, missing_ok=True)
            if got is None:
                raise CheckpointError(f"{repo_id}: {INDEX_NAME} names shard {s!r}, which is not in "
                                      f"the repo")
            if got.parent != folder:
                raise CheckpointError(f"{repo_id}: {s} resolved outside the snapshot folder")
        return Layout(folder, shards, folder / INDEX_NAME, wm)
    for name in SINGLE_NAMES:
        if download(repo_id, name, commit, missing_ok=True) is not None:
            return Layout(folder, [name])
    raise CheckpointError(f"{repo_id}: no safetensors weights in the repo (looked for "
                          f"{INDEX_NAME}, {', '.join(SINGLE_NAMES)}); pickle .bin repos are not "
                          f"downloaded")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()
