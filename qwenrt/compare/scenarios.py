"""What a comparison asks the engines: conversations that mean something to a user."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwenrt.errors import QwenrtError
from qwenrt.runtimes.chat_template import Message

SHORT_PROMPT = "请写一段 Python 快速排序函数"

# About 512 prompt tokens once templated: prefill dominates the first token.
LONG_CONTEXT = (
    "Below is a description of a small inventory service. Read it and answer the question at the end.\n"
    + "\n".join(
        f"Item {i}: warehouse {chr(65 + i % 6)}, shelf {i * 7 % 31}, {i * 13 % 97} units in stock, "
        f"reorder level {i * 5 % 23}, supplier number {1000 + i * 37}."
        for i in range(1, 15)
    )
    + "\nQuestion: which warehouses hold items below their reorder level? Answer briefly."
)

FIRST_TURN_ANSWER = (
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n    pivot = items[len(items) // 2]\n"
    "    left = [x for x in items if x < pivot]\n    middle = [x for x in items if x == pivot]\n"
    "    right = [x for x in items if x > pivot]\n    return quicksort(left) + middle + quicksort(right)\n"
)


# Another conversation with the assistant, before the measured one. It shares only the
# chat template's system prompt with it, as consecutive conversations of a deployed assistant do.
OTHER_QUESTION = "What is the capital of France?"
OTHER_ANSWER = "The capital of France is Paris."

COLD_PROMPT = "cold prompt"


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    messages: tuple[Message, ...]
    # A conversation whose KV cache the engine already holds (a previous turn, or the
    # conversation before): whatever prefix the measured prompt shares with it is what the
    # engine's prefix cache can reuse, and that reuse is what is measured.
    previous: tuple[Message, ...] = field(default=())
    # What a report says the engine held before each measured prompt.
    cached: str = COLD_PROMPT

    def __post_init__(self) -> None:
        # A scenario that puts a conversation in the cache first and kept the default label
        # would be reported as cold: its reader would take a cache hit for prefill speed.
        if self.previous and self.cached == COLD_PROMPT:
            raise ValueError(f"scenario {self.name!r} holds a previous conversation: say what it caches")


SCENARIOS = {
    "short": Scenario("short", "a short chat turn", ({"role": "user", "content": SHORT_PROMPT},)),
    "long": Scenario(
        "long", "a long prompt (~512 tokens): prefill matters", ({"role": "user", "content": LONG_CONTEXT},)
    ),
    "second-turn": Scenario(
        "second-turn",
        "a second chat turn reusing the first turn's cached prefix",
        (
            {"role": "user", "content": SHORT_PROMPT},
            {"role": "assistant", "content": FIRST_TURN_ANSWER},
            {"role": "user", "content": "Now make it sort in descending order."},
        ),
        previous=({"role": "user", "content": SHORT_PROMPT}, {"role": "assistant", "content": FIRST_TURN_ANSWER}),
        cached="first turn cached",
    ),
    "next-conversation": Scenario(
        "next-conversation",
        "the short chat turn as a new conversation after another one: the system prompt is cached",
        ({"role": "user", "content": SHORT_PROMPT},),
        previous=({"role": "user", "content": OTHER_QUESTION}, {"role": "assistant", "content": OTHER_ANSWER}),
        cached="the conversation before cached (it shares the system prompt)",
    ),
}


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise QwenrtError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}") from None


def custom_scenario(prompt: str, name: str = "custom") -> Scenario:
    if not prompt.strip():
        raise QwenrtError("the prompt is empty")
    return Scenario(name, "the user's prompt", ({"role": "user", "content": prompt},))
