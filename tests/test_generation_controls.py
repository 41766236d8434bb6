"""Penalties and JSON-schema answers on every engine that declares them, on real engines.

Penalties are checked against their definition (qwenrt.runtimes.penalties) applied by hand,
step by step, to the engine's own logits: both engines then mean the same by the same
request. Schema answers are checked by parsing and validating them; the tiny model's
weights are random, so only the grammar can make them valid.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from conftest import ENGINES
from helpers import LOGPROB_TOLERANCE, logprob_deviation, scored_tokens

from qwenrt.errors import QwenrtError
from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, TokenEvent, engine_class, open_engine
from qwenrt.runtimes.base import MAX_TOP_LOGPROBS
from qwenrt.runtimes.grammar import after_literal, json_schema_grammar
from qwenrt.runtimes.penalties import apply_penalties

PENALISING = [name for name in ENGINES if engine_class(name).applies_penalties]
SCHEMA_FOLLOWING = [name for name in ENGINES if engine_class(name).follows_grammar]
LOGPROB_ENGINES = [name for name in ENGINES if engine_class(name).top_logprobs]
# A prompt the tiny test model answers by repeating tokens (greedy: one token four times over, another
# three times, on both engines).
REPEATING = [{"role": "user", "content": "the the the the"}]
VERDICT = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "sure": {"type": "boolean"},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
    },
    "required": ["answer", "sure", "colour"],
    "additionalProperties": False,
}
VERDICT_GRAMMAR = json_schema_grammar(json.dumps(VERDICT))


def test_penalties_as_defined_by_hand() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.5, 3.0], dtype=np.float32)
    prompt, answer = [0, 1], [2, 2, 3, 4]
    out = apply_penalties(logits.copy(), prompt, answer, repetition=2.0)
    # every token of the prompt or the answer: positive logits halved, negative ones doubled; token 5 untouched
    np.testing.assert_allclose(out, [1.0, -4.0, 0.5, -2.0, 0.25, 3.0])
    out = apply_penalties(logits.copy(), prompt, answer, presence=0.3, frequency=0.4)
    # the answer's tokens only (2 twice, 3 and 4 once): presence, then frequency x count, each towards lower
    # logits when the logit is 0 or more at that point, the other way when below: 0.5 - 0.3 = 0.2, then
    # 0.2 - 0.4 = -0.2; 1.0 - 0.3 - 0.8 = -0.1; -1.0 + 0.3 + 0.4 = -0.3
    np.testing.assert_allclose(out, [2.0, -2.0, -0.1, -0.3, 0.2 - 0.4, 3.0], rtol=1e-6)
    assert apply_penalties(logits.copy(), prompt, [], presence=1.0, frequency=1.0).tolist() == logits.tolist()


def greedy_ids(engine, messages: list[dict[str, str]], config: GenerationConfig) -> list[int]:
    return [e.token_id for e in engine.stream_chat(messages, config) if isinstance(e, TokenEvent) and e.token_id >= 0]


def by_hand(logit_engine, prompt: list[int], tokens: int, **penalties: float) -> list[int]:
    """Greedy decoding with the penalties' definition applied to the engine's own logits, step by step."""
    answer: list[int] = []
    for _ in range(tokens):
        logits = logit_engine.window_logits(prompt + answer)[-1].astype(np.float64)
        answer.append(int(np.argmax(apply_penalties(logits, prompt, answer, **penalties))))
    return answer


@pytest.mark.parametrize("name", PENALISING)
@pytest.mark.parametrize(
    "penalties",
    [{"repetition": 1.5}, {"presence": 1.5}, {"frequency": 0.7},
     {"repetition": 1.3, "presence": 0.5, "frequency": 0.3}],
    ids=["repetition", "presence", "frequency", "all three"],
)  # fmt: skip
def test_penalised_greedy_answer_is_the_definition_applied_to_the_engine_s_logits(
    name: str, penalties: dict[str, float], engines: dict, logit_engines: dict
) -> None:
    engine = engines[name]
    prompt = engine.chat_prompt_ids(REPEATING)
    plain = greedy_ids(engine, REPEATING, GenerationConfig(max_tokens=16, ignore_eos=True))
    assert most_repeats(plain) >= 3, plain
    config = GenerationConfig(max_tokens=16, ignore_eos=True, repetition_penalty=penalties.get("repetition", 1.0),
                              presence_penalty=penalties.get("presence", 0.0),
                              frequency_penalty=penalties.get("frequency", 0.0))  # fmt: skip
    penalised = greedy_ids(engine, REPEATING, config)
    assert penalised == by_hand(logit_engines[name], prompt, 16, **penalties)
    assert most_repeats(penalised) < most_repeats(plain), (penalised, plain)  # it repeats itself less


def most_repeats(ids: list[int]) -> int:
    return max(Counter(ids).values())


@pytest.mark.parametrize("name", SCHEMA_FOLLOWING)
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_answer_follows_the_json_schema(name: str, temperature: float, engines: dict) -> None:
    engine = engines[name]
    for seed in range(3 if temperature else 1):
        config = GenerationConfig(max_tokens=64, temperature=temperature, seed=seed, grammar=VERDICT_GRAMMAR)
        events = list(engine.stream_chat(REPEATING, config))
        end = events[-1]
        assert isinstance(end, StreamEnd) and end.reason == "eos", end  # the grammar ends the answer
        jsonschema.validate(json.loads(end.text), VERDICT)


@pytest.mark.parametrize("name", SCHEMA_FOLLOWING)
def test_json_object_answer_is_an_object(name: str, engines: dict) -> None:
    config = GenerationConfig(max_tokens=200, grammar=json_schema_grammar('{"type": "object"}'))
    end = list(engines[name].stream_chat(REPEATING, config))[-1]
    assert end.text.lstrip().startswith("{"), end.text
    if end.reason == "eos":  # within the budget: whole, and an object
        assert isinstance(json.loads(end.text), dict)


@pytest.mark.parametrize("name", LOGPROB_ENGINES)
@pytest.mark.parametrize(
    "config",
    [GenerationConfig(max_tokens=12, ignore_eos=True, logprobs=MAX_TOP_LOGPROBS, repetition_penalty=1.5),
     GenerationConfig(max_tokens=12, ignore_eos=True, logprobs=0, temperature=1.5, seed=3),
     GenerationConfig(max_tokens=12, ignore_eos=True, logprobs=3, grammar=VERDICT_GRAMMAR)],
    ids=["greedy penalised, 20 alternatives", "sampled, none", "grammar, 3"],
)  # fmt: skip
def test_logprobs_are_the_engine_s_own_distribution(
    name: str, config: GenerationConfig, engines: dict, logit_engines: dict
) -> None:
    """Each token's log-probability and the most likely alternatives, against log-softmax of the same
    engine's logits computed apart (window_logits): the model's own distribution, whatever the
    penalties, the temperature or a grammar made of it. On OpenVINO they come from its scorer."""
    engine = engines[name]
    prompt = engine.chat_prompt_ids(REPEATING)
    tokens = scored_tokens(engine.stream(prompt, config))
    assert len(tokens) == config.max_tokens
    deviation = logprob_deviation(tokens, logit_engines[name], prompt, config.logprobs)
    print(f"\n{name}: log-probabilities within {deviation:.1e} of the whole-sequence logits'")
    assert deviation <= LOGPROB_TOLERANCE
    plain = engine.stream(prompt, replace(config, logprobs=None))
    assert all(e.logprobs is None for e in plain if isinstance(e, TokenEvent))


def test_openvino_compiles_its_scorer_at_the_first_request_for_logprobs_and_frees_it_on_close(tiny_model: Path) -> None:
    """The scorer's second copy of the weights is paid for only once log-probabilities are asked for."""
    engine = open_engine("openvino", tiny_model, EngineOptions(threads=1, prefix_cache=False))
    prompt = engine.chat_prompt_ids(REPEATING)
    list(engine.stream(prompt, GenerationConfig(max_tokens=3)))
    assert engine._scorer is None
    list(engine.stream(prompt, GenerationConfig(max_tokens=3, logprobs=1)))
    assert engine._scorer is not None
    engine.close()
    assert engine._scorer is None


def test_an_engine_without_a_control_refuses_it_before_any_work() -> None:
    transformers = engine_class("transformers")
    assert transformers.cannot_do(GenerationConfig(repetition_penalty=1.1))[0] == "penalties"
    assert transformers.cannot_do(GenerationConfig(grammar='root ::= "a"'))[0] == "grammar"
    assert transformers.cannot_do(GenerationConfig(logprobs=0))[0] == "logprobs"
    assert transformers.cannot_do(GenerationConfig()) is None


def test_a_schema_that_makes_no_grammar_is_refused() -> None:
    with pytest.raises(Exception, match="nowhere"):
        json_schema_grammar(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}))


def test_both_engines_hold_the_answer_to_the_same_grammar(engines: dict) -> None:
    """One grammar for every engine: on the same logits' best tokens they write the same JSON."""
    config = GenerationConfig(max_tokens=64, grammar=VERDICT_GRAMMAR)
    answers = {name: list(engines[name].stream_chat(REPEATING, config))[-1].text for name in SCHEMA_FOLLOWING}
    assert len(set(answers.values())) == 1, answers


@pytest.mark.parametrize("setting", [{"repetition_penalty": 0}, {"presence_penalty": 2.5}, {"frequency_penalty": -3}])
def test_generation_config_refuses_penalties_out_of_range(setting: dict) -> None:
    with pytest.raises(QwenrtError, match="penalty"):
        GenerationConfig(**setting)


def test_json_strings_hold_no_raw_control_characters() -> None:
    """JSON forbids them in strings; llama-cpp-python 0.3.36's converter let them through."""
    char = next(line for line in json_schema_grammar('{"type": "object"}').splitlines() if line.startswith("char ::="))
    assert char.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F] |'), char


# --- the demo model -----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "languages": {"type": "array", "items": {"type": "string"}},
        "remote": {"type": "boolean"},
    },
    "required": ["name", "age", "languages", "remote"],
    "additionalProperties": False,
}
EXTRACT = [{"role": "user", "content": "Extract the person as JSON: Lena Park, 34, writes Rust and Go, and works "
                                      "from home in Busan."}]  # fmt: skip


@pytest.mark.real_weights
@pytest.mark.parametrize("name", SCHEMA_FOLLOWING)
def test_demo_model_extracts_json_that_follows_the_schema(name: str, demo_model: Path) -> None:
    with open_engine(name, demo_model, EngineOptions(threads=1)) as engine:
        config = GenerationConfig(max_tokens=80, grammar=json_schema_grammar(json.dumps(PERSON)))
        end = list(engine.stream_chat(EXTRACT, config))[-1]
    print(f"\n--- {name}: {end.text}")
    person = json.loads(end.text)
    jsonschema.validate(person, PERSON)
    assert person["name"] == "Lena Park" and person["age"] == 34 and person["remote"] is True
    assert {"Rust", "Go"} <= set(person["languages"])


@pytest.mark.parametrize("name", SCHEMA_FOLLOWING)
def test_a_lazy_grammar_holds_from_its_trigger_on(name: str, engines: dict) -> None:
    """tool_choice auto's mechanism: the answer is free until it writes the trigger, and follows the
    grammar from there. The trigger is a word of the engine's own free answer; after it, the grammar
    allows only " done"."""
    engine = engines[name]
    free = [e for e in engine.stream_chat(REPEATING, GenerationConfig(max_tokens=16, ignore_eos=True))
            if isinstance(e, TokenEvent) and e.token_id >= 0]  # fmt: skip
    text = "".join(e.text for e in free)
    offsets = list(itertools.accumulate(len(e.text) for e in free))
    words = [(e.text, offset - len(e.text)) for e, offset in zip(free, offsets, strict=True)]
    # A word of two letters or more, at index 1 or later, first met at that token (not inside an earlier one).
    trigger, at = next((word, start) for word, start in words[1:]
                       if re.fullmatch(r"[A-Za-z]{2,}", word.strip()) and text.find(word) == start)  # fmt: skip
    grammar = f'root ::= "{trigger}" qwenrt-tail\nqwenrt-tail ::= " done"'
    assert after_literal(grammar, trigger) == 'root ::= qwenrt-tail\nqwenrt-tail ::= " done"'
    config = GenerationConfig(max_tokens=32, grammar=grammar, grammar_trigger=trigger)
    held = list(engine.stream_chat(REPEATING, config))
    assert held[-1].reason == "eos", held[-1]
    assert held[-1].text == text[: at + len(trigger)] + " done"


def test_a_trigger_needs_a_grammar_and_a_root_of_the_trigger_and_one_rule() -> None:
    with pytest.raises(QwenrtError, match="trigger"):
        GenerationConfig(grammar_trigger="<tool_call>")
    with pytest.raises(ValueError, match="root"):
        after_literal('root ::= "a" b c\nb ::= "x"\nc ::= "y"', "a")
