"""The process that measures one cell: spec as JSON on stdin, JSON lines on stdout.

Running each cell in its own process keeps engines from inheriting each other's memory,
threads and caches, and a crash of one from ending the comparison (:mod:`qwenrt.child`).
"""

from __future__ import annotations

from typing import Any

from qwenrt.child import child_main
from qwenrt.compare.measure import CellSpec, run_cell


def _measure(request: dict[str, Any], progress: Any) -> dict[str, Any]:
    return run_cell(CellSpec(**request), progress=progress).to_json()


if __name__ == "__main__":
    child_main(_measure)
