"""The process that measures one cell: spec as JSON on stdin, JSON lines on stdout.

Lines are ``{"progress": "..."}`` while it works, then one ``{"result": {...}}`` or
``{"error": "..."}``. Running each cell in its own process keeps engines from
inheriting each other's memory, threads and caches.
"""

from __future__ import annotations

import json
import signal
import sys

from qwenrt.compare.measure import CellSpec, run_cell
from qwenrt.errors import QwenrtError


def _emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    # Ctrl-C at the terminal reaches the whole process group; the comparison (the parent)
    # decides what it means: it stops this worker and reports the cells finished so far.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = CellSpec(**json.loads(sys.stdin.read()))
    try:
        result = run_cell(spec, progress=lambda text: _emit({"progress": text}))
    except QwenrtError as exc:
        _emit({"error": str(exc)})
        sys.exit(2)
    except Exception as exc:  # reported as the cell's failure; the comparison goes on
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    _emit({"result": result})


if __name__ == "__main__":
    main()
