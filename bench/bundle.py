"""qwenrt bundle's targets: the bundle's size, the offline install's time, and the portable llama.cpp
against the native build, on the demo model. Results: bench/bundle.json and bench/bundle.md.

    python bench/bundle.py [--rounds 5]     # as root (unshare --net); about 10 minutes once the
                                             # portable wheel is cached

1. ``qwenrt bundle`` of the demo model (the portable wheel from the cache).
2. ``install.sh`` into a fresh folder in a network namespace with no network (nothing but
   loopback), timed as a user would see it: checking every sha256, pip, copying the model
   and running both engines once.
3. llama.cpp, native (this checkout's .venv) against portable (the installed bundle),
   interleaved round by round, each measurement in a fresh process: a 512-token prompt
   (prefill) and 128 greedy tokens (decode), best of 3 in a process, as llama-bench's
   pp512/tg128 do; 2 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS, NEW_TOKENS, THREADS = 512, 128, 2


def measure_llama(model: Path) -> dict:
    """In this process: which CPU backend, prefill and decode tokens/s (best of 3)."""
    import llama_cpp
    from llama_cpp import Llama
    from tune_engines import llama_prefill_decode

    from qwenrt.manifest import GGUF_KEY, artifact_files
    from qwenrt.runtimes.llamacpp import cpu_backend_variant, load_cpu_backend

    load_cpu_backend()
    path = artifact_files(model, GGUF_KEY)[0]
    llm = Llama(str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, verbose=False)
    best = llama_prefill_decode(llm, PROMPT_TOKENS, NEW_TOKENS)
    return {"build": llama_cpp.__version__, "cpu_backend": cpu_backend_variant() or "linked in (native)",
            "prefill_tps": round(best[0], 1), "decode_tps": round(best[1], 2)}  # fmt: skip


def offline(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--net", "bash", "-c", 'ip link set lo up; exec "$@"', "offline", *command],
                          capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "QWENRT_HOME"})  # fmt: skip


def host() -> dict:
    from qwenrt.host import this_host

    facts = this_host()
    flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if facts.has(flag)]
    return {"cpu": facts.cpu, "flags": flags, "threads": THREADS, "kernel": platform.release()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--one", type=Path, help="measure llama.cpp on this model folder, in this process")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_llama(args.one)))
        return
    from qwenrt.paths import default_model_dir

    model = default_model_dir()
    results: dict = {"host": host(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="qwenrt-bench-bundle-") as work:
        out, prefix = Path(work) / "demo-bundle", Path(work) / "installed"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "qwenrt.cli", "bundle", "--model", str(model), "--out", str(out)],
                       check=True)  # fmt: skip
        info = json.loads((out / "bundle.json").read_text())
        wheel_bytes = sum(wheel["size"] for wheel in info["wheels"])
        model_bytes = sum(f.stat().st_size for f in (out / "model").rglob("*") if f.is_file())
        results["bundle"] = {"seconds": round(time.perf_counter() - started, 1), "model_mb": round(model_bytes / 1e6),
                             "wheels_mb": round(wheel_bytes / 1e6), "wheels": len(info["wheels"]),
                             "largest": sorted(((w["name"], round(w["size"] / 1e6, 1)) for w in info["wheels"]),
                                               key=lambda pair: -pair[1])[:5],
                             "left_out": sorted(info["left_out"])}  # fmt: skip
        started = time.perf_counter()
        installed = offline(["bash", str(out / "install.sh"), str(prefix)])
        if installed.returncode != 0:
            raise SystemExit(installed.stdout + installed.stderr)
        results["install_offline_s"] = round(time.perf_counter() - started, 1)
        pythons = {"native": REPO / ".venv" / "bin" / "python", "portable": prefix / "bin" / "python"}
        rounds = []
        for number in range(1, args.rounds + 1):
            row = {}
            for build, python in pythons.items():
                measured = subprocess.run([str(python), __file__, "--one", str(model)], capture_output=True, text=True,
                                          check=True, cwd=REPO if build == "native" else work)  # fmt: skip
                row[build] = json.loads(measured.stdout.strip().splitlines()[-1])
            rounds.append(row)
            print(f"round {number}: " + ", ".join(f"{b} {m['prefill_tps']} / {m['decode_tps']} tok/s"
                                                 for b, m in row.items()), file=sys.stderr)  # fmt: skip
    summary = {}
    for figure in ("prefill_tps", "decode_tps"):
        medians = {build: statistics.median(row[build][figure] for row in rounds) for build in pythons}
        summary[figure] = {**medians, "portable_vs_native": round(medians["portable"] / medians["native"], 3)}
    results.update(rounds=rounds, summary=summary)
    (REPO / "bench" / "bundle.json").write_text(json.dumps(results, indent=2) + "\n")
    (REPO / "bench" / "bundle.md").write_text(render(results))
    print(render(results))


def render(results: dict) -> str:
    bundle, summary = results["bundle"], results["summary"]
    backends = {build: results["rounds"][0][build]["cpu_backend"] for build in ("native", "portable")}
    largest = ", ".join(f"{name} {size} MB" for name, size in bundle["largest"])
    lines = [
        f"Host: {results['host']['cpu']} ({', '.join(results['host']['flags'])}), {results['date']}, "
        f"{results['host']['threads']} threads, demo model.",
        "",
        f"- Bundle: {bundle['model_mb'] + bundle['wheels_mb']} MB (model {bundle['model_mb']} MB, "
        f"{bundle['wheels']} wheels {bundle['wheels_mb']} MB; largest {largest}), "
        f"made in {bundle['seconds']} s.",
        f"- Install with no network (sha256 checks, pip, model copy, both engines probed): "
        f"{results['install_offline_s']} s.",
        f"- llama.cpp CPU backend: native {backends['native']}, portable {backends['portable']}.",
        "",
        "| llama.cpp | native | portable | portable / native |",
        "| --- | --- | --- | --- |",
    ]
    for figure, label in (("prefill_tps", f"prefill, {PROMPT_TOKENS} tokens (tok/s)"),
                          ("decode_tps", f"decode, {NEW_TOKENS} tokens (tok/s)")):  # fmt: skip
        row = summary[figure]
        lines.append(f"| {label} | {row['native']:.1f} | {row['portable']:.1f} | {row['portable_vs_native']:.3f} |")
    lines.append(f"\nMedians of {len(results['rounds'])} interleaved rounds, each the best of 3 in a fresh process.\n")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
