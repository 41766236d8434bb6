"""Issue 16's speed targets on the AMX host, run by run: one Markdown row per committed
`qwenrt compare --scenario short,long` report (bench/amx_targets*.json), for BENCHMARKS.md.

The host's speed moves by up to 40 % within the hour, so the targets are read off every
run, the missed ones too, with the memory bandwidth each run measured beside its cells.

    python bench/amx_targets_table.py [bench/amx_targets*.json ...]
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent

# (column, engine, scenario, figure, target, higher is better)
TARGETS = [
    ("llama.cpp decode, tok/s (≥ 42)", "gguf", "short", "decode_tps", 42.0, True),
    ("llama.cpp prefill at 518 tokens, tok/s (≥ 500)", "gguf", "long", "prefill_tps", 500.0, True),
    ("OpenVINO decode, tok/s (≥ 34)", "openvino", "short", "decode_tps", 34.0, True),
    ("OpenVINO short first token, ms (≤ 55)", "openvino", "short", "first_token_s", 55.0, False),
]


def figure(cell: dict[str, Any], name: str) -> tuple[float, float, float]:
    """Median, standard deviation and best of a cell's figure, in the column's unit."""
    summary = cell[name]
    scale = 1000.0 if name.endswith("_s") else 1.0
    best = summary["min"] if name.endswith("_s") else summary["max"]
    return summary["median"] * scale, summary["stdev"] * scale, best * scale


def row(path: Path) -> list[str] | None:
    report = json.loads(path.read_text())
    cells = {(c["runtime"], c["scenario"]): c for c in report["cells"]
             if c.get("status") == "ok" and not c.get("engine_defaults")}  # fmt: skip
    if not all((engine, scenario) in cells for _, engine, scenario, *_ in TARGETS):
        return None  # a run of part of the targets (one engine, one scenario)
    created = datetime.fromisoformat(report["created"])
    rounds = report["settings"].get("rounds") or 1
    bandwidth = report["memory_bandwidth_bytes_per_s"].get("2")
    out = [
        f"{created:%m-%d %H:%M}",
        f"`{path.name}`",
        f"{rounds} × {cells['gguf', 'short']['repeat'] // rounds}",
        f"{bandwidth / 1e9:.1f}" if bandwidth else "–",
    ]
    for _, engine, scenario, name, target, higher in TARGETS:
        median, stdev, best = figure(cells[engine, scenario], name)
        met = median >= target if higher else median <= target
        if name.endswith("_s"):
            text = f"{median:.0f} ± {stdev:.0f} (best {best:.0f})"
        else:
            digits = 0 if target >= 100 else 1
            text = f"{median:.{digits}f} ± {stdev:.{digits}f}"
        out.append(f"**{text}**" if met else text)
    return out


def main(paths: list[Path]) -> None:
    rows = [r for r in (row(path) for path in paths) if r]
    rows.sort(key=lambda r: r[0])
    headers = ["finished (UTC)", "report", "rounds × repetitions", "read bandwidth, GB/s"] + [t[0] for t in TARGETS]
    print("| " + " | ".join(headers) + " |")
    print("| " + " | ".join("---" for _ in headers) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or sorted(HERE.glob("amx_targets*.json")))
