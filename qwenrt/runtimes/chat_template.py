"""Render a conversation with the model's own chat template, once, for every engine.

Both engines get the same prompt text and so the same token ids; the template is
the one stored in the artifact (GGUF metadata or the OpenVINO tokenizer), rendered
the way transformers renders it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TypedDict

from qwenrt.errors import QwenrtError


class Message(TypedDict):
    role: str
    content: str


@lru_cache(maxsize=8)
def _compile(template: str):  # noqa: ANN202 - a jinja2 Template
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as exc:
        raise QwenrtError(f"the model's chat template does not compile ({exc})") from None


def render_chat(template: str, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    from jinja2.exceptions import TemplateError

    if not template:
        raise QwenrtError("the model has no chat template; convert it again from a checkpoint that has one")
    try:
        return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise QwenrtError(f"the chat template refused the conversation ({exc})") from None
