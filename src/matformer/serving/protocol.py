"""The request bodies the server accepts, with their types checked strictly, and OpenAI's error
shape.

The fields are OpenAI's (`/v1/completions`, `/v1/chat/completions`) plus three extras a client
sends in `extra_body`: `width` (the width to run at, see `catalog`), `top_k` and `ignore_eos`.
Types are strict (a string where a number belongs is an error, not converted); unknown fields
are ignored, as other OpenAI-compatible servers do. A parameter the server cannot honour
(`logprobs`, `echo`, penalties, `logit_bias`, `suffix`, `best_of` > 1) is refused by name rather
than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_CHOICES = 16
"""Most sequences one request may ask for (prompts x n)."""

MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Request bodies larger than this are refused (413) before they are read."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, max_length=1024)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None
    # extras (extra_body)
    width: str | int | list[int] | None = None
    top_k: int | None = Field(None, ge=1)
    ignore_eos: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a parameter set to something the server does not do."""
        if len(self.stops()) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in self.stops()):
            return "stop", f"stop takes at most {MAX_STOPS} strings of {MAX_STOP_CHARS} characters"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name, f"{name} is not supported by this server; leave it at 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        if self.logprobs not in (None, False, 0):
            return "logprobs", "logprobs are not supported by this server"
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported by this server; use n"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def describe_validation(e: ValidationError) -> tuple[str, str | None]:
    """(one-line message, the parameter) of a pydantic error: the first problem found."""
    err = e.errors()[0]
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('msg')}); send a JSON object", None
    # a union reports the branch tried ('str', 'list[int]', ...): keep field names and indices
    loc = [str(x) for x in err.get("loc", ())
           if not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x))]
    field = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    got = err.get("input")
    shown = repr(got)[:80] if err.get("type") != "missing" else "nothing"
    return f"{where}: {err.get('msg')} (got {shown})", field
