"""Show a comparison: a side-by-side table, verdicts in words, JSON, CSV, Markdown and a chart.

Only presentation lives here; the figures come from :mod:`qwenrt.compare.measure`, as the
typed cells of :mod:`qwenrt.compare.cells`.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from qwenrt.compare.cells import AnyCell, Cell, Summary, cell_from_json
from qwenrt.compare.scenarios import COLD_PROMPT, SCENARIOS


@dataclass(frozen=True)
class Metric:
    label: str
    value: Callable[[Cell], float | None]
    fmt: str
    higher_is_better: bool | None  # None: shown, never ranked
    spread: Callable[[Cell], float | None] = lambda cell: None
    optional: bool = False  # a row only where some cell has the figure (compare --quality)


def _stat(key: str, stat: str = "median", scale: float = 1.0) -> Callable[[Cell], float | None]:
    def read(cell: Cell) -> float | None:
        summary: Summary | None = getattr(cell, key)
        return None if summary is None else getattr(summary, stat) * scale

    return read


def _cpu(key: str) -> Callable[[Cell], float | None]:
    return lambda cell: getattr(cell.cpu, key)


METRICS = [
    Metric("load time (s)", lambda c: c.load_s, "{:.2f}", False),
    Metric("first token, median (ms)", _stat("first_token_s", scale=1000), "{:.0f}", False,
           _stat("first_token_s", "stdev", 1000)),
    Metric("first token, p90 (ms)", _stat("first_token_s", "p90", 1000), "{:.0f}", False),
    Metric("first token, min (ms)", _stat("first_token_s", "min", 1000), "{:.0f}", False),
    Metric("first token, prompt cached (ms)", lambda c: c.first_token_cached_s and c.first_token_cached_s * 1000,
           "{:.0f}", None),
    Metric("prefill (tok/s)", _stat("prefill_tps"), "{:.0f}", True, _stat("prefill_tps", "stdev")),
    Metric("decode (tok/s)", _stat("decode_tps"), "{:.1f}", True, _stat("decode_tps", "stdev")),
    Metric("decode ceiling, memory-bound (tok/s)", lambda c: c.decode_ceiling and c.decode_ceiling.ceiling_tps,
           "{:.1f}", None),
    Metric("decode, % of its ceiling", lambda c: c.decode_ceiling and c.decode_ceiling.share * 100, "{:.0f}", True),
    Metric("inter-token, median (ms)", _stat("inter_token_ms"), "{:.1f}", False),
    Metric("inter-token, p90 (ms)", _stat("inter_token_ms", "p90"), "{:.1f}", False),
    Metric("end to end (s)", _stat("end_to_end_s"), "{:.2f}", False),
    Metric("CPU cores busy", lambda c: c.cpu.cores_used and c.cpu.cores_used.median, "{:.2f}", None),
    Metric("CPU, % of its threads", _cpu("percent_of_threads"), "{:.0f}", None),
    Metric("CPU, % of machine", _cpu("percent_of_machine"), "{:.0f}", None),
    Metric("peak memory (MB)", lambda c: c.peak_rss_bytes / 1e6, "{:.0f}", False),
    Metric("in use after the run: private (MB)", lambda c: _megabytes(c.rss_private_bytes), "{:.0f}", False),
    Metric("in use after the run: file-backed (MB)", lambda c: _megabytes(c.rss_file_backed_bytes), "{:.0f}", None),
    Metric("artifact on disk (MB)", lambda c: c.artifact_bytes / 1e6, "{:.0f}", False),
    Metric("KL from the float model, mean", lambda c: _quality(c, "kl_mean"), "{:.4f}", False,
           lambda c: _quality(c, "kl_sem"), optional=True),
    Metric("top token = the float model's (%)", lambda c: _quality(c, "same_top_share", 100), "{:.1f}", True,
           optional=True),
    Metric("perplexity ÷ the float model's", lambda c: _quality(c, "perplexity_ratio"), "{:.4f}", False,
           optional=True),
]  # fmt: skip


def _quality(cell: Cell, key: str, scale: float = 1.0) -> float | None:
    return None if cell.quality is None else cell.quality[key] * scale


def _megabytes(value: int | None) -> float | None:
    return None if value is None else value / 1e6


def ok_cells(report: dict[str, Any]) -> list[Cell]:
    return [cell for cell in report["cells"] if isinstance(cell, Cell)]


def cell_label(cell: AnyCell) -> str:
    if cell.engine_defaults:
        return f"{cell.runtime}, engine defaults"
    return f"{cell.runtime} ×{cell.threads}"


def settings_line(cell: Cell) -> str:
    """The settings a cell ran with and where each came from: ``name=value [origin]``."""
    return f"{cell_label(cell)}: {settings_text(cell.resolved)}"


def settings_text(resolved: dict[str, dict[str, Any]]) -> str:
    """Resolved settings (``ResolvedSettings.describe()``) as ``name=value [origin], ...``."""
    parts = []
    for name, setting in resolved.items():
        value = setting.get("effective", setting["value"])
        shown = "engine's choice" if value is None else json.dumps(value)
        parts.append(f"{name}={shown} [{setting['origin']}]")
    return ", ".join(parts) if parts else "–"


def tuning_line(report: dict[str, Any]) -> str | None:
    """Whether the settings were measured on this host ('qwenrt tune') or come from rules."""
    ok = [c for c in ok_cells(report) if not c.engine_defaults and c.resolved]
    if not ok:
        return None
    tuned = sorted({c.runtime for c in ok if any(s["origin"] == "profile" for s in c.resolved.values())})
    untuned = sorted({c.runtime for c in ok} - set(tuned))
    if not untuned:
        return "settings marked [profile] were measured on this host by 'qwenrt tune'"
    return (f"this host is untuned for {', '.join(untuned)}: its settings come from qwenrt's rules and the engine's "
            "defaults; 'qwenrt tune' measures them here, and --engine-defaults shows what they are worth")  # fmt: skip


def _format(metric: Metric, cell: Cell) -> str:
    value = metric.value(cell)
    if value is None:
        return "–"
    text = metric.fmt.format(value)
    spread = metric.spread(cell)
    return f"{text} ±{metric.fmt.format(spread)}" if spread else text


def table_rows(cells: list[Cell], mark: str = " ◀") -> list[list[str]]:
    """One row per metric, one column per cell; the best value of each row marked."""
    rows = []
    for metric in METRICS:
        values = [metric.value(c) for c in cells]
        if metric.optional and all(value is None for value in values):
            continue
        best = None
        ranked = [v for v in values if v is not None]
        if metric.higher_is_better is not None and len(ranked) > 1:
            best = max(ranked) if metric.higher_is_better else min(ranked)
        rows.append(
            [metric.label]
            + [
                _format(metric, c) + (mark if best is not None and v == best else "")
                for c, v in zip(cells, values, strict=True)
            ]
        )
    return rows


_RATIOS = (("decode_tps", "decode", True, "faster"), ("first_token_s", "first token", False, "sooner"),
           ("prefill_tps", "prefill", True, "faster"))  # fmt: skip


def _ratio_text(a: Cell, b: Cell, key: str, noun: str, higher: bool, verb: str) -> str | None:
    """'noun R× verb' for ``a`` against ``b`` (a is the better one), with noise called out."""
    sa, sb = getattr(a, key), getattr(b, key)
    if sa is None or sb is None:
        return None
    ratio = (sa.median / sb.median) if higher else (sb.median / sa.median)
    noise = (sa.stdev + sb.stdev) >= abs(sa.median - sb.median)
    return f"{noun} {ratio:.2f}× {verb}" + (" (within noise)" if noise else "")


def _median(cell: Cell, key: str) -> float | None:
    summary: Summary | None = getattr(cell, key)
    return None if summary is None else summary.median


def verdicts(report: dict[str, Any]) -> list[str]:
    """Plain-words ratios: at each thread count, the best engine of each measure against every other
    one; and each engine with qwenrt's settings against its own defaults."""
    lines = []
    ok = ok_cells(report)
    measured = [c for c in ok if not c.engine_defaults]
    for scenario, threads in sorted({(c.scenario, c.threads) for c in measured}):
        same = [c for c in measured if (c.scenario, c.threads) == (scenario, threads)]
        if len({c.runtime for c in same}) < 2:
            continue
        parts = []
        for key, noun, higher, verb in _RATIOS:
            ranked = [c for c in same if _median(c, key) is not None]
            if len(ranked) < 2:
                continue
            best = max(ranked, key=lambda c: _median(c, key) if higher else -_median(c, key))  # type: ignore[operator]
            for other in ranked:
                if other is not best:
                    text = _ratio_text(best, other, key, noun, higher, verb)
                    parts.append(f"{best.runtime}: {text} than {other.runtime}")
        lines.append(f"{scenario}, {threads} thread{'s' if threads > 1 else ''}: " + "; ".join(parts))
    lines += _faithfulness(measured)
    for defaults in (c for c in ok if c.engine_defaults):
        tuned = next((c for c in measured if (c.runtime, c.scenario) == (defaults.runtime, defaults.scenario)), None)
        if tuned is None:
            continue
        parts = []
        for key, noun, higher, verb in _RATIOS:
            ours, theirs = _median(tuned, key), _median(defaults, key)
            if ours is not None and theirs is not None:
                better = (ours > theirs) == higher
                text = _ratio_text(*((tuned, defaults) if better else (defaults, tuned)), key, noun, higher, verb)
                parts.append(f"{text}" if better else f"{text}, for the engine's defaults")
        lines.append(f"{tuned.runtime}, {tuned.scenario}: qwenrt's settings against the engine's own defaults: "
                     + "; ".join(parts))  # fmt: skip
    for row in report.get("agreement", []):
        share = row["identical_token_share"]
        if share is None:
            continue
        where = "never" if row["first_difference"] is None else f"first at token {row['first_difference']}"
        lines.append(
            f"agreement {' vs '.join(row['runtimes'])}, {row['scenario']} ×{row['threads']}: "
            f"{share:.0%} identical greedy tokens, "
            f"differing {where}" + ("" if row["same_prompt_ids"] else " (prompt ids differ!)")
        )
    return lines


def _faithfulness(measured: list[Cell]) -> list[str]:
    """A faster engine that is measurably less faithful to the float model, named as such (--quality)."""
    from qwenrt.eval.report import measurably_apart

    lines = []
    for scenario, threads in sorted({(c.scenario, c.threads) for c in measured if c.quality}):
        same = [c for c in measured if (c.scenario, c.threads) == (scenario, threads) and c.quality and c.decode_tps]
        for fast in same:
            for slow in same:
                if fast is slow or fast.decode_tps.median <= slow.decode_tps.median:  # type: ignore[union-attr]
                    continue
                if fast.quality["kl_mean"] > slow.quality["kl_mean"] and measurably_apart(fast.quality, slow.quality):
                    lines.append(
                        f"{scenario}, {threads} thread{'s' if threads > 1 else ''}: {fast.runtime} decodes "
                        f"{fast.decode_tps.median / slow.decode_tps.median:.2f}× faster than {slow.runtime} "  # type: ignore[union-attr]
                        f"but is measurably less faithful to the float model (KL {fast.quality['kl_mean']:.4f} "
                        f"against {slow.quality['kl_mean']:.4f})"
                    )
    return lines


def by_scenario(cells: list[Cell]) -> list[list[Cell]]:
    order = list(dict.fromkeys(c.scenario for c in cells))
    return [[c for c in cells if c.scenario == name] for name in order]


def scenario_line(cell: Cell) -> str:
    cache = SCENARIOS[cell.scenario].cached if cell.scenario in SCENARIOS else COLD_PROMPT
    rounds = f" in {cell.rounds} interleaved rounds" if cell.rounds > 1 else ""
    return (f"scenario {cell.scenario}: {cell.prompt_tokens} prompt tokens, {cell.generated_tokens} new "
            f"tokens, {cell.repeat} repetitions{rounds}, greedy, {cache}")  # fmt: skip


# Decode whose round medians differ by more than this share of their middle one is drift of
# the machine's speed: on a steady one they stay within a few per cent (BENCHMARKS.md, "Issue
# 16's targets, run by run"). The first token, one event per repetition, is shown but not judged.
DRIFT_SHARE = 0.10
_BY_ROUND = (("decode_tps", "decode (tok/s)", 1.0, "{:.1f}"), ("first_token_s", "first token (ms)", 1000.0, "{:.0f}"))


def rounds_line(cells: list[Cell]) -> str | None:
    """compare --rounds: each engine's round medians of decode and first token, and whether the
    machine's speed moved between rounds (which the rounds, taking turns, spread over every engine)."""
    parts, drift = [], 0.0
    for key, noun, scale, fmt in _BY_ROUND:
        shown = []
        for cell in cells:
            medians = cell.round_medians(key)
            if medians is None:
                continue
            if key == "decode_tps":
                drift = max(drift, (max(medians) - min(medians)) / statistics.median(medians))
            shown.append(f"{cell_label(cell)} " + " / ".join(fmt.format(m * scale) for m in medians))
        if shown:
            parts.append(f"{noun} " + ", ".join(shown))
    if not parts:
        return None
    verdict = (f"the machine's speed moved between rounds (decode by up to {drift:.0%}); the engines took turns, "
               "so each met it" if drift > DRIFT_SHARE else "steady between rounds")  # fmt: skip
    return "by round: " + "; ".join(parts) + f" — {verdict}"


LADDER_HEADERS = ["step", "first token (ms)", "CPU (% of machine)", "tokens/s", "gain", "threads"]


def ladder_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per ladder step: first token, CPU, tokens/s and the gain over the first step."""
    rows = []
    base = None
    for cell in report["cells"]:
        if not isinstance(cell, Cell):
            rows.append([cell.label or cell.runtime, "failed: " + cell.error[:60], "", "", "", ""])
            continue
        speed = _median(cell, "decode_tps") or 0.0
        base = base or speed
        rows.append([
            cell.label or cell.runtime,
            f"{cell.first_token_s.median * 1000:.0f}",
            f"{cell.cpu.percent_of_machine or 0:.0f}",
            f"{speed:.1f}",
            f"{speed / base:.2f}×" if base else "–",
            str(cell.settings.get("threads", "")),
        ])  # fmt: skip
    return rows


def render_ladder(report: dict[str, Any], tablefmt: str) -> str:
    ok = ok_cells(report)
    head = scenario_line(ok[0]) + "; tokens/s is decode (aggregate over the batch)" if ok else ""
    return head + "\n" + tabulate(ladder_rows(report), headers=LADDER_HEADERS, tablefmt=tablefmt)


def bandwidth_line(report: dict[str, Any]) -> str | None:
    """The measured memory bandwidth behind the decode ceilings, in words."""
    bandwidth = report.get("memory_bandwidth_bytes_per_s")
    if not bandwidth:
        return None
    measured = ", ".join(f"{value / 1e9:.1f} GB/s with {threads} thread{'s' if threads != '1' else ''}"
                         for threads, value in bandwidth.items())  # fmt: skip
    return (
        f"memory read bandwidth {measured}; a decode ceiling is that bandwidth ÷ the weight bytes "
        "the engine's artifact reads a token"
    )


def render_terminal(report: dict[str, Any]) -> str:
    ok = ok_cells(report)
    out = []
    env = report.get("environment", {})
    if env:
        out.append(f"{env['cpu']} · {env['physical_cores']} physical cores · {env['memory_bytes'] / 2**30:.0f} GiB · "
                   + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))  # fmt: skip
    if report.get("kind") == "ladder":
        return "\n".join([*out, "", render_ladder(report, "simple")])
    for cells in by_scenario(ok):
        out += ["", scenario_line(cells[0])]
        out.append(tabulate(table_rows(cells), headers=["metric"] + [cell_label(c) for c in cells], tablefmt="simple"))
        out += ["settings:"] + [f"  {settings_line(c)}" for c in cells if c.resolved]
        out += [line for line in [rounds_line(cells)] if line]
    if ok:
        line = bandwidth_line(report)
        tuning = tuning_line(report)
        out += [""] + ([line] if line else []) + ([tuning] if tuning else []) + verdicts(report)
    for cell in report["cells"]:
        if not isinstance(cell, Cell):
            out.append(f"FAILED {cell_label(cell)}: {cell.error}")
    if report.get("interrupted"):
        out.append("interrupted: the cells above are those finished before Ctrl-C")
    return "\n".join(out)


def to_json(report: dict[str, Any]) -> dict[str, Any]:
    """The report as JSON data (schema qwenrt.compare/1): the cells as dicts."""
    return {**report, "cells": [cell.to_json() for cell in report["cells"]]}


def from_json(data: dict[str, Any]) -> dict[str, Any]:
    """A report read back from its JSON (:func:`to_json`): the cells typed again."""
    return {**data, "cells": [cell_from_json(cell) for cell in data["cells"]]}


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(to_json(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(report: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["runtime", "threads", "scenario", "status", "metric", "value"])
        for cell in report["cells"]:
            if not isinstance(cell, Cell):
                writer.writerow([cell.runtime, cell.threads, cell.scenario, "failed", "error", cell.error])
                continue
            for metric in METRICS:
                value = metric.value(cell)
                if metric.optional and value is None:
                    continue
                writer.writerow([cell_label(cell).split(" ×")[0], cell.threads, cell.scenario, "ok", metric.label,
                                 "" if value is None else f"{value:.6g}"])  # fmt: skip


def render_markdown(report: dict[str, Any]) -> str:
    ok = ok_cells(report)
    env = report.get("environment", {})
    lines = ["# qwenrt compare", ""]
    if env:
        lines += [f"- CPU: {env['cpu']}, {env['physical_cores']} physical cores, {env['logical_cpus']} logical",
                  f"- memory: {env['memory_bytes'] / 2**30:.1f} GiB; {env['os']}; Python {env['python']}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), ""]  # fmt: skip
    if report.get("kind") == "ladder":
        return "\n".join([*lines, render_ladder(report, "github")]) + "\n"
    for cells in by_scenario(ok):
        lines += [f"## {scenario_line(cells[0])}", ""]
        lines.append(tabulate(table_rows(cells, mark=" **◀**"), headers=["metric"] + [cell_label(c) for c in cells],
                              tablefmt="github"))  # fmt: skip
        lines.append("")
        lines += [f"- settings of {settings_line(c)}" for c in cells if c.resolved]
        lines += [f"- {line}" for line in [rounds_line(cells)] if line] + [""]
    line = bandwidth_line(report)
    tuning = tuning_line(report)
    lines += [f"- {line}" for line in ([line] if line else []) + ([tuning] if tuning else []) + verdicts(report)]
    lines += [f"- FAILED {cell_label(c)}: {c.error}" for c in report["cells"] if not isinstance(c, Cell)]
    return "\n".join(lines) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: one group per (scenario, threads), one colour per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = ok_cells(report)
    groups = list(dict.fromkeys((c.scenario, c.threads) for c in ok))
    series = list(dict.fromkeys(_series(c) for c in ok))
    width = 0.8 / max(1, len(series))
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups) + 4), 4.5))
    panels = [("decode_tps", 1.0, "decode (tokens/s, higher is better)"),
              ("first_token_s", 1000.0, "first token (ms, lower is better)")]  # fmt: skip
    for axis, (key, scale, title) in zip(axes, panels, strict=True):
        for offset, name in enumerate(series):
            cells = {(c.scenario, c.threads): c for c in ok if _series(c) == name and getattr(c, key) is not None}
            xs = [i + offset * width for i, g in enumerate(groups) if g in cells]
            medians = [getattr(cells[g], key).median * scale for g in groups if g in cells]
            spreads = [getattr(cells[g], key).stdev * scale for g in groups if g in cells]
            axis.bar(xs, medians, width, yerr=spreads, label=name, capsize=3)
        axis.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))])
        axis.set_xticklabels([f"{scenario}\n×{threads} threads" for scenario, threads in groups])
        axis.set_title(title)
        axis.legend()
    figure.suptitle("qwenrt compare")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _series(cell: Cell) -> str:
    return f"{cell.runtime}, engine defaults" if cell.engine_defaults else cell.runtime
