"""A loopback HTTP server speaking the part of the Hugging Face Hub protocol that
`huggingface_hub.hf_hub_download` uses, so Hub loading is tested without a network.

Endpoints (huggingface_hub 0.2x-2.x):
- `HEAD /{org}/{name}/resolve/{revision}/{filename}`: 200 with `X-Repo-Commit` (the 40-hex commit),
  `ETag`, `X-Linked-Etag`, `X-Linked-Size`, `Content-Length`; a missing file is
  404 + `X-Error-Code: EntryNotFound` (+ `X-Repo-Commit`, which the client uses to cache the
  absence), an unknown repo 404 + `RepoNotFound`, an unknown revision 404 + `RevisionNotFound`,
  a private repo without the right token 401.
- `GET` of the same URL: the bytes, honouring `Range: bytes=N-` (206 + `Content-Range`) as the
  client does to resume a cut download.

Faults for tests: `cut[filename] = k` drops the connection half-way through the next k GETs of
that file (the client sees a protocol error and resumes with a Range request); `short[filename]
= k` ends the next k GETs early with a consistent Content-Length (the client's size check must
catch it). Every request is logged as (method, filename, Range header, Authorization header).
"""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.tokens: dict[str, str] = {}  # repo -> token required (private repo)
        self.cut: dict[str, int] = {}
        self.short: dict[str, int] = {}
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], token: str | None = None) -> str:
        """Publish (or replace) a repo; returns its new commit hash."""
        h = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + files[name])
        digest = h.hexdigest()
        self.repos[repo_id] = dict(files)
        self.commits[repo_id] = digest
        if token:
            self.tokens[repo_id] = token
        return digest

    def requests(self, method: str | None = None) -> list[str]:
        return [f for m, f, _, _ in self.log if method is None or m == method]

    # ---- protocol -------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        parts = unquote(h.path.split("?", 1)[0]).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(h, head, 404, "RepoNotFound", None)
        repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        with self._lock:
            self.log.append(("HEAD" if head else "GET", filename, h.headers.get("Range"),
                             h.headers.get("Authorization")))
        if repo_id not in self.repos:
            return self._error(h, head, 404, "RepoNotFound", None)
        need = self.tokens.get(repo_id)
        if need and h.headers.get("Authorization") != f"Bearer {need}":
            return self._error(h, head, 401, "RepoNotFound", None)
        commit = self.commits[repo_id]
        if revision not in ("main", commit):
            return self._error(h, head, 404, "RevisionNotFound", None)
        files = self.repos[repo_id]
        if filename not in files:
            return self._error(h, head, 404, "EntryNotFound", commit)
        data = files[filename]
        etag = hashlib.sha256(data).hexdigest()
        start = 0
        rng = h.headers.get("Range")
        if rng and not head and rng.startswith("bytes=") and rng[6:].split("-")[0].isdigit():
            start = int(rng[6:].split("-")[0])
        body = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{etag}"')
        h.send_header("X-Linked-Etag", f'"{etag}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if head:
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            return
        with self._lock:
            cut = self.cut.get(filename, 0) > 0
            short = not cut and self.short.get(filename, 0) > 0
            if cut:
                self.cut[filename] -= 1
            if short:
                self.short[filename] -= 1
        if short:
            body = body[: len(body) // 2]
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if cut:
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        h.wfile.write(body)

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, head: bool, status: int, code: str, commit: str | None) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        msg = f'{{"error": "{code}"}}'.encode()
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(msg)))
        h.end_headers()
        if not head:
            h.wfile.write(msg)
