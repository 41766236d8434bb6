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

# The converter's rule for a character of a JSON string, and llama.cpp's, without control characters.
_CHAR_RULE = 'char ::= [^"\\\\] |'
_JSON_CHAR_RULE = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


@functools.lru_cache(maxsize=64)
def json_schema_grammar(json_schema: str) -> str:
    """The GBNF grammar of a JSON schema (as JSON text); made once per schema, as a server sees
    the same few again and again. Raises whatever the converter raises for a schema it cannot take."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json_schema).replace(_CHAR_RULE, _JSON_CHAR_RULE)
