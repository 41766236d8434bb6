"""Show an evaluation: a table of each engine against the float reference, and verdicts in words."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from qwenrt.compare.report import settings_text

HEADERS = ["engine", "perplexity", "÷ float's", "KL mean ± se", "KL p99", "KL max", "top token = float's",
           "greedy tokens = float's", "read tok/s"]  # fmt: skip


def _ok(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in report["engines"] if entry["status"] == "ok"]


def rows(report: dict[str, Any]) -> list[list[str]]:
    reference = report["reference"]
    table = [["float reference", f"{reference['perplexity']:.4g}", "1", "0", "0", "0", "100 %", "all", "–"]]
    for entry in report["engines"]:
        if entry["status"] != "ok":
            table.append([entry["engine"], "failed: " + entry["error"][:60], *[""] * (len(HEADERS) - 2)])
            continue
        q = entry["quality"]
        matches = entry["continuations"]
        table.append([
            entry["engine"], f"{q['perplexity']:.4g}", f"{q['perplexity_ratio']:.4f}",
            f"{q['kl_mean']:.4f} ± {q['kl_sem']:.4f}", f"{q['kl_p99']:.4f}", f"{q['kl_max']:.3f}",
            f"{q['same_top_share']:.1%}",
            " / ".join(str(matches[name]) for name in matches) + f" of {entry['continuation_tokens']}",
            f"{entry['seconds']['tokens_per_second']:.0f}",
        ])  # fmt: skip
    return table


def header_lines(report: dict[str, Any]) -> list[str]:
    corpus, reference, spec = report["corpus"], report["reference"], report["spec"]
    host = report["host"]
    cached = "cached" if reference["cached"] else f"computed in {reference['seconds_to_compute']:.0f} s, now cached"
    return [
        f"{host['cpu']} · {host['physical_cores']} physical cores · {', '.join(host['features']) or 'no AVX-512/AMX'}",
        f"corpus {corpus['name']}: {corpus['description']} (sha256 {corpus['sha256'][:16]}…); "
        f"{reference['positions']} scored tokens in {reference['windows']} windows of {spec['context']} tokens "
        "(second halves scored, as llama-perplexity does)",
        f"reference: the float32 checkpoint in transformers ({cached}); KL over its 64 most likely tokens and "
        "the rest as one",
        "greedy tokens = float's: of each prompt's first tokens, how many equal the reference's before the first "
        "difference (" + ", ".join(report["prompts"]) + ")",
    ]


def verdicts(report: dict[str, Any]) -> list[str]:
    """Which engine is closer to the float model, and whether that is beyond noise."""
    ok = _ok(report)
    lines = []
    differ = [entry["engine"] for entry in ok if not entry["same_token_ids"]]
    if differ:
        lines.append(f"{', '.join(differ)} tokenise the corpus otherwise than the reference; every engine was given "
                     "the reference's token ids")  # fmt: skip
    for index, a in enumerate(ok):
        for b in ok[index + 1 :]:
            lines.append(faithfulness_line(a["engine"], a["quality"], b["engine"], b["quality"]))
    return lines


def faithfulness_line(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any]) -> str:
    closer, further = ((name_a, a), (name_b, b)) if a["kl_mean"] <= b["kl_mean"] else ((name_b, b), (name_a, a))
    how = "measurably" if measurably_apart(a, b) else "within noise"
    return (f"{closer[0]} is closer to the float model than {further[0]} ({how}): KL {closer[1]['kl_mean']:.4f} "
            f"against {further[1]['kl_mean']:.4f}, perplexity ×{closer[1]['perplexity_ratio']:.4f} against "
            f"×{further[1]['perplexity_ratio']:.4f}")  # fmt: skip


def measurably_apart(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Mean KLs further apart than twice their combined standard error."""
    return abs(a["kl_mean"] - b["kl_mean"]) > 2 * math.hypot(a["kl_sem"], b["kl_sem"])


def settings_lines(report: dict[str, Any]) -> list[str]:
    """The settings each engine read the corpus with, and where each came from."""
    return [f"settings of {entry['engine']}: {settings_text(entry['settings'])}" for entry in _ok(report)
            if entry.get("settings")]  # fmt: skip


def render_terminal(report: dict[str, Any]) -> str:
    lines = header_lines(report) + ["", tabulate(rows(report), headers=HEADERS, tablefmt="simple"), ""]
    return "\n".join(lines + verdicts(report) + settings_lines(report))


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# qwenrt eval", "", *[f"- {line}" for line in header_lines(report)], "",
             tabulate(rows(report), headers=HEADERS, tablefmt="github"), ""]  # fmt: skip
    return "\n".join(lines + [f"- {line}" for line in verdicts(report) + settings_lines(report)]) + "\n"


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(report: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["engine", "measure", "value"])
        writer.writerow(["reference", "perplexity", f"{report['reference']['perplexity']:.6g}"])
        for entry in _ok(report):
            for measure, value in entry["quality"].items():
                writer.writerow([entry["engine"], measure, f"{value:.6g}"])
            for prompt, matched in entry["continuations"].items():
                writer.writerow([entry["engine"], f"greedy tokens = float's, {prompt}", matched])
