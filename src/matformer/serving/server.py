"""Load a checkpoint for serving and run the HTTP server (uvicorn).

`load_state(src, ...)` resolves SRC (anything `matformer generate` takes), reads its tokenizer,
chat template and model once, and builds the engine and catalog. `serve(...)` runs uvicorn in
this thread until SIGINT/SIGTERM: uvicorn stops accepting, lets in-flight requests finish (up to
`GRACE_S`), then the engine cancels what is left. `ServerThread` runs the same server in a
background thread on a socket bound here (tests and benchmarks: port 0 = a free port).
"""

from __future__ import annotations

import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from matformer.data import tokenizer_files as TF
from matformer.data.text import load_tokenizer
from matformer.errors import ConfigError, DataError
from matformer.inference.chat import end_of_turn, render, special_tokens
from matformer.io.checkpoint import load_model
from matformer.io.source import resolve_source
from matformer.models.lm.model import MatFormerLM
from matformer.serving.app import CHATML, ServedChat, ServerState, create_app
from matformer.serving.catalog import Catalog
from matformer.serving.engine import Engine
from matformer.serving.metrics import Metrics
from matformer.serving.speculation import MODES
from matformer.tiers import describe_widths

GRACE_S = 30
"""Seconds a shutdown waits for in-flight requests before cancelling them."""

MAX_BATCH_LIMIT = 1024


def served_name(src: Any) -> str:
    """The model NAME: the checkpoint folder's (or file's, or Hub repo's) name."""
    text = str(src).rstrip("/\\")
    text = re.sub(r"@[^/\\]*$", "", text)  # a Hub revision
    name = Path(text).name
    for ext in (".safetensors", ".gguf", ".bin"):
        name = name.removesuffix(ext)
    return name.replace("@", "_") or "model"


def check_options(max_batch: int, slo_ms: float | None, port: int) -> None:
    """One-line errors for options no server can run with."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or \
            not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ConfigError(f"--max-batch must be an integer in 1..{MAX_BATCH_LIMIT}, "
                          f"got {max_batch!r}")
    if slo_ms is not None and not (0 < slo_ms < 1e7):
        raise ConfigError(f"--slo-ms must be a positive number of milliseconds, got {slo_ms!r}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), got {port}")


def served_chat(tokenizer: Any) -> ServedChat:
    """The tokenizer's chat template (`matformer.inference.chat`'s lookup and rendering), or
    ChatML when it carries none. A template that does not compile fails here, at start-up
    (one line), not on every chat request."""
    template = TF.chat_template(tokenizer)
    if template is None:
        return ServedChat(CHATML, special_tokens(tokenizer), fallback=True)
    try:
        render(template, [{"role": "user", "content": "hi"}], **special_tokens(tokenizer))
    except DataError as e:
        if "does not compile" in str(e):  # refusing a probe conversation is the template's right
            raise
    eot = end_of_turn(tokenizer, template)
    return ServedChat(template, special_tokens(tokenizer),
                      frozenset() if eot is None else frozenset({eot}))


def load_state(src: Any, *, max_batch: int = 8, slo_ms: float | None = None,
               compile: bool = False, speculative: str = "auto", api_key: str | None = None,
               device: str | None = None, name: str | None = None,
               revision: str | None = None) -> ServerState:
    """Everything a server needs, loaded once; nothing is started yet."""
    check_options(max_batch, slo_ms, 0)
    if speculative not in MODES:
        raise ConfigError(f"--speculative must be one of {', '.join(MODES)}, got {speculative!r}")
    source = resolve_source(src, revision=revision, companions=True)
    tokenizer = load_tokenizer(source.folder)  # a missing tokenizer fails before the weights
    chat = served_chat(tokenizer)
    model = load_model(source, device=device)
    if not isinstance(model, MatFormerLM):
        raise ConfigError(f"{src}: serve runs language models; this checkpoint holds a "
                          f"{type(model).__name__}")
    model.eval().requires_grad_(False)
    metrics = Metrics()
    catalog = Catalog(name or served_name(src), model)
    engine = Engine(model, catalog, metrics, max_batch=max_batch, slo_ms=slo_ms, compile=compile,
                    speculative=speculative)
    return ServerState(engine=engine, catalog=catalog, tokenizer=tokenizer, chat=chat,
                       metrics=metrics, api_key=api_key or None, created=int(time.time()))


def describe(state: ServerState, url: str) -> str:
    """The start-up line."""
    cat = state.catalog
    tiers = ", ".join(f"tier {t}" for t in cat.tiers)
    policy = state.engine.policy
    auto = (f"auto: widest width under {1e3 * policy.slo_s:g} ms per token"
            if policy.slo_s is not None else "auto: full width (no --slo-ms)")
    chat = "ChatML (the tokenizer has no chat template)" if state.chat.fallback else \
        "the tokenizer's"
    spec = state.engine.speculator.mode
    return (f"matformer serve: {cat.name} ({describe_widths(cat.base, cat.stored.widths)}; "
            f"serves {tiers} and Mix'n'Match plans; {auto}; speculative: {spec}; "
            f"chat template: {chat}; "
            f"max batch {state.engine.max_batch}) on {url}")


def _config(state: ServerState, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(create_app(state), log_level=log_level, lifespan="on",
                          timeout_graceful_shutdown=GRACE_S, access_log=False)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another "
                          f"--port or --host") from None
    sock.listen(2048)
    return sock


def serve(state: ServerState, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server in this thread until interrupted (graceful shutdown)."""
    check_options(state.engine.max_batch, None, port)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(describe(state, f"http://{shown}:{sock.getsockname()[1]}"), file=sys.stderr, flush=True)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then raises the signal again; that
    # shutdown was the signal's whole point, so it ends here (the CLI exits 0).
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    try:
        uvicorn.Server(_config(state, log_level)).run(sockets=[sock])
    except (KeyboardInterrupt, Stopped):
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
        sock.close()
    print("matformer serve: stopped", file=sys.stderr, flush=True)


class Stopped(Exception):
    """SIGTERM, raised again by uvicorn after its graceful shutdown."""


def _stopped(sig: int, frame: Any) -> None:
    raise Stopped


class ServerThread:
    """The server in a background thread on a loopback port (tests, benchmarks)."""

    def __init__(self, state: ServerState, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = state
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(_config(state, "warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="matformer-serve", daemon=True)

    def start(self, timeout: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
