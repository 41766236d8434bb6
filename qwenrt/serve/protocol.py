"""OpenAI's chat-completions wire format: requests checked and turned into qwenrt's
messages and generation settings, answers and stream chunks built from its events.

Nothing here knows about HTTP or engines, so every rule is testable on plain dicts.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from qwenrt.runtimes.base import GenerationConfig, StopReason, StreamEnd
from qwenrt.runtimes.chat_template import Message

ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # OpenAI's limit, kept so that clients meet the same rules everywhere
MAX_TEMPERATURE = 2.0
# OpenAI's default: a client that leaves temperature out samples, as it would there.
DEFAULT_TEMPERATURE = 1.0


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.kind, self.param, self.code)


_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "server_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[Message]
    max_tokens: int | None  # None: as many as the context window leaves room for, up to the server's limit
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    ignore_eos: bool = False

    def generation(self, max_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
        )


def parse_chat_request(body: Any, max_tokens_limit: int) -> ChatRequest:
    """Check a decoded JSON body; raise RequestError naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    # OpenAI's newer name wins; a null one (clients that send every field) leaves the older.
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(param)
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, param)
        if max_tokens < 1:
            raise RequestError(f"{param} must be at least 1, not {max_tokens}", param=param)
        if max_tokens > max_tokens_limit:
            raise RequestError(
                f"{param} is {max_tokens}, above this server's limit of {max_tokens_limit}",
                param=param,
                code="max_tokens_exceeded",
            )
    temperature = _number(_given(body, "temperature", DEFAULT_TEMPERATURE), "temperature")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            f"temperature must be between 0 and {MAX_TEMPERATURE:g}, not {temperature:g}", param="temperature"
        )
    top_p = _number(_given(body, "top_p", 1.0), "top_p")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be above 0 and at most 1, not {top_p:g}", param="top_p")
    seed = body.get("seed")
    if seed is not None:
        seed = _integer(seed, "seed")
        if not 0 <= seed < 2**32:
            raise RequestError("seed must be between 0 and 2**32 - 1", param="seed")
    n = _given(body, "n", 1)
    if n != 1:
        raise RequestError("only n=1 is supported: one answer per request", param="n")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if body.get(penalty) not in (None, 0, 0.0):
            raise RequestError(f"{penalty} is not supported; leave it out or set it to 0", param=penalty)
    stream = _flag(body, "stream")
    options = _given(body, "stream_options", {})
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    if options and not stream:
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(body.get("stop")),
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=_flag(body, "ignore_eos"),
    )


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list", param="messages")
    messages: list[Message] = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}", param=f"{where}.role")
        messages.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    if messages[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: there is nothing to answer", param="messages")
    return messages


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return _text(value, where)
    # The list form: text parts only, since the model reads no images or audio.
    if isinstance(value, list):
        parts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where} may hold text parts only", param=where)
            parts.append(_text(part["text"], f"{where}[{index}].text"))
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of text parts", param=where)


def _text(value: str, where: str) -> str:
    """Text that is Unicode: JSON's \\ud800 escapes can spell a lone surrogate, which no UTF-8
    (and so no tokenizer) can carry."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            f"{where} is not valid Unicode text: a lone surrogate (\\u{ord(value[exc.start]):04x}) at character "
            f"{exc.start}",
            param=where,
        ) from None
    return value


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop")
    return tuple(_text(s, "stop") for s in stops if s)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = _given(body, key, False)
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be true or false", param=key)
    return value


def _given(body: dict[str, Any], key: str, default: Any) -> Any:
    """A field's value, with JSON null meaning "not given" as OpenAI's clients send it."""
    value = body.get(key)
    return default if value is None else value


def _integer(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{param} must be an integer", param=param)
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{param} must be a number", param=param)
    return float(value)


# --- answers ------------------------------------------------------------------------
FINISH_REASONS: dict[StopReason, str] = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(end: StreamEnd) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.generated_tokens,
        "total_tokens": end.prompt_tokens + end.generated_tokens,
    }


def timings(end: StreamEnd, queued: float) -> dict[str, float | None]:
    """qwenrt's own field beside OpenAI's: what the request waited for and how fast it ran."""
    latency = end.first_token_latency
    speed = end.decode_tokens_per_second
    return {
        "queued_ms": round(queued * 1000, 1),
        "first_token_ms": None if latency is None else round(latency * 1000, 1),
        "decode_tokens_per_second": None if speed is None else round(speed, 2),
    }


def completion(completion_id: str, model: str, text: str, end: StreamEnd, queued: float) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": FINISH_REASONS[end.reason],
                "logprobs": None,
            }
        ],
        "usage": usage(end),
        "timings": timings(end, queued),
    }


def chunk(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, str],
    finish_reason: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        **(extra or {}),
    }


def usage_chunk(completion_id: str, model: str, created: int, end: StreamEnd) -> dict[str, Any]:
    """The extra last chunk OpenAI sends when the client asks for stream_options.include_usage."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(end),
    }
