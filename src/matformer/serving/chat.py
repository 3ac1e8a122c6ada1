"""Chat messages to prompt text with the tokenizer's chat template, rendered as transformers'
`apply_chat_template` renders it (without importing transformers at serve time).

The template is the checkpoint's: `chat_template.jinja` beside the tokenizer, else the
`chat_template` entry of `tokenizer_config.json` (a string, or a list of named templates whose
`default` is used). The environment is the one transformers builds: a sandboxed, immutable
Jinja environment with `trim_blocks`/`lstrip_blocks`, the loop-controls extension,
`raise_exception`, `strftime_now` and a `tojson` that does not escape HTML; the special tokens of
`tokenizer_config.json` (`bos_token`, `eos_token`, ...) are passed as variables.

A checkpoint without a template (what `matformer train` writes) is rendered with `CHATML`, the
ChatML layout llama.cpp also falls back to; the server says so in its start-up line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from matformer.errors import DataError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""The fallback template (ChatML) for checkpoints that carry none."""

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                      "cls_token", "mask_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], *,
                 fallback: bool = False) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            from jinja2.exceptions import TemplateError

            raise TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.template = env.from_string(source)
        self.special_tokens = dict(special_tokens)
        self.fallback = fallback

    def render(self, messages: Sequence[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{role, content}, ...]). A template that refuses
        them (`raise_exception`) is a DataError carrying its message."""
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=[dict(m) for m in messages], tools=None,
                                        documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except TemplateError as e:
            raise DataError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # a template's own bug (a None concatenated, ...)
            raise DataError(f"the chat template failed on these messages: "
                            f"{type(e).__name__}: {e}") from None


def load_chat_template(folder: str | Path) -> ChatTemplate:
    """The chat template of the tokenizer in `folder` (or the ChatML fallback)."""
    folder = Path(folder)
    config: dict[str, Any] = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{config_path}: not readable JSON ({e}); fix or remove it") from None
    specials = {k: t for k in SPECIAL_TOKEN_KEYS
                if (t := _token_text(config.get(k))) is not None}
    jinja = folder / "chat_template.jinja"
    source: Any = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get(
        "chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return ChatTemplate(CHATML, specials, fallback=True)
    try:
        return ChatTemplate(source, specials)
    except Exception as e:  # jinja2's TemplateSyntaxError and kin
        raise DataError(f"{folder}: the tokenizer's chat template does not compile: "
                        f"{type(e).__name__}: {e}") from None
