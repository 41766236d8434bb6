"""Engines serving several streams at once: OpenVINO's continuous batching, llama.cpp's one-at-a-time.

The server relies on this contract: ``engine.stream`` may be called from up to
``engine.concurrency`` threads at once, each stream gets its whole answer, and a
stream whose reader leaves stops without disturbing the others.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from helpers import LOGPROB_TOLERANCE, logprob_deviation, scored_tokens

from qwenrt.errors import QwenrtError
from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, TokenEvent, open_engine
from qwenrt.runtimes.base import MAX_TOP_LOGPROBS

PROMPTS = ["Hello fox", "The quick brown fox", "今天天气很好。", "Write a Python quicksort function."]


@pytest.fixture(scope="module")
def batching(tiny_model: Path):
    """OpenVINO on its continuous-batching pipeline, four streams at a time."""
    engine = open_engine("openvino", tiny_model, EngineOptions(threads=1, prefix_cache=False, parallel=4))
    yield engine
    engine.close()


def token_ids(events: list) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent) and e.token_id >= 0]


def run_together(engine, jobs: list[tuple[str, GenerationConfig]]) -> list[list]:
    """Stream every job on its own thread, all started together; each job's events."""
    results: list[list] = [[] for _ in jobs]
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(index: int, prompt: str, config: GenerationConfig) -> None:
        try:
            start.wait()
            results[index] = list(engine.stream_chat([{"role": "user", "content": prompt}], config))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    return results


def test_openvino_reports_its_concurrency_and_llama_cpp_stays_at_one(tiny_model: Path, batching) -> None:
    assert batching.concurrency == 4
    assert batching.settings()["pipeline"] == "ContinuousBatchingPipeline"
    with open_engine("gguf", tiny_model, EngineOptions(threads=1, parallel=4)) as llama:
        assert llama.concurrency == 1


def test_concurrent_streams_each_get_their_whole_answer(batching) -> None:
    lengths = [40, 7, 25, 40]
    jobs = [(p, GenerationConfig(max_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, lengths, strict=True)]
    results = run_together(batching, jobs)
    for events, length in zip(results, lengths, strict=True):
        end = events[-1]
        assert isinstance(end, StreamEnd)
        assert (end.reason, end.generated_tokens, len(token_ids(events))) == ("length", length, length)
    assert batching.requests_in_flight() == 0


def test_batched_greedy_answers_equal_one_at_a_time(batching) -> None:
    config = GenerationConfig(max_tokens=24, ignore_eos=True)
    alone = [token_ids(list(batching.stream_chat([{"role": "user", "content": p}], config))) for p in PROMPTS]
    together = [token_ids(events) for events in run_together(batching, [(p, config) for p in PROMPTS])]
    assert together == alone


def test_concurrent_streams_each_get_their_own_log_probabilities(batching, logit_engines: dict) -> None:
    """Each scored stream has its own infer request, so its own KV cache: streams scored at once,
    greedy and sampled, beside one that asks for none, each get their own sequence's figures."""
    configs = [GenerationConfig(max_tokens=16, ignore_eos=True, logprobs=MAX_TOP_LOGPROBS),
               GenerationConfig(max_tokens=9, ignore_eos=True, logprobs=2, temperature=1.5, seed=5),
               GenerationConfig(max_tokens=16, ignore_eos=True),
               GenerationConfig(max_tokens=12, ignore_eos=True, logprobs=0, repetition_penalty=1.5)]  # fmt: skip
    results = run_together(batching, list(zip(PROMPTS, configs, strict=True)))
    for prompt, config, events in zip(PROMPTS, configs, results, strict=True):
        tokens = scored_tokens(events)
        assert len(tokens) == config.max_tokens
        if config.logprobs is None:
            assert all(token.logprobs is None for token in tokens)
            continue
        prompt_ids = batching.chat_prompt_ids([{"role": "user", "content": prompt}])
        assert logprob_deviation(tokens, logit_engines["openvino"], prompt_ids, config.logprobs) <= LOGPROB_TOLERANCE


def test_single_stream_on_the_batching_pipeline_equals_llm_pipeline(tiny_model: Path, batching) -> None:
    config = GenerationConfig(max_tokens=24, ignore_eos=True)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    with open_engine("openvino", tiny_model, EngineOptions(threads=1, prefix_cache=False)) as single:
        assert single.settings()["pipeline"] == "LLMPipeline"
        expected = token_ids(list(single.stream_chat(messages, config)))
    assert token_ids(list(batching.stream_chat(messages, config))) == expected


def test_a_stream_that_leaves_stops_alone(batching) -> None:
    """The reader of one stream stops after three tokens; the others run to their end."""
    long = GenerationConfig(max_tokens=300, ignore_eos=True)
    others: list[list] = []

    def run_other(prompt: str) -> None:
        others.append(list(batching.stream_chat([{"role": "user", "content": prompt}], long)))

    threads = [threading.Thread(target=run_other, args=(p,)) for p in PROMPTS[1:3]]
    for thread in threads:
        thread.start()
    stream = batching.stream_chat([{"role": "user", "content": PROMPTS[0]}], long)
    seen = 0
    for event in stream:
        seen += isinstance(event, TokenEvent)
        if seen == 3:
            break
    stream.close()
    for thread in threads:
        thread.join(timeout=120)
    assert [events[-1].generated_tokens for events in others] == [300, 300]
    deadline = time.monotonic() + 10
    while batching.requests_in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batching.requests_in_flight() == 0


def test_cancel_event_ends_a_batched_stream(batching) -> None:
    cancel = threading.Event()
    events = []
    for event in batching.stream_chat([{"role": "user", "content": "Hello fox"}],
                                      GenerationConfig(max_tokens=300, ignore_eos=True), cancel):  # fmt: skip
        events.append(event)
        if len(token_ids(events)) == 5:
            cancel.set()
    assert (events[-1].reason, events[-1].generated_tokens) == ("cancelled", 5)


def test_seeded_sampling_repeats_on_the_batching_pipeline(batching) -> None:
    config = GenerationConfig(max_tokens=30, temperature=1.5, top_p=0.95, seed=11, ignore_eos=True)
    messages = [{"role": "user", "content": "Hello fox"}]
    first, second = (token_ids(list(batching.stream_chat(messages, config))) for _ in range(2))
    assert first == second


def test_generate_batch_needs_the_single_stream_pipeline(batching) -> None:
    with pytest.raises(QwenrtError, match="parallel=1"):
        batching.generate_batch([[1, 2, 3]], GenerationConfig(max_tokens=2))


def test_closing_the_engine_ends_a_stream_in_flight(tiny_model: Path) -> None:
    engine = open_engine("openvino", tiny_model, EngineOptions(threads=1, prefix_cache=False, parallel=2))
    stream = engine.stream_chat([{"role": "user", "content": "Hello fox"}],
                                GenerationConfig(max_tokens=400, ignore_eos=True))  # fmt: skip
    next(stream)
    finished = threading.Event()

    def drain() -> None:
        for _ in stream:
            pass
        finished.set()

    reader = threading.Thread(target=drain)
    reader.start()
    engine.close()
    reader.join(timeout=30)
    assert finished.is_set(), "the reader of a stream hung after the engine closed"


def test_llama_cpp_evaluates_on_one_thread_whoever_asks(tiny_model: Path) -> None:
    """Once two threads have run llama.cpp, its OpenMP teams outnumber the cores and decode
    loses a third (BENCHMARKS.md): the engine hands every evaluation to a thread of its own."""
    with open_engine("gguf", tiny_model, EngineOptions(threads=1, prefix_cache=False)) as llama:
        evaluated_on: list[str] = []
        evaluate = llama._llm.eval

        def recording_eval(tokens: list[int]) -> None:  # a spy: the real evaluation still runs
            evaluated_on.append(threading.current_thread().name)
            evaluate(tokens)

        llama._llm.eval = recording_eval
        config = GenerationConfig(max_tokens=5, ignore_eos=True)
        ask = [{"role": "user", "content": "Hello fox"}]
        here = list(llama.stream_chat(ask, config))
        there: list[list] = []
        caller = threading.Thread(target=lambda: there.append(list(llama.stream_chat(ask, config))))
        caller.start()
        caller.join(timeout=60)
        assert token_ids(here) == token_ids(there[0])
        assert len(evaluated_on) >= 10
        assert len(set(evaluated_on)) == 1 and evaluated_on[0].startswith("llama.cpp"), set(evaluated_on)
