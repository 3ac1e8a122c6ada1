"""The HTTP routes: OpenAI's completions, chat completions and models, plus health and metrics.

Each completion request is checked (types, width, limits) before anything is queued: a bad one
gets a 4xx in OpenAI's error shape and costs the running batch nothing. A good one becomes one
engine `Job` per sequence (prompts x n); their tokens come back through an asyncio queue and are
turned into text incrementally (`Detokenizer`): streamed as server-sent events, or gathered into
one JSON response. A client that goes away cancels its jobs (the stream's generator is closed;
a plain request polls for the disconnect) and the batch goes on without them.

Every response reports the width that made its tokens: `usage.widths` ({model name: tokens})
and, on each streamed choice, `width`; and `usage.speculative` ({"drafted": n, "accepted": m}):
the draft tokens speculative rounds proposed for it and how many the verifier kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from matformer.errors import DataError, TierError
from matformer.inference.chat import check_messages, render
from matformer.inference.sampling import Sampler, eos_set
from matformer.serving.catalog import Catalog, Width
from matformer.serving.engine import Engine, EngineBusy, EngineClosed, Event, Job
from matformer.serving.metrics import Metrics
from matformer.serving.protocol import (
    MAX_BODY_BYTES,
    MAX_CHOICES,
    ChatRequest,
    CompletionRequest,
    Sampling,
    describe_validation,
    error_body,
)

DEFAULT_CHAT_TOKENS = 512

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""The template of a checkpoint that carries none (what `matformer train` writes): ChatML, the
layout llama.cpp also falls back to; the start-up line says so."""
"""max_tokens of a chat request that gives none (capped by the context)."""

DISCONNECT_POLL_S = 0.5


class Mailbox:
    """Hands the engine thread's events to the event loop with one wake-up per batch: the
    engine posts every row's token of a step, and the first post since the loop last drained
    schedules the drain; the others only append (a step of 8 rows wakes the loop once, not 8
    times)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def post(self, queue: asyncio.Queue, item: Any) -> None:
        """Deliver `item` into `queue` on the loop (any thread)."""
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class ServedChat:
    """The chat template the chat endpoint renders with `matformer.inference.chat.render` (the
    library's rendering, as transformers' `apply_chat_template`), its variables (the special
    tokens), and the token ids that end a reply beyond the model's EOS (the template's
    end-of-turn token, as `matformer generate --chat` stops)."""

    template: str
    variables: dict[str, str]
    stop: frozenset[int] = frozenset()
    fallback: bool = False

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text; a template that refuses the messages (or fails on them) is a
        DataError naming why."""
        try:
            return render(self.template, check_messages(messages), add_generation_prompt=True,
                          **self.variables)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  (a template's own bug: a None concatenated, ...)
            raise DataError(f"the chat template failed on these messages: "
                            f"{type(e).__name__}: {e}") from None


@dataclass
class ServerState:
    """What the routes share: the engine and what requests are checked against."""

    engine: Engine
    catalog: Catalog
    tokenizer: Any
    chat: ServedChat
    metrics: Metrics
    api_key: str | None = None
    created: int = 0
    mailbox: Mailbox | None = None

    def mailbox_of(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        """The mailbox into `loop` (the server's one event loop)."""
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        return self.mailbox

    @property
    def context(self) -> int:
        return self.engine.model.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size


class ApiError(Exception):
    """A request the server refuses: status, message, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (status, message, param,
                                                                       code, type_)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


class Detokenizer:
    """Tokens to text deltas. Decodes the whole output each time and sends the new suffix; holds
    back a trailing partial UTF-8 character and any tail that could begin a stop string, and
    ends the text at the first stop string (which is not sent)."""

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tok = tokenizer
        self.stops = stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.text = text
        if self.stops:
            start = max(0, self.sent - max(len(s) for s in self.stops))
            hits = [i for s in self.stops if (i := text.find(s, start)) >= 0]
            if hits:
                end = max(min(hits), self.sent)
                delta, self.sent = text[self.sent:end], end
                self.text = text[:end]
                return delta, True
        if text.endswith("\ufffd"):
            return "", False
        upto = len(text) - self._held(text)
        if upto <= self.sent:
            return "", False
        delta, self.sent = text[self.sent:upto], upto
        return delta, False

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """What is left to send when the sequence ends without a stop string."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


@dataclass
class Choice:
    """One sequence of a request: its job, its text and how it ended."""

    index: int
    job: Job
    detok: Detokenizer
    finish: str | None = None
    text: str = ""


def _sampler(req: Sampling, index: int) -> Sampler:
    seed = None if req.seed is None else (req.seed + index) % 2**63
    return Sampler(req.temperature, req.top_k, req.top_p if req.top_p < 1 else None, seed)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application around a started-or-not engine (the lifespan starts and stops
    it)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine.thread is None:
            await asyncio.to_thread(state.engine.start)
        yield
        await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="matformer serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    metrics = state.metrics
    app.add_middleware(Guard, state=state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {msg}"),
                            status_code=exc.status_code)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.engine.closed:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.catalog.name,
                             "running": len(state.engine.running),
                             "waiting": len(state.engine.waiting)})

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list",
                             "data": [_model_entry(state, n) for n in state.catalog.listed()]})

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> JSONResponse:
        _resolve_width(state, model, None)
        return JSONResponse(_model_entry(state, model))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await request.body())
        width = _check(state, req)
        prompts = await asyncio.to_thread(_prompt_ids, state, req.prompt)  # a long one: ms
        limit = req.max_tokens if req.max_tokens is not None else 16
        _check_lengths(state, prompts, limit)
        return await _answer(state, request, req, width, prompts, limit, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatRequest, await request.body())
        width = _check(state, req)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        try:
            text = await asyncio.to_thread(state.chat.render, messages)
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        encoded = await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens=False)
        ids = encoded.ids
        if not ids:
            raise ApiError(400, "the messages render to an empty prompt", param="messages")
        limit = req.limit()
        if limit is None:
            limit = max(1, min(DEFAULT_CHAT_TOKENS, state.context - len(ids)))
        _check_lengths(state, [ids], limit)
        return await _answer(state, request, req, width, [ids], limit, chat=True,
                             stop=state.chat.stop)

    return app


_ENDPOINTS = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}


class Guard:
    """The API key, the body size limit and the request counter, as plain ASGI middleware (a
    `BaseHTTPMiddleware` would wrap every streamed chunk and hide a client's disconnect from
    `request.is_disconnected`)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Callable,
                       send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = scope["path"]
        status = [500]

        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            key = self.state.api_key
            if key is not None and path != "/health" and not _authorized(request, key):
                await ApiError(401, "a valid API key is required: send the header "
                                    "'Authorization: Bearer KEY'", code="invalid_api_key"
                               ).response()(scope, receive, counted)
            elif _body_too_large(request):
                await ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes"
                               ).response()(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            self.state.metrics.inc("requests_total",
                                   endpoint=path if path in _ENDPOINTS else "other",
                                   status=str(status[0]))


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _body_too_large(request: Request) -> bool:
    length = request.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES


def _model_entry(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "matformer"}


def _parse(kind: type[Sampling], body: bytes) -> Any:
    try:
        return kind.model_validate_json(body or b"null")
    except ValidationError as e:
        message, param = describe_validation(e)
        raise ApiError(400, message, param=param) from None


def _resolve_width(state: ServerState, model: str, width: Any) -> Width:
    try:
        return state.catalog.resolve(model, width)
    except LookupError as e:
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    except TierError as e:
        raise ApiError(400, f"unknown width: {e}", param="width" if width is not None
                       else "model", code="invalid_width") from None


def _check(state: ServerState, req: Sampling) -> Width:
    width = _resolve_width(state, req.model, req.width)
    bad = req.unsupported()
    if bad is not None:
        raise ApiError(400, bad[1], param=bad[0], code="unsupported_parameter")
    return width


def _prompt_ids(state: ServerState, prompt: Any) -> list[list[int]]:
    """The prompts of a completion request as token ids (strings tokenized here)."""
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise ApiError(400, "prompt is empty; give a string or token ids", param="prompt")
    out = []
    for p in prompts:
        ids = state.tokenizer.encode(p).ids if isinstance(p, str) else list(p)
        if not ids:
            raise ApiError(400, "a prompt is empty (after tokenization); give some text",
                           param="prompt")
        bad = next((t for t in ids if not 0 <= t < state.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt token id {bad} is outside the vocabulary of "
                                f"{state.vocab_size}", param="prompt")
        out.append(ids)
    return out


def _check_lengths(state: ServerState, prompts: list[list[int]], limit: int) -> None:
    for ids in prompts:
        if len(ids) + limit > state.context:
            room = state.context - len(ids)
            hint = f"ask for at most {room} tokens" if room > 0 else "shorten the prompt"
            raise ApiError(400, f"this model's context is {state.context} tokens; the prompt "
                                f"holds {len(ids)} and max_tokens asks for {limit} more ({hint})",
                           param="max_tokens", code="context_length_exceeded")


async def _answer(state: ServerState, request: Request, req: Sampling, width: Width,
                  prompts: list[list[int]], limit: int, *, chat: bool,
                  stop: frozenset[int] = frozenset()) -> Response:
    """Queue one job per sequence and answer: a stream or one JSON body."""
    if len(prompts) * req.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts x n={req.n} asks for more than "
                            f"{MAX_CHOICES} sequences", param="n")
    mailbox = state.mailbox_of(asyncio.get_running_loop())
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    eos = set() if req.ignore_eos else eos_set(state.engine.model, None) | stop
    stops = req.stops()
    choices: list[Choice] = []
    for i in range(len(prompts) * req.n):
        def emit(ev: Event, i: int = i) -> None:
            mailbox.post(queue, (i, ev))
        job = Job(prompts[i // req.n], limit, _sampler(req, i), eos, width, emit)
        choices.append(Choice(i, job, Detokenizer(state.tokenizer, stops)))
    try:
        for c in choices:
            state.engine.submit(c.job)
    except EngineBusy as e:
        _cancel(choices)
        raise ApiError(429, str(e), code="server_busy", type_="server_error") from None
    except EngineClosed as e:
        _cancel(choices)
        raise ApiError(503, str(e), code="shutting_down", type_="server_error") from None
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "created": int(time.time()), "model": req.model}
    prompt_tokens = sum(len(p) for p in prompts)
    if req.stream:
        return StreamingResponse(_stream(state, choices, queue, meta, prompt_tokens, chat,
                                         req.include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        await _gather(request, choices, queue)
    finally:
        _cancel(choices)
    errors = [c for c in choices if c.finish == "error"]
    if errors:
        closed = state.engine.closed
        raise ApiError(503 if closed else 500, errors[0].text, type_="server_error")
    body = {**meta, "object": "chat.completion" if chat else "text_completion",
            "choices": [_final_choice(c, chat) for c in choices],
            "usage": _usage(choices, prompt_tokens)}
    return JSONResponse(body)


def _cancel(choices: list[Choice]) -> None:
    for c in choices:
        c.job.cancel()


def _apply(choice: Choice, ev: Event) -> tuple[str, bool]:
    """Fold one event into its choice: (text delta, whether the choice just ended)."""
    if choice.finish is not None:
        return "", False
    if ev.kind == "token":
        delta, stopped = choice.detok.add(ev.token)
        choice.text += delta
        if stopped:
            choice.finish = "stop"
            choice.job.cancel()
            return delta, True
        return delta, False
    if ev.kind == "done":
        delta = choice.detok.flush()
        choice.text += delta
        choice.finish = ev.reason
        return delta, True
    choice.finish = "error"
    choice.text = ev.message
    return "", True


async def _gather(request: Request, choices: list[Choice],
                  queue: asyncio.Queue[tuple[int, Event]]) -> None:
    """Wait for every choice to end; give up (cancelling) when the client disconnects."""
    left = len(choices)
    checked = time.monotonic()
    while left:
        try:
            i, ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            ev = None
        if time.monotonic() - checked >= DISCONNECT_POLL_S:  # tokens may never pause
            checked = time.monotonic()
            if await request.is_disconnected():
                return
        if ev is not None:
            _, ended = _apply(choices[i], ev)
            left -= ended


def _final_choice(c: Choice, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish, "logprobs": None}
    return {"index": c.index, "text": c.text, "finish_reason": c.finish, "logprobs": None}


def _usage(choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
    widths: Counter = Counter()
    for c in choices:
        widths.update(c.job.widths_used)
    done = sum(len(c.job.tokens) for c in choices)
    spec = {"drafted": sum(c.job.drafted for c in choices),
            "accepted": sum(c.job.accepted for c in choices)}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done,
            "total_tokens": prompt_tokens + done, "widths": dict(widths), "speculative": spec}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(state: ServerState, choices: list[Choice],
                  queue: asyncio.Queue[tuple[int, Event]], meta: dict[str, Any],
                  prompt_tokens: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of a streamed request; closing it (the client went away)
    cancels the jobs left."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(c: Choice, delta: str | None, finish: str | None, width: str) -> str:
        if chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            entry = {"index": c.index, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            entry = {"index": c.index, "text": delta or "", "finish_reason": finish,
                     "logprobs": None}
        if width:
            entry["width"] = width
        return _sse({**meta, "object": kind, "choices": [entry]})

    try:
        if chat:
            for c in choices:
                yield _sse({**meta, "object": kind, "choices": [
                    {"index": c.index, "delta": {"role": "assistant", "content": ""},
                     "finish_reason": None, "logprobs": None}]})
        left = len(choices)
        last_width = {c.index: "" for c in choices}
        while left:
            # Every event waiting goes out in one write: a loop that fell behind catches up.
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            out = []
            for i, ev in batch:
                c = choices[i]
                if ev.kind == "token":
                    last_width[i] = ev.width
                delta, ended = _apply(c, ev)
                if c.finish == "error" and ended:
                    out.append(_sse(error_body(c.text, "server_error")))
                elif ended:
                    if delta:
                        out.append(chunk(c, delta, None, last_width[i]))
                    out.append(chunk(c, None, c.finish, last_width[i]))
                elif delta:
                    out.append(chunk(c, delta, None, ev.width))
                left -= ended
            if out:
                yield "".join(out)
        if include_usage:
            yield _sse({**meta, "object": kind, "choices": [],
                        "usage": _usage(choices, prompt_tokens)})
        yield "data: [DONE]\n\n"
    finally:
        _cancel(choices)
