"""OpenAI's chat-completions wire format: requests checked and turned into qwenrt's
messages and generation settings, answers and stream chunks built from its events.

Nothing here knows about HTTP or engines, so every rule is testable on plain dicts.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from qwenrt.runtimes.base import (
    MAX_ADDITIVE_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_TOP_LOGPROBS,
    GenerationConfig,
    StopReason,
    StreamEnd,
    TokenEvent,
)
from qwenrt.runtimes.chat_template import Message
from qwenrt.runtimes.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, json_schema_grammar, tool_call_grammar

ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4  # OpenAI's limit, kept so that clients meet the same rules everywhere
MAX_TEMPERATURE = 2.0
# OpenAI's default: a client that leaves temperature out samples, as it would there.
DEFAULT_TEMPERATURE = 1.0
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")
# A call as Qwen2.5 writes it (qwenrt.runtimes.grammar): the JSON between the tags.
_TOOL_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
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


# Every field a request may carry, and what this server does with it. A field that is not
# here is refused, by name: nothing a client sends is silently dropped. Fields marked
# "refused" are refused unless null or their "off" value; tests/test_serve.py walks the
# official openai package's request types against these tables.
HONOURED, REFUSED = "honoured", "refused"
# What chat and raw completions share: how the answer is sampled, streamed and labelled.
SAMPLING_FIELDS: dict[str, str] = {
    "model": HONOURED,  # any name: one model is served (GET /v1/models)
    "max_tokens": HONOURED,
    "temperature": HONOURED,
    "top_p": HONOURED,
    "stop": HONOURED,
    "seed": HONOURED,
    "n": HONOURED,  # 1 only: one answer per request
    "stream": HONOURED,
    "stream_options": HONOURED,  # include_usage
    "presence_penalty": HONOURED,
    "frequency_penalty": HONOURED,
    "user": HONOURED,  # a caller's label: written to the request's log line
    "logprobs": REFUSED,  # false (chat) or 0 (completions) is accepted
    "logit_bias": REFUSED,  # an empty map is accepted
    # qwenrt's own, as vLLM and llama.cpp's server name them
    "top_k": HONOURED,
    "repetition_penalty": HONOURED,
    "ignore_eos": HONOURED,
    "response_format": HONOURED,  # text, json_object, json_schema: enforced while decoding
}
CHAT_FIELDS: dict[str, str] = {
    **SAMPLING_FIELDS,
    "messages": HONOURED,
    "max_completion_tokens": HONOURED,
    "safety_identifier": HONOURED,  # like user
    "prompt_cache_key": HONOURED,  # a caching hint: the engine reuses any common prefix by itself
    "store": HONOURED,  # false only: nothing is stored
    "metadata": HONOURED,  # kept only with store, so: empty only
    "service_tier": HONOURED,  # "auto" or "default": the one tier there is
    "modalities": HONOURED,  # ["text"] only
    "prompt_cache_retention": HONOURED,  # "in_memory" only: the prefix cache lives in the engine's memory
    "tools": HONOURED,  # functions, shown to the model by its chat template
    "tool_choice": HONOURED,  # none, auto, required, or a named function
    "parallel_tool_calls": HONOURED,  # with required or a named function: one call, or several
    "functions": REFUSED,
    "function_call": REFUSED,
    "logprobs": HONOURED,  # each token's log-probability (the completions form is refused)
    "top_logprobs": HONOURED,  # up to 20 alternatives a token, with logprobs true
    "audio": REFUSED,
    "prediction": REFUSED,
    "reasoning_effort": REFUSED,  # the model does not reason apart from its answer
    "verbosity": REFUSED,
    "web_search_options": REFUSED,
    "moderation": REFUSED,
    "prompt_cache_options": REFUSED,
}
COMPLETION_FIELDS: dict[str, str] = {
    **SAMPLING_FIELDS,
    "prompt": HONOURED,  # a string, or token ids; one prompt per request
    "echo": HONOURED,  # the prompt's text ahead of the answer's
    "best_of": HONOURED,  # 1 only
    "suffix": REFUSED,  # text after the insertion: the model's chat template has no such turn
}
# The "off" value of each refused field, accepted as if left out.
_REFUSED_UNLESS = {"logprobs": (False, 0), "top_logprobs": (0,), "logit_bias": ({},), "functions": ([],),
                   "suffix": ("",)}  # fmt: skip
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# json_object: any JSON object, as OpenAI's JSON mode gives.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a setting out gets: the model's generation_config.json where it
    says (as transformers and vLLM apply it), OpenAI's defaults otherwise."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @classmethod
    def of_model(cls, generation_config: dict[str, Any]) -> SamplingDefaults:
        given = {}
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = generation_config.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                given[key] = value
        if "top_k" in given:
            given["top_k"] = int(given["top_k"])
        return cls(**given)

    def describe(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class Sampling:
    """What chat and raw completions share: how many tokens, how they are sampled, how they are sent."""

    max_tokens: int | None = None  # None: as many as the context window leaves room for, up to the server's limit
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: str | None = None  # the answer's grammar (a JSON schema's, or the tools')
    grammar_trigger: str | None = None  # the grammar holds from this text on (tool_choice auto)
    user: str | None = None
    logprobs: int | None = None  # alternatives a token, with each token's log-probability (None: none)

    def generation(self, max_tokens: int) -> GenerationConfig:
        return GenerationConfig(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            grammar=self.grammar,
            grammar_trigger=self.grammar_trigger,
            logprobs=self.logprobs,
        )


@dataclass(frozen=True)
class ChatRequest(Sampling):
    messages: list[Message] = field(default_factory=list)
    # The functions shown to the model (OpenAI's tool objects; None: none, or tool_choice none).
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class CompletionRequest(Sampling):
    prompt: str | list[int] = ""  # text (its control tokens' spellings read as such), or token ids
    echo: bool = False


def parse_chat_request(
    body: Any, max_tokens_limit: int, defaults: SamplingDefaults = SamplingDefaults()
) -> ChatRequest:
    """Check a decoded chat-completion body; raise RequestError naming the first field that is wrong."""
    body = _object(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    _only_the_one_thing_there_is(body)
    for name in ("safety_identifier", "prompt_cache_key"):
        _string(body, name)
    # OpenAI's newer name wins; a null one (clients that send every field) leaves the older.
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = _sampling(body, max_tokens_limit, defaults, tokens_field)
    if sampling.user is None and body.get("safety_identifier") is not None:
        sampling = replace(sampling, user=body["safety_identifier"])
    sampling = replace(sampling, logprobs=_logprobs(body))
    tools, calls_grammar, trigger = _tools(body)
    if calls_grammar is not None and trigger is None:
        if sampling.grammar is not None:
            raise RequestError("tool_choice required or a named function leaves no room for response_format",
                               param="tool_choice")  # fmt: skip
        sampling = replace(sampling, grammar=calls_grammar)
    elif calls_grammar is not None and sampling.grammar is None:
        # auto: free until the model opens a call, whose arguments then follow the parameters.
        # (With a response_format too, the answer is JSON and no call can be made.)
        sampling = replace(sampling, grammar=calls_grammar, grammar_trigger=trigger)
    return ChatRequest(**asdict(sampling), messages=messages, tools=tools)


def _logprobs(body: dict[str, Any]) -> int | None:
    """Chat's logprobs (true or false) and top_logprobs (0 to 20, with logprobs true)."""
    wanted = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    top = _integer(top, "top_logprobs")
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be 0 to {MAX_TOP_LOGPROBS}, not {top}", param="top_logprobs")
    if not wanted:
        if top:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        return None
    return top


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, str | None, str | None]:
    """The tools shown to the model, the grammar of their calls (None: free), and the text from
    which it holds (None: from the start; tool_choice auto has the model decide)."""
    tools = body.get("tools")
    choice = _given(body, "tool_choice", "auto" if tools else "none")
    parallel = _flag(body, "parallel_tool_calls", default=True)
    if tools is None or tools == []:
        if choice not in ("none", "auto"):
            raise RequestError("tool_choice needs tools to choose from", param="tool_choice")
        return None, None, None
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of function tools", param="tools")
    functions: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise RequestError(f"{where} must be a function tool: {{\"type\": \"function\", \"function\": {{...}}}}",
                               param=where)  # fmt: skip
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
            raise RequestError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'",
                               param=f"{where}.function.name")  # fmt: skip
        if name in functions:
            raise RequestError(f"{where}: a second function named {name}", param=f"{where}.function.name")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise RequestError(f"{where}.function.description must be a string", param=f"{where}.function.description")
        parameters = function.get("parameters")
        if parameters is not None:
            _check_schema(parameters, f"{where}.function.parameters")
        functions[name] = function
    if isinstance(choice, dict):
        function = choice.get("function")
        named = function.get("name") if choice.get("type") == "function" and isinstance(function, dict) else None
        if named not in functions:
            raise RequestError("tool_choice names no function of tools", param="tool_choice")
        return tools, _calls_grammar([functions[named]], parallel=False), None
    if choice not in TOOL_CHOICES:
        raise RequestError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named function",
                           param="tool_choice")  # fmt: skip
    if choice == "none":
        return None, None, None
    grammar = _calls_grammar(list(functions.values()), parallel)
    return tools, grammar, (None if choice == "required" else TOOL_CALL_OPEN)


def _calls_grammar(functions: list[dict[str, Any]], parallel: bool) -> str:
    try:
        return tool_call_grammar(functions, parallel)
    except Exception as exc:  # the converter raises plain exceptions of any kind
        raise RequestError(f"the tools' parameters cannot be made into a grammar: {exc}", param="tools") from None


def _check_schema(schema: Any, where: str) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise RequestError(f"{where} must be a JSON schema object", param=where)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise RequestError(f"{where} is not a valid JSON schema: {exc.message}", param=where) from None


def parse_completion_request(
    body: Any, max_tokens_limit: int, defaults: SamplingDefaults = SamplingDefaults()
) -> CompletionRequest:
    """Check a decoded raw-completion body (POST /v1/completions) the same way."""
    body = _object(body, COMPLETION_FIELDS)
    prompt = _prompt(body.get("prompt"))
    if _given(body, "best_of", 1) != 1:
        raise RequestError("only best_of=1 is supported: one answer per request", param="best_of")
    sampling = _sampling(body, max_tokens_limit, defaults, "max_tokens")
    return CompletionRequest(**asdict(sampling), prompt=prompt, echo=_flag(body, "echo"))


def parse_tokenize_request(body: Any) -> str | list[Message]:
    """POST /tokenize (vLLM's): a raw prompt, or chat messages; the model field is accepted."""
    body = _object(body, {"prompt": HONOURED, "messages": HONOURED, "model": HONOURED})
    _string(body, "model")
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise RequestError("send either prompt or messages", param="prompt")
    if body.get("prompt") is not None:
        if not isinstance(body["prompt"], str):
            raise RequestError("prompt must be a string", param="prompt")
        return _text(body["prompt"], "prompt")
    return _messages(body["messages"], answerable=False)


def parse_detokenize_request(body: Any) -> list[int]:
    """POST /detokenize (vLLM's): token ids."""
    body = _object(body, {"tokens": HONOURED, "model": HONOURED})
    _string(body, "model")
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise RequestError("tokens must be a list of token ids", param="tokens")
    return tokens


def _object(body: Any, fields: dict[str, str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _known_fields(body, fields)
    return body


def _sampling(body: dict[str, Any], max_tokens_limit: int, defaults: SamplingDefaults, tokens_field: str) -> Sampling:
    param = tokens_field
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
    temperature = _number(_given(body, "temperature", defaults.temperature), "temperature")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            f"temperature must be between 0 and {MAX_TEMPERATURE:g}, not {temperature:g}", param="temperature"
        )
    top_p = _number(_given(body, "top_p", defaults.top_p), "top_p")
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
    top_k = _integer(_given(body, "top_k", defaults.top_k), "top_k")
    if top_k < 0:
        raise RequestError(f"top_k must be 0 (off) or more, not {top_k}", param="top_k")
    penalties = {name: _number(_given(body, name, getattr(defaults, name)), name)
                 for name in ("repetition_penalty", "presence_penalty", "frequency_penalty")}  # fmt: skip
    if not 0 < penalties["repetition_penalty"] <= MAX_REPETITION_PENALTY:
        raise RequestError(f"repetition_penalty must be above 0 and at most {MAX_REPETITION_PENALTY:g}",
                           param="repetition_penalty")  # fmt: skip
    for name in ("presence_penalty", "frequency_penalty"):
        if not -MAX_ADDITIVE_PENALTY <= penalties[name] <= MAX_ADDITIVE_PENALTY:
            raise RequestError(f"{name} must be between {-MAX_ADDITIVE_PENALTY:g} and {MAX_ADDITIVE_PENALTY:g}",
                               param=name)  # fmt: skip
    for name in ("model", "user"):
        _string(body, name)
    stream = _flag(body, "stream")
    options = _given(body, "stream_options", {})
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", param="stream_options")
    if options and not stream:
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(body.get("stop")),
        seed=seed,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        ignore_eos=_flag(body, "ignore_eos"),
        top_k=top_k,
        grammar=_response_format(body.get("response_format")),
        user=body.get("user"),
        **penalties,
    )


def _string(body: dict[str, Any], name: str) -> None:
    if body.get(name) is not None and not isinstance(body[name], str):
        raise RequestError(f"{name} must be a string", param=name)


def _prompt(value: Any) -> str | list[int]:
    """One prompt: text, or token ids; a list of one of either is that one (OpenAI's batch form)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise RequestError("prompt must not be empty", param="prompt")
        return _text(value, "prompt")
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise RequestError("one prompt per request: send the others as requests of their own", param="prompt")
    raise RequestError("prompt must be a string or a list of token ids", param="prompt")


def _known_fields(body: dict[str, Any], fields: dict[str, str]) -> None:
    for name in body:
        if name not in fields:
            raise RequestError(f"{name} is not a field this server knows; leave it out", param=name,
                               code="unknown_field")  # fmt: skip
        if fields[name] == REFUSED and body[name] is not None and body[name] not in _REFUSED_UNLESS.get(name, ()):
            raise RequestError(f"{name} is not supported by this server; leave it out", param=name,
                               code="unsupported_field")  # fmt: skip


def _only_the_one_thing_there_is(body: dict[str, Any]) -> None:
    """Fields whose only value here is the one thing the server does (one tier, text only, no
    storing): that value is accepted, anything else refused by name."""
    allowed: dict[str, tuple[Any, ...]] = {
        "store": (False,),
        "metadata": ({},),
        "service_tier": ("auto", "default"),
        "modalities": (["text"],),
        "prompt_cache_retention": ("in_memory",),
    }
    for name, values in allowed.items():
        if body.get(name) is not None and body[name] not in values:
            shown = " or ".join(json.dumps(v) for v in values)
            raise RequestError(f"{name} may only be {shown} on this server", param=name, code="unsupported_value")


def _response_format(value: Any) -> str | None:
    """The grammar of the JSON the answer must be (None: free text)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise RequestError(f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}",
                           param="response_format")  # fmt: skip
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(JSON_OBJECT_SCHEMA)
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise RequestError(f"{where} must be an object with a name and a schema", param=where)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise RequestError(f"{where}.name must be 1-64 letters, digits, '_' or '-'", param=f"{where}.name")
    schema = spec.get("schema", {})  # OpenAI: no schema is any JSON object... of any shape
    _check_schema(schema, f"{where}.schema")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise RequestError(f"{where}.strict must be true or false", param=f"{where}.strict")
    # strict or not, the schema is enforced while decoding: a small model needs it to give valid JSON.
    try:
        return json_schema_grammar(json.dumps(schema, ensure_ascii=False))  # the properties in their order
    except Exception as exc:  # the converter raises plain exceptions of any kind
        raise RequestError(f"{where}.schema cannot be made into a grammar: {exc}", param=f"{where}.schema") from None


def _messages(value: Any, answerable: bool = True) -> list[Message]:
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
        calls = message.get("tool_calls") if role == "assistant" else None
        # An assistant turn of calls only may have no content (OpenAI sends null).
        content = "" if calls and message.get("content") is None else message.get("content")
        parsed: Message = {"role": role, "content": _content(content, f"{where}.content")}
        if calls:
            parsed["tool_calls"] = _message_calls(calls, f"{where}.tool_calls")
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise RequestError(f"{where}.tool_call_id must name the call this answers",
                                   param=f"{where}.tool_call_id")  # fmt: skip
            parsed["tool_call_id"] = message["tool_call_id"]
        messages.append(parsed)
    if answerable and messages[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: there is nothing to answer", param="messages")
    return messages


def _message_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier calls, their arguments as objects: chat templates write them out
    (as transformers hands them over), where OpenAI sends them as JSON text."""
    if not isinstance(calls, list):
        raise RequestError(f"{where} must be a list of calls", param=where)
    parsed = []
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestError(f"{at} must be a function call with a name", param=at)
        arguments = function.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise RequestError(f"{at}.function.arguments is not JSON", param=f"{at}.function.arguments") from None
        if not isinstance(arguments, dict):
            raise RequestError(f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments")
        parsed.append({"id": call.get("id"), "type": "function",
                       "function": {"name": function["name"], "arguments": arguments}})  # fmt: skip
    return parsed


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


def _flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = _given(body, key, default)
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


class ChatAnswer:
    """An answer in chat-completion form: a message, or a role chunk, deltas and a finish chunk.

    Where tools were offered, the model's calls (as Qwen2.5 writes them, between tool_call
    tags) become OpenAI's ``tool_calls``: a stream holds back text that may be the start of
    a call, and sends the calls, whole, before its finish chunk.

    With ``token_bytes`` (the engine's), each token's log-probabilities go out in OpenAI's
    form, in the chunk that carries the token's text (or the next one, for text held back)."""

    prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, echo: str = "", tools_offered: bool = False,
                 token_bytes: Callable[[int], bytes] | None = None) -> None:  # fmt: skip
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.model = model
        self.created = int(time.time())
        self.echo = echo  # text shown ahead of the answer's own (raw completions' echo)
        self.tools_offered = tools_offered
        self._text = ""  # with tools offered: the answer so far, and how much of it has gone out
        self._sent = 0
        self._token_bytes = token_bytes
        self._logprobs: list[dict[str, Any]] = []  # every token's, for a whole answer
        self._unsent_logprobs: list[dict[str, Any]] = []

    def feed(self, event: TokenEvent) -> list[dict[str, Any]]:
        """The chunks for the next token of the answer."""
        self.note(event)
        if not self.tools_offered:
            return self._with_logprobs([self.piece(event.text)] if event.text else [])
        self._text += event.text
        safe = _before_a_possible_call(self._text, self._sent)
        out, self._sent = self._text[self._sent : safe], safe
        return self._with_logprobs([self.piece(out)] if out else [])

    def finish(self, finish_reason: str, extra: dict[str, Any]) -> list[dict[str, Any]]:
        """The last chunks: text held back, the calls, and the finish chunk."""
        chunks = []
        if self.tools_offered:
            content, calls = split_tool_calls(self._text[self._sent :])
            if content:
                chunks.append(self.piece(content))
            for index, call in enumerate(calls):
                chunks.append(self._chunk({"delta": {"tool_calls": [{"index": index, **call}]}, "finish_reason": None}))
            finish_reason = "tool_calls" if calls else finish_reason
        return self._with_logprobs([*chunks, self.closing(finish_reason, extra)])

    def note(self, event: TokenEvent) -> None:
        """Keep a token's log-probabilities (a whole answer's need no chunks)."""
        if event.logprobs is None or self._token_bytes is None or not (spelled := self._token_bytes(event.token_id)):
            return  # none asked for; or a token without text (the end of the answer)
        entry = {**self._entry(spelled, event.logprobs.logprob),
                 "top_logprobs": [self._entry(self._token_bytes(t), lp) for t, lp in event.logprobs.top]}  # fmt: skip
        self._logprobs.append(entry)
        self._unsent_logprobs.append(entry)

    @staticmethod
    def _entry(spelled: bytes, logprob: float) -> dict[str, Any]:
        return {"token": spelled.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(spelled)}

    def _with_logprobs(self, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if chunks and self._unsent_logprobs:
            chunks[0]["choices"][0]["logprobs"] = {"content": self._unsent_logprobs}
            self._unsent_logprobs = []
        return chunks

    def _chunk(self, choice: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice, "logprobs": None}], **(extra or {})}  # fmt: skip

    def opening(self) -> dict[str, Any] | None:
        return self._chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"delta": {"content": text}, "finish_reason": None})

    def closing(self, finish_reason: str, extra: dict[str, Any]) -> dict[str, Any]:
        return self._chunk({"delta": {}, "finish_reason": finish_reason}, extra)

    def usage_chunk(self, end: StreamEnd) -> dict[str, Any]:
        """The extra last chunk OpenAI sends when the client asks for stream_options.include_usage."""
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage(end)}  # fmt: skip

    def _choice(self, text: str) -> dict[str, Any]:
        if self.tools_offered and (split := split_tool_calls(text))[1]:
            content, calls = split
            return {"message": {"role": "assistant", "content": content or None, "tool_calls": calls}}
        return {"message": {"role": "assistant", "content": text}}

    def whole(self, text: str, end: StreamEnd, queued: float) -> dict[str, Any]:
        logprobs = {"content": self._logprobs} if self._token_bytes is not None else None
        choice = {"index": 0, **self._choice(self.echo + text), "finish_reason": FINISH_REASONS[end.reason],
                  "logprobs": logprobs}  # fmt: skip
        if "tool_calls" in choice.get("message", {}):
            choice["finish_reason"] = "tool_calls"
        return {"id": self.id, "object": self.whole_object, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(end), "timings": timings(end, queued)}  # fmt: skip


class TextAnswer(ChatAnswer):
    """An answer in raw-completion form (POST /v1/completions): text, and text pieces."""

    prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def opening(self) -> dict[str, Any] | None:
        return self.piece(self.echo) if self.echo else None

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"text": text, "finish_reason": None})

    def closing(self, finish_reason: str, extra: dict[str, Any]) -> dict[str, Any]:
        return self._chunk({"text": "", "finish_reason": finish_reason}, extra)

    def _choice(self, text: str) -> dict[str, Any]:
        return {"text": text}


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The text outside the calls, and the calls in OpenAI's form (arguments as JSON text). A
    block whose JSON is not a call with a name and object arguments stays text."""
    calls, kept, position = [], [], 0
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        if not isinstance(arguments := call.get("arguments"), dict):
            continue
        kept.append(text[position : match.start()])
        position = match.end()
        function = {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function})
    kept.append(text[position:])
    return "".join(kept).strip() if calls else text, calls


def _before_a_possible_call(text: str, sent: int) -> int:
    """How far ``text`` may go out: up to a call's opening tag, or to an ending that may begin one."""
    at = text.find(TOOL_CALL_OPEN, sent)
    if at >= 0:
        return at
    for length in range(min(len(TOOL_CALL_OPEN) - 1, len(text) - sent), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-length:]):
            return len(text) - length
    return len(text)


def error_reference() -> str:
    """The reference a 500 carries, for the server's log line to be found by."""
    return f"error-{uuid.uuid4().hex[:24]}"
