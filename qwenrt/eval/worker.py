"""The process that reads a corpus with one model: the float reference, or one engine.

The reference's role writes its cache (top tokens of every scored position, its greedy
continuations); an engine's role reads the same token ids window by window, against
that cache, and returns only figures. One window's logits are in memory at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qwenrt.child import child_main
from qwenrt.eval.corpora import corpus as find_corpus
from qwenrt.eval.run import CONTINUATION_PROMPTS, EvalSpec
from qwenrt.eval.scoring import Quality, Reference, Scores, Windows, make_windows, matching_prefix, perplexity
from qwenrt.runtimes import Engine, EngineOptions, GenerationConfig, TokenEvent, engine_class, open_engine

# Characters read for each token wanted, at first: prose runs 3-5 a token; the read grows if short.
CHARACTERS_PER_TOKEN = 6


def corpus_ids(engine: Engine, text: str, tokens: int) -> tuple[list[int], int]:
    """The first ``tokens`` ids of ``text`` read as text, and how many characters were read for them.

    A prefix of the text is tokenised, not all of it; its last few tokens may be cut by the
    prefix's end, so the prefix is read with room to spare and those are not used."""
    characters = tokens * CHARACTERS_PER_TOKEN + 4096
    while True:
        if characters >= len(text):
            return engine.tokenize_text(text)[:tokens], len(text)
        ids = engine.tokenize_text(text[:characters])
        if len(ids) > tokens + 64:  # clear of the tokens the prefix's end may have cut
            return ids[:tokens], characters
        characters *= 2


def _window_logits(engine: Engine, windows: Windows, progress: Callable[[str], None]) -> Iterator[np.ndarray]:
    for index, window in enumerate(windows.ids):
        progress(f"window {index + 1}/{len(windows.ids)}")
        yield engine.window_logits(window.tolist())


def _continuation(engine: Engine, prompt: str, tokens: int) -> list[int]:
    events = engine.stream_chat([{"role": "user", "content": prompt}], GenerationConfig(max_tokens=tokens,
                                                                                       ignore_eos=True))  # fmt: skip
    return [event.token_id for event in events if isinstance(event, TokenEvent) and event.token_id >= 0]


def _reference(spec: EvalSpec, path: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    corpus = find_corpus(spec.corpus)
    windows_wanted = -(-spec.max_tokens // (spec.context - 1 - spec.context // 2))
    options = EngineOptions(threads=spec.threads, all_logits=True, prefix_cache=False)
    started = time.perf_counter()
    # torch has no native crash to guard against: no probe, which would load the float model twice.
    with open_engine("transformers", Path(spec.model_dir), options, probe=False) as reference_engine:
        ids, characters = corpus_ids(reference_engine, corpus.text, windows_wanted * spec.context)
        windows = make_windows(ids, spec.context, spec.max_tokens)
        reference = Reference.from_window_logits(windows, _window_logits(reference_engine, windows, progress))
        progress("greedy continuations")
        continuations = {name: _continuation(reference_engine, prompt, spec.continuation_tokens)
                         for name, prompt in CONTINUATION_PROMPTS}  # fmt: skip
    meta = {"corpus": corpus.describe(), "context": spec.context, "windows": int(windows.ids.shape[0]),
            "positions": int(reference.target_logp.size), "characters_read": characters,
            "perplexity": perplexity(reference.target_logp), "continuations": continuations,
            "seconds_to_compute": round(time.perf_counter() - started, 1)}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".npz.partial")
    with os.fdopen(fd, "wb") as handle:
        np.savez_compressed(handle, ids=windows.ids.astype(np.int32), target_logp=reference.target_logp,
                            top_ids=reference.top_ids, top_logp=reference.top_logp.astype(np.float32))  # fmt: skip
    os.replace(partial, path)  # last: the .npz's presence means the whole reference is there
    return meta


def _engine(name: str, spec: EvalSpec, path: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    with np.load(path) as data:
        windows = Windows(data["ids"].astype(np.int64))
        reference = Reference(data["target_logp"], data["top_ids"], data["top_logp"].astype(np.float64))
    text = find_corpus(spec.corpus).text[: meta["characters_read"]]
    model_dir = Path(spec.model_dir)
    started = time.perf_counter()
    knobs = {knob.name for knob in engine_class(name).knobs}
    given = {setting: value for setting, value in spec.settings.items() if setting in knobs}
    options = EngineOptions(threads=spec.threads, all_logits=True, context_length=spec.context, prefix_cache=False,
                            settings=given)  # fmt: skip
    with open_engine(name, model_dir, options) as engine:
        loaded = time.perf_counter()
        own_ids = engine.tokenize_text(text)[: windows.ids.size]
        reading = time.perf_counter()
        scores = Scores.against(reference, windows, _window_logits(engine, windows, progress))
        read_s = time.perf_counter() - reading
        settings = engine.resolved.describe()
    progress("greedy continuations")
    with open_engine(
        name, model_dir, EngineOptions(threads=spec.threads, prefix_cache=False, settings=given)
    ) as engine:
        matches = {prompt_name: matching_prefix(_continuation(engine, prompt, spec.continuation_tokens),
                                                meta["continuations"][prompt_name])
                   for prompt_name, prompt in CONTINUATION_PROMPTS}  # fmt: skip
    return {
        "engine": name,
        "status": "ok",
        "same_token_ids": own_ids == windows.ids.reshape(-1).tolist(),
        "quality": Quality.of(scores, reference).describe(),
        "continuations": matches,
        "continuation_tokens": spec.continuation_tokens,
        "seconds": {
            "load": round(loaded - started, 1),
            "read": round(read_s, 1),
            "tokens_per_second": round(windows.ids.size / read_s, 1),
        },  # fmt: skip
        "settings": settings,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    fd, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(partial, path)


def _work(request: dict[str, Any], progress: Callable[[str], None]) -> Any:
    spec = EvalSpec(**request["spec"])
    path = Path(request["reference"])
    if request["role"] == "reference":
        return _reference(spec, path, progress)
    return _engine(request["engine"], spec, path, progress)


if __name__ == "__main__":
    child_main(_work)
