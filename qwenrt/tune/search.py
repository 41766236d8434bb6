"""``qwenrt tune``: each engine's settings chosen for this host by measuring them on the user's artifact.

The search changes one setting at a time (coordinate descent), starting from qwenrt's
rules: threads first, then each of the engine's knobs (``Engine.knobs``) in the order it
declares them. Each candidate configuration runs in a fresh process of its own, loaded
once and warmed up; the candidates of a step then take turns for ``rounds`` rounds, in
a rotating order, so that a busy moment on the machine falls on all of them alike. A
step keeps its current value unless another wins a majority of the rounds by more than
``MIN_GAIN``: noise never moves a setting. A candidate that has lost so many rounds that
it can no longer win a majority is not measured again (with two rounds, one that loses
the first): its process is closed, and the rest of the step runs sooner. Last, the result
is measured the same way against the engine exactly as its library opens it; if that is
not slower, the profile says so rather than claim a gain it does not have.

A configuration that crashes the engine is out of the running, and its crash is kept
in the probe's record for this host (:mod:`qwenrt.runtimes.probe`), so that no command
opens it again.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from qwenrt.host import Host, this_host
from qwenrt.runtimes import Engine, EngineOptions
from qwenrt.runtimes.fingerprint import RunKey
from qwenrt.runtimes.probe import ProbeRecord
from qwenrt.runtimes.settings import THREADS, fitted
from qwenrt.tune.trial import TrialFailed, TrialSpec, TrialWorker

MIN_GAIN = 0.01  # a candidate must beat the current value by more than this, in most rounds
LOAD_TIMEOUT_S = 600.0
MEASURE_TIMEOUT_S = 300.0
ENGINE_DEFAULTS = {"engine_defaults": True}
VERSUS_DEFAULTS = "engine defaults"  # the last step's name: the settings found against the engine's own


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    scenario: str
    max_tokens: int
    key: str  # the measurement it reads
    unit: str
    higher_is_better: bool
    scale: float = 1.0
    # Generations a measurement takes the median of: a first token alone moves by 10 % from one
    # answer to the next on a VM, more than the settings that tune compares.
    repeat: int = 1

    def value(self, measurement: dict[str, Any]) -> float | None:
        raw = measurement.get(self.key)
        return None if raw is None else raw * self.scale

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def gain(self, new: float, old: float) -> float:
        """How much better ``new`` is than ``old``, as a share of ``old`` (negative: worse)."""
        return (new - old) / old if self.higher_is_better else (old - new) / old


OBJECTIVES = {
    "end-to-end": Objective("end-to-end", "end-to-end time of a short chat answer (first token + 128 tokens)",
                            "short", 128, "end_to_end_s", "s", False),
    "first-token": Objective("first-token", "first-token latency of a short chat prompt", "short", 8,
                             "first_token_s", "ms", False, 1000.0, repeat=5),
    "decode": Objective("decode", "decode speed of a short chat answer (128 tokens)", "short", 128, "decode_tps",
                        "tok/s", True),
    "prefill": Objective("prefill", "prefill speed of a ~512-token prompt", "long", 4, "prefill_tps", "tok/s",
                         True),
}  # fmt: skip


@dataclass
class Candidate:
    config: dict[str, Any]
    values: list[float | None] = field(default_factory=list)  # the objective, one per round
    measurements: list[dict[str, Any]] = field(default_factory=list)
    failed: str | None = None
    signal: str | None = None
    applied: dict[str, Any] = field(default_factory=dict)  # what the engine reported it ran with
    out_after: int | None = None  # the round after which it could no longer win, and was not measured again
    # The current configuration's figures in the rounds this candidate ran (when the candidates of a
    # step do not all fit in memory at once, each group of them runs its own rounds with the current).
    paired: list[float | None] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        values = [v for v in self.values if v is not None]
        return statistics.median(values) if values and not self.failed else None

    def describe(self) -> dict[str, Any]:
        return {"config": self.config, "values": self.values, "median": self.median, "failed": self.failed,
                "signal": self.signal, "out_after_round": self.out_after,
                "measurements": self.measurements}  # fmt: skip


@dataclass
class Step:
    knob: str
    candidates: list[Candidate]
    chosen: Candidate
    why: str

    def describe(self) -> dict[str, Any]:
        return {"knob": self.knob, "candidates": [c.describe() for c in self.candidates],
                "chosen": self.chosen.config, "why": self.why}  # fmt: skip


@dataclass
class TuneResult:
    engine: str
    key: RunKey
    objective: Objective
    start: dict[str, Any]
    steps: list[Step]
    winner: dict[str, Any]  # the configuration to save
    seconds: float
    versus_defaults: Step | None = None

    def describe(self) -> dict[str, Any]:
        versus = self.versus_defaults.describe() if self.versus_defaults else None
        return {"engine": self.engine, "key": self.key.describe(), "objective": self.objective.name,
                "start": self.start, "winner": self.winner, "seconds": round(self.seconds, 1),
                "steps": [step.describe() for step in self.steps],
                "versus_engine_defaults": versus}  # fmt: skip


def thread_candidates(host: Host) -> tuple[int, ...]:
    """1 to the physical cores: every count on a small box, powers of two and the top on a big one."""
    cores = host.physical_cores
    if cores <= 4:
        return tuple(range(1, cores + 1))
    return tuple(sorted({*(2**i for i in range(cores.bit_length()) if 2**i <= cores), cores}))


@dataclass(frozen=True)
class PlannedStep:
    """One step of the search: a setting and the values it tries, or several settings tried at once."""

    name: str
    options: tuple[dict[str, Any], ...]  # each candidate's changes to the configuration so far
    combination: bool = False
    why: str = ""  # a combination's reason, as its engine gives it

    def configs(
        self, current: dict[str, Any], engine: type[Engine] | None = None, host: Host | None = None
    ) -> list[dict[str, Any]]:
        """The current configuration first, then each option that changes it; given the engine and
        host, with what depends on the changed setting following it (an f32 KV cache does not load
        beside bf16 arithmetic)."""
        changed = [{**current, **option} for option in self.options]
        if engine is not None and host is not None and not self.combination:  # a combination's go together
            changed = [fitted(engine.knobs, host, config) for config in changed]
        unique = [config for index, config in enumerate(changed) if config not in changed[:index]]
        return [current, *(config for config in unique if config != current)]


def plan(engine: type[Engine], objective: Objective, model_dir: Path, host: Host | None = None) -> list[PlannedStep]:
    """The steps of the search: each setting with the values it will try, then the engine's
    combinations that apply to this host and model."""
    host = host or this_host()
    steps = [PlannedStep(THREADS, tuple({THREADS: n} for n in thread_candidates(host)))]
    for knob in engine.knobs:
        if knob.objectives is None or objective.name in knob.objectives:
            steps.append(PlannedStep(knob.name, tuple({knob.name: value} for value in knob.candidates(host))))
    for combination in engine.combinations:
        if combination.applies(host, model_dir):
            steps.append(PlannedStep(combination.name, (dict(combination.values),), True, combination.why))
    return steps


def starting_config(engine: type[Engine], model_dir: Path) -> tuple[dict[str, Any], RunKey]:
    """qwenrt's rules for this host, every value explicit (the engine's default where no rule says)."""
    settings, key = engine.resolve_settings(model_dir, EngineOptions(use_profile=False))
    config = {THREADS: settings[THREADS]}
    for knob in engine.knobs:
        setting = settings.values[knob.name]
        config[knob.name] = setting.value if setting.value is not None else setting.effective
    return config, key


def tune_engine(
    engine: type[Engine],
    model_dir: Path,
    objective: Objective,
    *,
    rounds: int = 2,
    progress: Callable[[str], None] = lambda _: None,
) -> TuneResult:
    started = time.monotonic()
    host = this_host()
    current, key = starting_config(engine, model_dir)
    start = dict(current)
    steps: list[Step] = []
    record = ProbeRecord(key)
    pool = _WorkerPool(engine, model_dir, objective, key, record, progress)
    try:
        for planned in plan(engine, objective, model_dir):
            configs = planned.configs(current, engine, host)
            if len(configs) == 1:
                continue
            candidates = pool.run(configs, rounds, f"{engine.name} {planned.name}")
            step = _choose(planned.name, candidates, objective)
            steps.append(step)
            progress(f"{engine.name} {planned.name}: {step.why}")
            current = step.chosen.config
            pool.keep_only(current)
        candidates = pool.run([current, ENGINE_DEFAULTS], rounds, f"{engine.name} against its own defaults")
        versus = _choose(VERSUS_DEFAULTS, candidates, objective)
    finally:
        pool.close()
    # Tuned settings are kept even when the engine's own defaults measure the same: they are what
    # was measured, and a later engine release may change its defaults.
    defaults_won = bool(versus.chosen.config.get("engine_defaults"))
    winner = _engine_default_config(engine, candidates[1]) if defaults_won else current
    return TuneResult(engine.name, key, objective, start, steps, winner, time.monotonic() - started, versus)


def _engine_default_config(engine: type[Engine], defaults: Candidate) -> dict[str, Any]:
    """The engine's own defaults as a profile: nothing set (None), threads as the engine chose them."""
    threads = defaults.applied.get("threads")
    return {THREADS: threads if isinstance(threads, int) else None, **{knob.name: None for knob in engine.knobs}}


def _choose(knob: str, candidates: list[Candidate], objective: Objective) -> Step:
    """Keep the current configuration (the first) unless another wins most rounds by more than MIN_GAIN."""
    current, others = candidates[0], candidates[1:]
    ok = [c for c in others if c.median is not None]
    if current.median is None:
        if not ok:
            return Step(knob, candidates, current, f"every candidate failed: {current.failed}")
        return Step(knob, candidates, _best(ok, objective), f"the current value failed ({current.failed})")
    if not ok:
        return Step(knob, candidates, current, "no other value ran")
    # Those out of the running lost too many rounds to win; they are named only if all others are.
    best = _best([c for c in ok if c.out_after is None] or ok, objective)
    assert best.median is not None
    gain = objective.gain(best.median, current.median)
    paired = best.paired or current.values
    rounds_won = _rounds_won(best.values, paired, objective)
    rounds = min(len(best.values), len(paired))
    text = (f"{choice_text(knob, best, current)} {_median_text(best, objective)} against "
            f"{_median_text(current, objective)} ({gain:+.1%}), better by more than {MIN_GAIN:.0%} in {rounds_won} "
            f"of {rounds} rounds")  # fmt: skip
    if best.out_after is not None:
        text += ", then out of the running"
    if gain > MIN_GAIN and rounds_won * 2 > rounds and best.out_after is None:
        return Step(knob, candidates, best, f"changed to {text}")
    return Step(knob, candidates, current, f"kept {choice_text(knob, current)}: the best other, {text}")


def _best(candidates: list[Candidate], objective: Objective) -> Candidate:
    return max(candidates, key=lambda c: c.median if objective.higher_is_better else -c.median)  # type: ignore[operator]


def _rounds_won(values: list[float | None], current: list[float | None], objective: Objective) -> int:
    """The rounds in which a candidate beat the current configuration by more than MIN_GAIN."""
    return sum(1 for new, old in zip(values, current, strict=False)
               if new is not None and old is not None and objective.gain(new, old) > MIN_GAIN)  # fmt: skip


def can_still_win(values: list[float | None], current: list[float | None], rounds: int, objective: Objective) -> bool:
    """Whether a candidate measured in the first ``len(values)`` of ``rounds`` rounds could still win a
    majority of them against the current configuration, were it to win every round left."""
    return (_rounds_won(values, current, objective) + rounds - len(values)) * 2 > rounds


def choice_text(step: str, candidate: Candidate, current: Candidate | None = None) -> str:
    """A candidate's value of the step's setting; for a combination, the values it changes."""
    if step in candidate.config or candidate.config.get("engine_defaults"):
        text = _value_text(candidate.config.get(step), candidate)
        if current is None or candidate.config.get("engine_defaults"):
            return text
        following = {name: value for name, value in candidate.config.items()
                     if name != step and current.config.get(name) != value}  # fmt: skip
        return f"{text} (with {_config_text(following)})" if following else text
    if current is None:
        return "qwenrt's settings" if step == VERSUS_DEFAULTS else f"without {step}"
    changes = {name: value for name, value in candidate.config.items() if current.config.get(name) != value}
    return f"{step} ({_config_text(changes)})"


def _median_text(candidate: Candidate, objective: Objective) -> str:
    return f"{candidate.median:.3g} {objective.unit}"


def _value_text(value: Any, candidate: Candidate | None = None) -> str:
    if candidate is not None and candidate.config.get("engine_defaults"):
        return "the engine's own defaults"
    return "engine default" if value is None else json.dumps(value)


class _WorkerPool:
    """The candidates' processes: started together (as many as memory allows), measured in turns."""

    def __init__(
        self, engine: type[Engine], model_dir: Path, objective: Objective, key: RunKey, record: ProbeRecord,
        progress: Callable[[str], None],
    ) -> None:  # fmt: skip
        self.engine, self.model_dir, self.objective = engine, model_dir, objective
        self.key, self.record, self.progress = key, record, progress
        self.workers: dict[str, TrialWorker] = {}  # by configuration, kept from one step to the next

    def _start(self, config: dict[str, Any]) -> TrialWorker:
        name = json.dumps(config, sort_keys=True)
        if name not in self.workers:
            spec = TrialSpec(self.engine.name, str(self.model_dir), config, self.objective.scenario,
                             self.objective.max_tokens, self.objective.repeat)  # fmt: skip
            self.workers[name] = TrialWorker(spec)
        return self.workers[name]

    def run(self, configs: list[dict[str, Any]], rounds: int, what: str) -> list[Candidate]:
        """Measure ``configs`` in interleaved rounds; the first is the current one, in every group."""
        fresh = [Candidate(config) for config in configs]
        per_group = max(2, _workers_that_fit(self.model_dir, self.engine))
        groups = [configs[:1] + configs[1 + i : i + per_group] for i in range(0, max(1, len(configs) - 1),
                                                                              per_group - 1)]  # fmt: skip
        for group in groups:
            self._run_group(group, rounds, what, fresh)
        return fresh

    def _run_group(self, group: list[dict[str, Any]], rounds: int, what: str, results: list[Candidate]) -> None:
        by_config = {json.dumps(c.config, sort_keys=True): c for c in results}
        running = [(self._start(config), by_config[json.dumps(config, sort_keys=True)]) for config in group]
        current, first_round = running[0][1], len(running[0][1].values)
        self.progress(f"{what}: loading {len(group)} candidates")
        for worker, candidate in running:
            try:
                if not worker.settings:  # a worker kept from the step before is loaded already
                    worker.wait_ready(LOAD_TIMEOUT_S)
                candidate.applied = worker.settings.get("applied", {})
            except TrialFailed as exc:
                self._failed(worker, candidate, exc)
        for round_index in range(rounds):
            order = running[round_index % len(running) :] + running[: round_index % len(running)]
            for worker, candidate in order:
                if candidate.failed:
                    continue
                self.progress(f"{what}: round {round_index + 1}/{rounds}, {_config_text(candidate.config)}")
                try:
                    measurement = worker.measure(MEASURE_TIMEOUT_S)
                except TrialFailed as exc:
                    self._failed(worker, candidate, exc)
                    continue
                candidate.measurements.append(measurement)
                candidate.values.append(self.objective.value(measurement))
            for _, candidate in running[1:]:
                candidate.paired = current.values[first_round:]
            running = self._still_in_the_running(running, round_index + 1, rounds)
        for _, candidate in running:
            if not candidate.failed:
                self._remember(candidate.config, {"ok": True})

    def _still_in_the_running(
        self, running: list[tuple[TrialWorker, Candidate]], done: int, rounds: int
    ) -> list[tuple[TrialWorker, Candidate]]:
        """Close the processes of the candidates that can no longer win against the current one (the
        first), after ``done`` of ``rounds`` rounds: no figure of theirs could make them win."""
        current = running[0][1]
        if done == rounds or current.failed:
            return running
        kept = running[:1]
        for worker, candidate in running[1:]:
            if candidate.failed or can_still_win(candidate.values, candidate.paired, rounds, self.objective):
                kept.append((worker, candidate))
                continue
            candidate.out_after = done
            self._remember(candidate.config, {"ok": True})
            worker.close()
            self.workers.pop(json.dumps(candidate.config, sort_keys=True), None)
        return kept

    def _failed(self, worker: TrialWorker, candidate: Candidate, exc: TrialFailed) -> None:
        candidate.failed, candidate.signal = str(exc), exc.signal
        worker.close()
        self.workers.pop(json.dumps(candidate.config, sort_keys=True), None)
        if exc.signal is not None:
            self._remember(candidate.config, {"ok": False, "signal": exc.signal, "reason": str(exc)})

    def _remember(self, config: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Keep what a trial showed in the probe's record, so that commands need not probe it again."""
        if config is ENGINE_DEFAULTS or config.get("engine_defaults"):
            return
        signature = json.dumps({k.name: config.get(k.name) for k in self.engine.knobs if k.affects_safety},
                               sort_keys=True)  # fmt: skip
        if self.record.outcome(signature) is None or not outcome["ok"]:
            self.record.record(signature, outcome)

    def keep_only(self, config: dict[str, Any]) -> None:
        keep = json.dumps(config, sort_keys=True)
        for name in [name for name in self.workers if name != keep]:
            self.workers.pop(name).close()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()


def _workers_that_fit(model_dir: Path, engine: type[Engine]) -> int:
    """How many candidates' processes the free memory holds at once (each about 1.5x the artifact)."""
    artifact = engine.artifact_path(model_dir)
    size = artifact.stat().st_size if artifact.is_file() else sum(p.stat().st_size for p in artifact.rglob("*"))
    return max(1, int(psutil.virtual_memory().available * 0.8 // (size * 1.5 + 300e6)))


def _config_text(config: dict[str, Any]) -> str:
    if config.get("engine_defaults"):
        return "engine defaults"
    return ", ".join(f"{name}={_value_text(value)}" for name, value in config.items())
