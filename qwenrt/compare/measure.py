"""Measure one (engine, threads, scenario) cell, inside the process that runs it.

Runs in a fresh worker process (see :mod:`qwenrt.compare.worker`), so the figures
belong to this engine alone: its load, its threads, its memory. Every repetition
hands the engine the same prompt ids, asks for exactly ``max_tokens`` greedy tokens
(end of sequence ignored) and, except in the scenarios that hold a previous conversation
(second-turn, next-conversation), starts without a cached prompt.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from qwenrt import procfs
from qwenrt.compare.cells import Cell, CpuUse, Summary
from qwenrt.compare.scenarios import Scenario, custom_scenario, scenario
from qwenrt.compare.stats import summarise
from qwenrt.errors import QwenrtError
from qwenrt.runtimes import Engine, EngineOptions, GenerationConfig, StreamEnd, TokenEvent, open_engine
from qwenrt.runtimes.chat_template import render_chat


@dataclass(frozen=True)
class CellSpec:
    runtime: str
    model_dir: str
    threads: int
    scenario: str = "short"  # a scenario's name, or the name given to ``prompt``
    prompt: str | None = None  # replaces the scenario's conversation
    max_tokens: int = 128
    repeat: int = 5
    warmup: int = 1
    pin: bool = False
    huge_pages: bool = False
    label: str | None = None  # how a report names the cell (the ladder's steps)
    engine_defaults: bool = False  # leave threads and hints at the engine's own defaults
    artifact: str | None = None  # a specific artifact instead of the model folder's own
    batch: int = 1  # prompts generated at once (OpenVINO only)
    settings: dict[str, Any] = field(default_factory=dict)  # engine knobs given on the command line

    @property
    def engine_path(self) -> Path:
        return Path(self.artifact or self.model_dir)

    def options(self, prefix_cache: bool) -> EngineOptions:
        return EngineOptions(threads=self.threads, pin=self.pin, prefix_cache=prefix_cache,
                             engine_defaults=self.engine_defaults, huge_pages=self.huge_pages,
                             settings=self.settings)  # fmt: skip

    def conversation(self) -> Scenario:
        return custom_scenario(self.prompt, self.scenario) if self.prompt is not None else scenario(self.scenario)


@dataclass
class Repetition:
    first_token_s: float
    prefill_tps: float | None  # None where part of the prompt came from the engine's cache
    decode_tps: float | None
    inter_token_ms: list[float]
    end_to_end_s: float
    cpu_cores: float  # process CPU seconds per wall second during generation
    per_core_busy: list[float]  # percent, whole machine, during generation
    generated_tokens: int
    token_ids: list[int]


def run_cell(spec: CellSpec, progress: Callable[[str], None] = lambda _: None) -> Cell:
    conversation = spec.conversation()
    holds_previous = bool(conversation.previous)
    process = psutil.Process()
    started = time.perf_counter()
    engine = open_engine(spec.runtime, spec.engine_path, spec.options(prefix_cache=holds_previous))
    with engine:
        load_s = time.perf_counter() - started
        rss_after_load = process.memory_info().rss
        prompt_ids = engine.chat_prompt_ids(conversation.messages)
        previous_ids = (
            engine.tokenize(render_chat(engine.chat_template, conversation.previous, add_generation_prompt=False))
            if holds_previous
            else None
        )
        config = GenerationConfig(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True)
        engine.check_fits(len(prompt_ids), spec.max_tokens)
        measure = _batch_repetition if spec.batch > 1 else measure_repetition
        for index in range(spec.warmup):
            progress(f"warm-up {index + 1}/{spec.warmup}")
            measure(engine, prompt_ids, previous_ids, config, spec.batch)
        repetitions = []
        for index in range(spec.repeat):
            progress(f"repetition {index + 1}/{spec.repeat}")
            repetitions.append(measure(engine, prompt_ids, previous_ids, config, spec.batch))
        # Taken before the cached-first-token measurement opens a second engine: the freed heap
        # of this one (which glibc keeps) would otherwise count in its peak.
        resident = resident_memory() | {"peak_rss_bytes": procfs.peak_rss_bytes()}
        settings = engine.settings()
        resolved = engine.resolved.describe()
    cached_first_token_s = None if holds_previous or spec.batch > 1 else _cached_first_token(spec, prompt_ids, config)
    return _cell_result(spec, conversation, settings, resolved, load_s, rss_after_load, prompt_ids, repetitions,
                        cached_first_token_s, resident)  # fmt: skip


def _cached_first_token(spec: CellSpec, prompt_ids: list[int], config: GenerationConfig) -> float:
    """First-token latency of the same prompt with the engine's prefix cache on and warm.

    Reported beside the cold figures, so that nobody mistakes one for the other.
    """
    with open_engine(spec.runtime, spec.engine_path, spec.options(prefix_cache=True)) as engine:
        measure_repetition(engine, prompt_ids, None, config)
        return measure_repetition(engine, prompt_ids, None, config).first_token_s


def measure_repetition(
    engine: Engine, prompt_ids: list[int], previous_ids: list[int] | None, config: GenerationConfig, batch: int = 1
) -> Repetition:
    if previous_ids is not None:
        # Put the first turn in the KV cache, as a real conversation would have it.
        for _ in engine.stream(previous_ids, GenerationConfig(max_tokens=1, ignore_eos=True)):
            pass
    psutil.cpu_percent(percpu=True)
    cpu_before = _cpu_seconds()
    wall_before = time.perf_counter()
    times: list[float] = []
    ids: list[int] = []
    end: StreamEnd | None = None
    for event in engine.stream(prompt_ids, config):
        if isinstance(event, TokenEvent):
            if event.token_id >= 0:
                times.append(event.time)
                ids.append(event.token_id)
        else:
            end = event
    wall = time.perf_counter() - wall_before
    cpu = _cpu_seconds() - cpu_before
    per_core = psutil.cpu_percent(percpu=True)
    assert end is not None and end.first_token is not None
    first_token_s = end.first_token - end.started
    gaps = [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)]
    return Repetition(
        first_token_s=first_token_s,
        # With an earlier conversation cached, the first token is the engine's reuse as much as its
        # prefill, and how much it reused is its own (OpenVINO does not say): no prefill speed.
        prefill_tps=None if previous_ids is not None else end.prompt_tokens / first_token_s,
        decode_tps=end.decode_tokens_per_second,
        inter_token_ms=gaps,
        end_to_end_s=end.finished - end.started,
        cpu_cores=cpu / wall if wall > 0 else 0.0,
        per_core_busy=per_core,
        generated_tokens=end.generated_tokens,
        token_ids=ids,
    )


def _batch_repetition(
    engine: Engine, prompt_ids: list[int], previous_ids: list[int] | None, config: GenerationConfig, batch: int
) -> Repetition:
    """``batch`` copies of the prompt generated together; rates are aggregate over the batch."""
    generate_batch = getattr(engine, "generate_batch", None)
    if generate_batch is None:
        raise QwenrtError(f"the {engine.name} engine cannot generate a batch")
    psutil.cpu_percent(percpu=True)
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    first_token_s, token_ids = generate_batch([prompt_ids] * batch, config)
    wall = time.perf_counter() - started
    cpu = _cpu_seconds() - cpu_before
    generated = sum(len(ids) for ids in token_ids)
    return Repetition(
        first_token_s=first_token_s,
        prefill_tps=batch * len(prompt_ids) / first_token_s,
        decode_tps=(generated - batch) / (wall - first_token_s),
        inter_token_ms=[],
        end_to_end_s=wall,
        cpu_cores=cpu / wall,
        per_core_busy=psutil.cpu_percent(percpu=True),
        generated_tokens=generated,
        token_ids=token_ids[0],
    )


def _cpu_seconds() -> float:
    # getrusage counts in microseconds; psutil's cpu_times in 10 ms clock ticks, too coarse for short runs.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cell_result(
    spec: CellSpec, conversation: Scenario, settings: dict[str, Any], resolved: dict[str, dict[str, Any]],
    load_s: float, rss_after_load: int, prompt_ids: list[int], repetitions: list[Repetition],
    cached_first_token_s: float | None, resident: dict[str, int | None],
) -> Cell:  # fmt: skip
    """The cell's figures; ``resident`` holds the memory readings, the peak among them."""
    return Cell(
        runtime=spec.runtime,
        threads=spec.threads,
        scenario=conversation.name,
        label=spec.label,
        batch=spec.batch,
        settings=settings,
        resolved=resolved,
        engine_defaults=spec.engine_defaults,
        prompt_tokens=len(prompt_ids),
        prompt_ids_sha256=_ids_digest(prompt_ids),
        generated_tokens=repetitions[0].generated_tokens,
        load_s=load_s,
        first_token_cached_s=cached_first_token_s,
        rss_after_load_bytes=rss_after_load,
        peak_rss_bytes=resident["peak_rss_bytes"] or 0,
        rss_private_bytes=resident["rss_private_bytes"],
        rss_file_backed_bytes=resident["rss_file_backed_bytes"],
        artifact_bytes=_artifact_size(Path(settings["artifact"])),
        token_ids=repetitions[0].token_ids,
        pid=os.getpid(),
        samples=[{name: value for name, value in asdict(r).items() if name != "token_ids"} for r in repetitions],
        **_summaries(repetitions, spec.threads),
    )


def _summaries(repetitions: list[Repetition], threads: int) -> dict[str, Any]:
    """A cell's figures over its repetitions (the fields of :class:`Cell` that summarise them)."""
    logical = psutil.cpu_count(logical=True) or 1
    cores = Summary.of(summarise([r.cpu_cores for r in repetitions]))
    per_core = [sum(r.per_core_busy[i] for r in repetitions) / len(repetitions) for i in range(logical)]
    first_token = Summary.of(summarise([r.first_token_s for r in repetitions]))
    end_to_end = Summary.of(summarise([r.end_to_end_s for r in repetitions]))
    assert first_token is not None and end_to_end is not None  # one repetition or more
    return {
        "first_token_s": first_token,
        "prefill_tps": Summary.of(summarise([r.prefill_tps for r in repetitions if r.prefill_tps is not None])),
        "decode_tps": Summary.of(summarise([r.decode_tps for r in repetitions if r.decode_tps is not None])),
        "inter_token_ms": Summary.of(summarise([gap for r in repetitions for gap in r.inter_token_ms])),
        "end_to_end_s": end_to_end,
        "cpu": CpuUse(
            cores_used=cores,
            percent_of_threads=100 * cores.median / threads if cores else None,
            percent_of_machine=100 * cores.median / logical if cores else None,
            per_core_busy_percent=per_core,
        ),
        "repeat": len(repetitions),
    }


def pooled(rounds: list[Cell]) -> Cell:
    """One cell from the rounds that measured the same spec (compare --rounds), each in a fresh
    process: their repetitions pooled into one set of figures, the load time the rounds' median,
    the memory readings those of the round that peaked highest."""
    if len(rounds) == 1:
        return rounds[0]
    repetitions = [Repetition(**sample, token_ids=[]) for cell in rounds for sample in cell.samples]
    highest = max(rounds, key=lambda cell: cell.peak_rss_bytes)
    cached = [cell.first_token_cached_s for cell in rounds if cell.first_token_cached_s is not None]
    return replace(
        rounds[0],
        load_s=statistics.median(cell.load_s for cell in rounds),
        first_token_cached_s=statistics.median(cached) if cached else None,
        rss_after_load_bytes=highest.rss_after_load_bytes,
        peak_rss_bytes=highest.peak_rss_bytes,
        rss_private_bytes=highest.rss_private_bytes,
        rss_file_backed_bytes=highest.rss_file_backed_bytes,
        rounds=len(rounds),
        samples=[sample for cell in rounds for sample in cell.samples],
        **_summaries(repetitions, rounds[0].threads),
    )


def resident_memory() -> dict[str, int | None]:
    """What the process holds in memory now, split by whether the kernel can take it back.

    Both engines map their artifact from disk: those pages are file-backed and clean, so
    under memory pressure the kernel drops them and reads them again when needed. The
    private (anonymous) part is what the engine really needs of the machine's memory.
    """
    fields = procfs.status_bytes("RssAnon", "RssFile")
    return {"rss_private_bytes": fields["RssAnon"], "rss_file_backed_bytes": fields["RssFile"]}


def _ids_digest(ids: list[int]) -> str:
    import hashlib

    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def _artifact_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
