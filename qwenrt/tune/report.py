"""Show what ``qwenrt tune`` measured and chose: presentation only (the figures come from search)."""

from __future__ import annotations

import json
from typing import Any

from tabulate import tabulate

from qwenrt.host import Host
from qwenrt.tune.search import Candidate, Objective, PlannedStep, Step, TuneResult, choice_text


def host_line(host: Host) -> str:
    features = ", ".join(host.features()) or "no AVX-512/AMX features"
    return f"{host.cpu} · {host.physical_cores} physical cores · {features} · host key {host.key}"


def render_plan(engine: str, build: str, steps: list[PlannedStep], start: dict[str, Any], objective: Objective,
                rounds: int) -> str:  # fmt: skip
    rows = [[step.name, _start(step, start), ", ".join(_option(step, option) for option in step.options)]
            for step in steps]  # fmt: skip
    # The start, each value that changes it, the engine's defaults.
    trials = 2 + sum(len(step.configs(start)) - 1 for step in steps)
    return "\n".join([
        f"{engine} ({build}): starts from qwenrt's rules, one setting at a time; {rounds} interleaved rounds of "
        f"'{objective.description}'; then against the engine's own defaults (about {trials} candidate processes)",
        tabulate(rows, headers=["setting", "start", "candidates"], tablefmt="simple"),
        *(f"{step.name}: {step.why}" for step in steps if step.combination),
    ])  # fmt: skip


def _start(step: PlannedStep, start: dict[str, Any]) -> str:
    return "the settings found so far" if step.combination else _value(start.get(step.name))


def _option(step: PlannedStep, option: dict[str, Any]) -> str:
    if not step.combination:
        return _value(option[step.name])
    return ", ".join(f"{name}={_value(value)}" for name, value in option.items())


def _value(value: Any) -> str:
    return "engine default" if value is None else json.dumps(value)


def _figure(candidate: Candidate, objective: Objective) -> str:
    if candidate.failed:
        return f"crashed: {candidate.signal}" if candidate.signal else "failed (below)"
    return f"{candidate.median:.3g}" if candidate.median is not None else "–"


def _rounds(candidate: Candidate) -> str:
    figures = " ".join("–" if v is None else f"{v:.3g}" for v in candidate.values)
    return figures + (", then out" if candidate.out_after is not None else "")


def step_rows(step: Step, objective: Objective) -> list[list[str]]:
    rows = []
    for index, candidate in enumerate(step.candidates):
        value = choice_text(step.knob, candidate, None if index == 0 else step.candidates[0])
        chosen = candidate is step.chosen
        rows.append([step.knob if index == 0 else "", value + (" ◀" if chosen else ""),
                     _figure(candidate, objective), _rounds(candidate)])  # fmt: skip
    return rows


def render_result(result: TuneResult, pinned: dict[str, Any], saved: str | None) -> str:
    """The steps, each candidate's figures and why each setting was kept or changed; then the
    profile: ``pinned``, what of the winner the objective measured."""
    objective = result.objective
    headers = ["setting", "value", f"{objective.name} ({objective.unit}), median", "rounds"]
    rows: list[list[str]] = []
    for step in result.steps:
        rows += step_rows(step, objective)
    lines = [f"{result.engine} ({result.key.engine_build}), {result.seconds:.0f} s",
             tabulate(rows, headers=headers, tablefmt="simple")]  # fmt: skip
    for step in result.steps:
        lines.append(f"  {step.knob}: {step.why}")
        lines += [f"    {choice_text(step.knob, c, None if c is step.candidates[0] else step.candidates[0])} "
                  f"failed: {c.failed}" for c in step.candidates if c.failed and not c.signal]  # fmt: skip
    if result.versus_defaults is not None:
        versus = result.versus_defaults
        lines.append(f"  against the engine's own defaults: {versus.why}")
    chosen = ", ".join(f"{name}={_value(value)}" for name, value in pinned.items())
    ruled = [name for name in result.winner if name not in pinned]
    unweighed = f"; {', '.join(ruled)}: qwenrt's rules (not weighed by {result.objective.name})" if ruled else ""
    lines.append(f"  profile: {chosen}{unweighed}" + (f"\n  saved to {saved}" if saved else ""))
    return "\n".join(lines)
