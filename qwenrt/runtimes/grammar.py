"""One grammar for an answer held to a JSON schema, the same on every engine.

llama-cpp-python's converter (a port of llama.cpp's ``json_schema_to_grammar``) writes the
schema as a GBNF grammar; llama.cpp samples under it, and OpenVINO GenAI's XGrammar reads
the same text as its EBNF. One grammar gives both engines the same constraint, whitespace
included: the converter allows at most one space between tokens, where GenAI's own JSON-schema
mode allows any run of whitespace, in which a weak model can spend its whole budget
(measured on the tiny test model: 64 tokens of tabs and newlines, never a value).

One correction: the converter in llama-cpp-python 0.3.36 lets a string hold raw control
characters, which JSON forbids (a parser refuses the answer); llama.cpp's own converter
excludes them (``[^"\\\x7f\x00-\x1f]``, common/json-schema-to-grammar.cpp), and so does qwenrt.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

# The converter's rule for a character of a JSON string, and llama.cpp's, without control characters.
_CHAR_RULE = 'char ::= [^"\\\\] |'
_JSON_CHAR_RULE = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'
# A string as the converter writes it, and the same language right-recursive.
_STRING_RULE = 'string ::= "\\"" char* "\\"" space'
_RECURSIVE_STRING_RULE = 'string ::= "\\"" string-tail\nstring-tail ::= "\\"" space | char string-tail'


@functools.lru_cache(maxsize=64)
def json_schema_grammar(json_schema: str) -> str:
    """The GBNF grammar of a JSON schema (as JSON text); made once per schema, as a server sees
    the same few again and again. Raises whatever the converter raises for a schema it cannot take."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    grammar = json_schema_to_gbnf(json_schema)
    return grammar.replace(_CHAR_RULE, _JSON_CHAR_RULE).replace(_STRING_RULE, _RECURSIVE_STRING_RULE)


# How Qwen2.5's chat template writes a call (and its system prompt asks the model to).
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tool_call_grammar(functions: Sequence[dict[str, Any]], parallel: bool) -> str:
    """An answer of tool calls only, as Qwen2.5 writes them: ``<tool_call>``, a line of
    ``{"name": NAME, "arguments": ARGUMENTS}``, ``</tool_call>``, with ARGUMENTS held to that
    function's parameters (OpenAI's function objects: name, parameters). More than one call,
    a line apart, when ``parallel``. Its root is the opening tag and one rule, so that it
    also serves from that tag on (``after_literal``), as a lazy grammar."""
    calls = {"anyOf": [{"type": "object",
                        "properties": {"name": {"const": function["name"]},
                                       "arguments": function.get("parameters") or {"type": "object"}},
                        "required": ["name", "arguments"], "additionalProperties": False}
                       for function in functions]}  # fmt: skip
    # The schema's root becomes one rule of the whole; the converter names no other rule "root".
    call_json = re.sub(r"^root ::=", "qwenrt-call ::=", json_schema_grammar(json.dumps(calls)), count=1,
                       flags=re.MULTILINE)  # fmt: skip
    rest = f'"\\n" qwenrt-call "\\n{TOOL_CALL_CLOSE}"'
    if parallel:
        rest += f' ("\\n{TOOL_CALL_OPEN}\\n" qwenrt-call "\\n{TOOL_CALL_CLOSE}")*'
    return f"root ::= {_literal(TOOL_CALL_OPEN)} qwenrt-calls\nqwenrt-calls ::= {rest}\n{call_json}"


def after_literal(grammar: str, literal: str) -> str:
    """The grammar of what follows ``literal``, for a grammar whose root is that literal and one
    rule (tool_call_grammar's): engines that begin a grammar after its trigger (GenAI's triggered
    tags) take this one."""
    root, _, rules = grammar.partition("\n")
    head = f"root ::= {_literal(literal)} "
    if not root.startswith(head) or not re.fullmatch(r"[A-Za-z0-9-]+", root[len(head) :]):
        raise ValueError(f"the grammar's root is not {_literal(literal)} and one rule")
    return f"root ::= {root[len(head) :]}\n{rules}"


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
