"""`qwenrt tune` against an exhaustive sweep of the same settings, and against the engines' own defaults.

For each engine, on the demo model, in one run:
1. `qwenrt tune`'s search (its time is the "5 minutes on 2 cores" target);
2. every combination of the same settings (threads x each knob's candidates), each in a
   process of its own, measured the same way (interleaved rounds);
3. a final head-to-head, interleaved: tune's choice, the sweep's best, and the engine
   exactly as its library opens it; the targets are read from these rounds only, since
   the sweep takes long enough for the host to drift.

Writes bench/tune_sweep.json and bench/tune_sweep.md (about 25 minutes on 2 cores).

    .venv/bin/python bench/tune_sweep.py [--runtimes gguf,openvino] [--rounds 2] [--final-rounds 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwenrt.compare.ceiling import memory_bandwidth
from qwenrt.host import this_host
from qwenrt.paths import default_model_dir
from qwenrt.runtimes import engine_class
from qwenrt.runtimes.probe import ProbeRecord
from qwenrt.tune.search import ENGINE_DEFAULTS, OBJECTIVES, _WorkerPool, plan, starting_config, tune_engine

HERE = Path(__file__).parent


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sweep(engine_name: str, model_dir: Path, objective: Any, rounds: int) -> dict[str, Any]:
    engine = engine_class(engine_name)
    start, key = starting_config(engine, model_dir)
    log(f"{engine_name}: qwenrt tune")
    tuned = tune_engine(engine, model_dir, objective, rounds=rounds, progress=log)
    steps = plan(engine, objective)
    names = [name for name, _ in steps]
    configs = [{**start, **dict(zip(names, values, strict=True))}
               for values in itertools.product(*(values for _, values in steps))]  # fmt: skip
    log(f"{engine_name}: sweep of {len(configs)} combinations")
    pool = _WorkerPool(engine, model_dir, objective, key, ProbeRecord(key), log)
    started = time.monotonic()
    try:
        # A few combinations at a time, each group with the start measured in the same rounds:
        # a combination's score is its gain over the start, so the host's drift over the
        # sweep's minutes does not decide the best.
        others = [config for config in configs if config != start]
        measured, gains = [], []
        for index in range(0, len(others), GROUP):
            candidates = pool.run([start, *others[index : index + GROUP]], rounds, f"{engine_name} sweep")
            reference = candidates[0]
            if index == 0:
                measured.append(reference)
                gains.append(0.0)
            for candidate in candidates[1:]:
                measured.append(candidate)
                ok = candidate.median is not None and reference.median is not None
                gains.append(objective.gain(candidate.median, reference.median) if ok else None)
            pool.keep_only(start)
        sweep_seconds = time.monotonic() - started
        scored = [(gain, c) for gain, c in zip(gains, measured, strict=True) if gain is not None]
        best = max(scored, key=lambda pair: pair[0])[1]
        log(f"{engine_name}: head to head")
        wanted = [tuned.winner, best.config, ENGINE_DEFAULTS]
        distinct = [config for i, config in enumerate(wanted) if config not in wanted[:i]]
        final = pool.run(distinct, FINAL_ROUNDS, f"{engine_name} final")
    finally:
        pool.close()
    tuned_final, best_final, defaults_final = (final[distinct.index(config)] for config in wanted)
    combinations = [c.describe() | {"gain_over_start": g} for c, g in zip(measured, gains, strict=True)]
    return {
        "engine": engine_name,
        "engine_build": key.engine_build,
        "tune": tuned.describe(),
        "sweep": {"seconds": round(sweep_seconds, 1), "best": best.config, "combinations": combinations},
        "final": {"rounds": FINAL_ROUNDS, "tuned": tuned_final.describe(), "sweep_best": best_final.describe(),
                  "engine_defaults": defaults_final.describe(),
                  "tuned_vs_best": objective.gain(tuned_final.median, best_final.median),
                  "tuned_vs_engine_defaults": objective.gain(tuned_final.median, defaults_final.median)},
    }  # fmt: skip


def markdown(document: dict[str, Any]) -> str:
    host = document["host"]
    objective = OBJECTIVES[document["objective"]]
    lines = [
        "# qwenrt tune against an exhaustive sweep",
        "",
        f"- host: {host['cpu']} ({', '.join(host['features'])}), {host['physical_cores']} physical cores, "
        f"kernel {host['kernel']}; memory read bandwidth {document['bandwidth_gbps']:.1f} GB/s with "
        f"{host['physical_cores']} threads; {document['created']}",
        f"- objective: {objective.description} ({objective.unit}, "
        f"{'higher' if objective.higher_is_better else 'lower'} is better); tune and sweep "
        f"{document['rounds']} interleaved rounds, head to head {document['final_rounds']}",
        "",
        "| engine | tune took | tune's choice | sweep's best (of N) | head to head: tuned / sweep best / engine "
        "defaults (median) | tuned vs sweep best | tuned vs engine defaults |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in document["engines"]:
        final = entry["final"]
        figures = " / ".join(f"{final[k]['median']:.3g}" if final[k]["median"] is not None else "failed"
                             for k in ("tuned", "sweep_best", "engine_defaults"))  # fmt: skip
        lines.append(
            f"| {entry['engine']} | {entry['tune']['seconds']:.0f} s | {_config(entry['tune']['winner'])} | "
            f"{_config(entry['sweep']['best'])} (of {len(entry['sweep']['combinations'])}) | {figures} | "
            f"{final['tuned_vs_best']:+.1%} | {final['tuned_vs_engine_defaults']:+.1%} |"
        )
    lines += [
        "",
        "Every combination of the sweep: the median of its rounds, and its gain over the start measured in "
        "the same rounds (the JSON has each round):",
        "",
    ]
    for entry in document["engines"]:
        lines += [f"## {entry['engine']} ({entry['engine_build']})", "",
                  "| combination | median | gain over the start |", "| --- | --- | --- |"]  # fmt: skip
        for combination in entry["sweep"]["combinations"]:
            figure = f"{combination['median']:.3g}" if combination["median"] is not None else (
                f"failed: {combination['signal'] or (combination['failed'] or '')[:80]}")  # fmt: skip
            gain = combination["gain_over_start"]
            lines.append(f"| {_config(combination['config'])} | {figure} | {'–' if gain is None else f'{gain:+.1%}'} |")
        lines.append("")
    return "\n".join(lines)


def _config(config: dict[str, Any]) -> str:
    if config.get("engine_defaults"):
        return "engine defaults"
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in config.items())


FINAL_ROUNDS = 5
GROUP = 7  # combinations measured together with the start


def main() -> None:
    global FINAL_ROUNDS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--runtimes", default="gguf,openvino")
    parser.add_argument("--objective", default="end-to-end", choices=sorted(OBJECTIVES))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--final-rounds", type=int, default=FINAL_ROUNDS)
    parser.add_argument("--out", type=Path, default=HERE / "tune_sweep.json")
    args = parser.parse_args()
    FINAL_ROUNDS = args.final_rounds
    host = this_host()
    objective = OBJECTIVES[args.objective]
    document = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": host.describe(),
        "bandwidth_gbps": memory_bandwidth(host.physical_cores) / 1e9,
        "objective": objective.name,
        "rounds": args.rounds,
        "final_rounds": args.final_rounds,
        "engines": [sweep(name, args.model, objective, args.rounds) for name in args.runtimes.split(",")],
    }
    document["median_of_medians"] = {
        e["engine"]: statistics.median([c["median"] for c in e["sweep"]["combinations"] if c["median"] is not None])
        for e in document["engines"]
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(document) + "\n")
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
