"""Chat: a conversation rendered with the tokenizer's own chat template, and where a reply ends.

An instruction-tuned model answers well only when the prompt looks like its fine-tuning data:
the roles, markers and system prompt its chat template writes. `chat_prompt(tok, messages)`
renders the template the way transformers' `apply_chat_template` does (jinja2's sandbox with
`trim_blocks`, `lstrip_blocks`, loop controls, transformers' `tojson`, `raise_exception` and
`strftime_now`, the special tokens as variables, `add_generation_prompt=True`) and tokenizes the
text without adding special tokens (the template writes its own). The template comes with the
tokenizer's files (`data.tokenizer_files.chat_template`: chat_template.jinja or
tokenizer_config.json's `chat_template`; a GGUF source's `tokenizer.chat_template`).

Where a reply stops (`ChatPrompt.stop`): the template's end-of-turn token (found by rendering an
assistant turn and taking the first special token written after its text: `<|im_end|>` for
SmolLM2, `<|eot_id|>` for Llama 3), the tokenizer's EOS, generation_config.json's `eos_token_id`
(one or a list) and the model config's.

No torch here: `inference.text.generate_text(..., chat=True)` decodes with it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from matformer.data import tokenizer_files as TF
from matformer.errors import ConfigError, DataError

Message = dict[str, Any]
"""One turn: {"role": "system" | "user" | "assistant", "content": text}."""

_PROBE = "MATFORMER-END-OF-TURN-PROBE"


@dataclass
class ChatPrompt:
    """A conversation ready to decode after."""

    text: str
    """The rendered template (ending with the assistant's turn opened)."""
    ids: list[int]
    stop: list[int]
    """Token ids that end the reply (end-of-turn first)."""
    end_of_turn: int | None
    """The template's end-of-turn token id, if one was found."""


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled as transformers compiles it (sandboxed: templates come from files
    on the Hub, untrusted code)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError("chat templates need jinja2: pip install 'jinja2>=3.1'") from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it)
        renders its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the tokenizer's chat template does not compile: {e}") from None


def special_tokens(tok: Any) -> dict[str, str]:
    """The special tokens a template sees as variables (bos_token, eos_token, ...), by name."""
    cfg = TF.tokenizer_config(tok)
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def render(template: str, messages: Sequence[Message], *, add_generation_prompt: bool = True,
           **variables: Any) -> str:
    """`messages` through the jinja2 chat `template` (as transformers' apply_chat_template)."""
    compiled = _compiled(template)  # first: a missing jinja2 is a one-line error
    import jinja2

    try:
        return compiled.render(messages=[dict(m) for m in messages], tools=None,
                                          documents=None,
                                          add_generation_prompt=add_generation_prompt,
                                          **variables)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the tokenizer's chat template refused the conversation: {e}") from None


def end_of_turn(tok: Any, template: str) -> int | None:
    """The id of the special token the template writes right after an assistant's text, or None
    (found by rendering one probe turn: no table of model families)."""
    variables = special_tokens(tok)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render(template, msgs, add_generation_prompt=False, **variables)
    except DataError:
        return None
    at = text.find(_PROBE)
    if at < 0:
        return None
    rest = text[at + len(_PROBE):]
    best: tuple[int, int] | None = None
    for content, i in _special_added(tok):
        pos = rest.find(content)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, i)
    return None if best is None else best[1]


def _special_added(tok: Any) -> list[tuple[str, int]]:
    """(content, id) of the tokenizer's special added tokens."""
    obj = json.loads(tok.to_str())
    return [(t["content"], int(t["id"])) for t in obj.get("added_tokens") or []
            if t.get("special") and t.get("content")]


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """A list of {"role": str, "content": str} dicts, or a one-line DataError."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                m.get("content"), str):
            raise DataError(f"chat message {i} must be {{'role': str, 'content': str}}, got "
                            f"{str(m)[:80]!r}")
        out.append(dict(m))
    if not out:
        raise DataError("the conversation is empty; give at least one user message")
    return out


def chat_prompt(tok: Any, messages: Sequence[Message], *,
                config_eos: int | list[int] | None = None, where: str = "the checkpoint"
                ) -> ChatPrompt:
    """`messages` rendered with `tok`'s chat template and tokenized, with the ids that end the
    reply (see the module docstring). `where`: the checkpoint, for the error when the tokenizer
    has no chat template."""
    template = TF.chat_template(tok)
    if template is None:
        raise DataError(f"{where}: its tokenizer has no chat template (no chat_template in "
                        f"tokenizer_config.json, no chat_template.jinja); generate without "
                        f"--chat")
    text = render(template, check_messages(messages), add_generation_prompt=True,
                  **special_tokens(tok))
    ids = tok.encode(text, add_special_tokens=False).ids
    eot = end_of_turn(tok, template)
    stop = TF.stop_ids(tok, config_eos)
    if eot is not None:
        stop = [eot, *(s for s in stop if s != eot)]
    return ChatPrompt(text, ids, stop, eot)


def user_turn(text: str, system: str | None = None) -> list[Message]:
    """One user message (after a system message when `system` is given)."""
    msgs: list[Message] = [{"role": "system", "content": system}] if system is not None else []
    return [*msgs, {"role": "user", "content": text}]
