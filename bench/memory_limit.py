"""How each engine runs when the box has less memory than its peak: BENCHMARKS.md's
"Under a memory limit" table, bench/memory_limit.json.

Each run copies the demo model afresh and answers one chat prompt (64 tokens, 2
threads) inside a cgroup (v1 memory controller) with a memory limit. The copy is made
inside the cgroup so that its page cache is charged there: the engines map their
artifact, and what is measured is how they fare when the kernel must take mapped pages
back. Needs root and a writable /sys/fs/cgroup/memory.

    python bench/memory_limit.py
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from qwenrt.paths import default_model_dir

HERE = Path(__file__).parent
CGROUP = Path("/sys/fs/cgroup/memory/qwenrt-bench")
COPY = Path("/tmp/qwenrt-memory-limit-model")
LIMITS_MB = {"openvino": [None, 1000, 900, 800, 700], "gguf": [None, 900, 800, 700]}
REPEAT = 3  # single one-shot runs vary by 10 %: each limit is run three times, interleaved
STATS = re.compile(r"first token (\d+) ms · ([\d.]+) tok/s")


def in_cgroup(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` as a member of the cgroup (it joins before exec)."""
    joined = f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"'
    return subprocess.run(["bash", "-c", joined, "bash", *command], capture_output=True, text=True)


def run(runtime: str, limit_mb: int | None) -> dict[str, object]:
    shutil.rmtree(COPY, ignore_errors=True)
    (CGROUP / "memory.limit_in_bytes").write_text("-1")
    in_cgroup(["cp", "-r", str(default_model_dir()), str(COPY)]).check_returncode()
    shutil.rmtree(COPY / "ladder", ignore_errors=True)
    subprocess.run(["sync"], check=True)
    if limit_mb is not None:
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit_mb * 1024 * 1024))
    chat = [sys.executable, "-m", "qwenrt.cli", "chat", "--runtime", runtime, "--model", str(COPY), "--threads", "2",
            "--stats", "--max-tokens", "64", "-p", "Write a Python quicksort function"]  # fmt: skip
    done = in_cgroup(chat)
    stats = STATS.search(done.stderr + done.stdout)
    return {
        "runtime": runtime,
        "limit_mb": limit_mb,
        "exit_code": done.returncode,
        "first_token_ms": int(stats.group(1)) if stats else None,
        "decode_tokens_per_second": float(stats.group(2)) if stats else None,
    }


def main() -> None:
    try:
        CGROUP.mkdir(exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"cannot make a cgroup at {CGROUP}: {exc.strerror} (needs root, cgroup v1 memory)") from None
    try:
        rows = [run(runtime, limit) for _ in range(REPEAT) for runtime, limits in LIMITS_MB.items() for limit in limits]
    finally:
        shutil.rmtree(COPY, ignore_errors=True)
        (CGROUP / "memory.limit_in_bytes").write_text("-1")
    for row in rows:
        print(row, file=sys.stderr)
    summary = []
    for runtime, limits in LIMITS_MB.items():
        for limit in limits:
            runs = [r for r in rows if r["runtime"] == runtime and r["limit_mb"] == limit]
            speeds = [r["decode_tokens_per_second"] for r in runs if r["decode_tokens_per_second"] is not None]
            median = statistics.median(speeds) if speeds else None
            summary.append({"runtime": runtime, "limit_mb": limit, "completed": len(speeds), "of": len(runs),
                            "decode_tokens_per_second_median": median})  # fmt: skip
            print(summary[-1])
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "summary": summary, "rows": rows}
    (HERE / "memory_limit.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
