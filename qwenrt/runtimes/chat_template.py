"""Render a conversation with the model's own chat template, once, for every engine.

Both engines get the same prompt text and so the same token ids; the template is
the one stored in the artifact (GGUF metadata or the OpenVINO tokenizer), rendered
the way transformers renders it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NotRequired, TypedDict

from qwenrt.errors import QwenrtError


class Message(TypedDict):
    role: str
    content: str
    # An assistant's calls: [{"type": "function", "function": {"name": ..., "arguments": {...}}}],
    # arguments as an object, as chat templates (and transformers) take them.
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]  # a tool message's answer to that call


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    """transformers' tojson for chat templates: plain JSON, keys in their order, nothing
    escaped for HTML (Jinja's own filter sorts keys and escapes <, > and &)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):  # noqa: ANN202 - a jinja2 Template
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise QwenrtError(f"the model's chat template does not compile ({exc})") from None


def render_chat(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The conversation as the template writes it; ``tools`` (OpenAI's tool objects) as
    transformers hands them to a template, which shows them to the model if it knows how."""
    from jinja2.exceptions import TemplateError

    if not template:
        raise QwenrtError("the model has no chat template; convert it again from a checkpoint that has one")
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         tools=list(tools) if tools else None)  # fmt: skip
    except TemplateError as exc:
        raise QwenrtError(f"the chat template refused the conversation ({exc})") from None


@lru_cache(maxsize=8)
def template_knows_tools(template: str) -> bool:
    """Whether the template shows tools to the model at all (Qwen2.5's does; plain ChatML does not)."""
    probe = [{"type": "function", "function": {"name": "qwenrt_probe_tool", "parameters": {"type": "object"}}}]
    return "qwenrt_probe_tool" in render_chat(template, [{"role": "user", "content": "x"}], tools=probe)
