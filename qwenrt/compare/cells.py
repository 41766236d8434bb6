"""A comparison cell as a typed record: what one (engine, threads, scenario) measured.

Measurement builds these, presentation reads their fields; the JSON report (schema
``qwenrt.compare/1``, ``schema.json`` beside this file) holds them as dicts, and the tests
check that the schema and these classes name the same fields.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal


@dataclass(frozen=True)
class Summary:
    """A measure over the repetitions of a cell (qwenrt.compare.stats.summarise)."""

    median: float
    p90: float
    min: float
    max: float
    mean: float
    stdev: float
    n: int

    @classmethod
    def of(cls, summary: dict[str, float] | None) -> Summary | None:
        return None if summary is None else cls(**summary)


@dataclass(frozen=True)
class CpuUse:
    cores_used: Summary | None  # process CPU seconds per wall second while generating
    percent_of_threads: float | None
    percent_of_machine: float | None
    per_core_busy_percent: list[float]


@dataclass(frozen=True)
class DecodeCeiling:
    """Decode against the machine's memory bandwidth (qwenrt.compare.ceiling)."""

    bytes_per_token: int
    memory_bandwidth_bytes_per_s: float
    ceiling_tps: float
    share: float


@dataclass
class Cell:
    """A cell that was measured."""

    runtime: str
    threads: int
    scenario: str
    label: str | None  # how a report names the cell (the ladder's steps)
    batch: int
    settings: dict[str, Any]  # what the engine reported it applied
    resolved: dict[str, dict[str, Any]]  # each setting: value, effective value, origin, why
    engine_defaults: bool
    prompt_tokens: int
    prompt_ids_sha256: str
    generated_tokens: int
    load_s: float
    first_token_s: Summary
    first_token_cached_s: float | None
    prefill_tps: Summary | None  # None in scenarios that hold an earlier conversation cached
    decode_tps: Summary | None
    inter_token_ms: Summary | None
    end_to_end_s: Summary
    cpu: CpuUse
    rss_after_load_bytes: int
    peak_rss_bytes: int
    rss_private_bytes: int | None
    rss_file_backed_bytes: int | None
    artifact_bytes: int
    token_ids: list[int]
    repeat: int
    pid: int
    decode_ceiling: DecodeCeiling | None = None  # added once every cell has run
    # The artifact against the float model (compare --quality; qwenrt.eval.scoring.Quality's fields)
    quality: dict[str, float] | None = None
    # compare --rounds: how many fresh processes measured the cell, taking turns with the other
    # cells; the figures above pool their repetitions, each repetition's own in ``samples``.
    rounds: int = 1
    samples: list[dict[str, Any]] = field(default_factory=list)
    status: Literal["ok"] = "ok"

    def round_medians(self, key: str) -> list[float] | None:
        """Each round's median of a per-repetition figure (a key of ``samples``), in the order
        the rounds ran; None for a cell of one round, or where no repetition has the figure."""
        if self.rounds < 2 or not self.samples or len(self.samples) % self.rounds:
            return None
        size = len(self.samples) // self.rounds
        medians = []
        for start in range(0, len(self.samples), size):
            values = [sample[key] for sample in self.samples[start : start + size] if sample.get(key) is not None]
            if not values:
                return None
            medians.append(statistics.median(values))
        return medians

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("decode_ceiling", "quality"):  # a cell without one has no such key (schema)
            if data[optional] is None:
                del data[optional]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for name in ("first_token_s", "prefill_tps", "decode_tps", "inter_token_ms", "end_to_end_s"):
            values[name] = Summary.of(values.get(name))
        cpu = dict(data["cpu"])
        cpu["cores_used"] = Summary.of(cpu.get("cores_used"))
        values["cpu"] = CpuUse(**cpu)
        ceiling = data.get("decode_ceiling")
        values["decode_ceiling"] = DecodeCeiling(**ceiling) if ceiling else None
        return cls(**values)


@dataclass(frozen=True)
class FailedCell:
    """A cell whose engine failed, crashed or ran past its time."""

    runtime: str
    threads: int
    scenario: str
    label: str | None
    error: str
    engine_defaults: bool = False
    status: Literal["failed"] = field(default="failed")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


AnyCell = Cell | FailedCell


def cell_from_json(data: dict[str, Any]) -> AnyCell:
    if data.get("status") == "ok":
        return Cell.from_json(data)
    return FailedCell(**{f.name: data[f.name] for f in fields(FailedCell) if f.name in data})
