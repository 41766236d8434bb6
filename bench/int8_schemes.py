"""Which INT8 scheme for the OpenVINO weights: symmetric or not (per channel; nncf has no group-wise INT8).

Exports the demo checkpoint once per scheme (into the qwenrt cache, not the repo),
measures decode and first token with qwenrt compare's cells, and measures faithfulness
as the share of greedy tokens identical to the FP32 transformers baseline's on the
short and long scenarios. Writes bench/int8_schemes.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from qwenrt.compare.measure import CellSpec
from qwenrt.compare.report import ok_cells
from qwenrt.compare.runner import run_comparison
from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.openvino_int8 import Int8Scheme, export_openvino_int8
from qwenrt.paths import cache_root, default_model_dir
from qwenrt.runtimes.hf_transformers import TransformersEngine
from qwenrt.runtimes.threads import physical_cores

# nncf refuses group-wise INT8 ("INT8 modes require per-channel quantization"): per-channel only.
SCHEMES = [Int8Scheme(symmetric=False), Int8Scheme(symmetric=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    checkpoint = Checkpoint.open(TransformersEngine.artifact_path(args.model))
    work = cache_root() / "bench" / "int8-schemes"
    folders = {}
    for scheme in SCHEMES:
        folder = work / scheme.describe().replace(" ", "-")
        if not (folder / "openvino_model.xml").is_file():
            print(f"exporting {scheme.describe()}", file=sys.stderr)
            folder.mkdir(parents=True, exist_ok=True)
            export_openvino_int8(checkpoint, folder, scheme)
        folders[scheme.describe()] = folder
    threads = physical_cores()
    specs = []
    for scenario in ("short", "long"):
        specs.append(CellSpec(runtime="transformers", model_dir=str(args.model), threads=threads, scenario=scenario,
                              max_tokens=args.tokens, repeat=1, warmup=0, label="fp32"))  # fmt: skip
        specs += [
            CellSpec(runtime="openvino", model_dir=str(args.model), artifact=str(folder), threads=threads,
                     scenario=scenario, max_tokens=args.tokens, repeat=args.repeat, warmup=1, label=name)
            for name, folder in folders.items()
        ]  # fmt: skip
    report = run_comparison(specs, progress=lambda text: print(text, file=sys.stderr))
    reference = {c.scenario: c.token_ids for c in ok_cells(report) if c.label == "fp32"}
    rows, results = [], []
    for cell in ok_cells(report):
        if cell.label == "fp32" or cell.decode_tps is None:
            continue
        ref = reference[cell.scenario]
        same = sum(a == b for a, b in zip(cell.token_ids, ref, strict=False)) / len(ref)
        first = next((i for i, (a, b) in enumerate(zip(cell.token_ids, ref, strict=False)) if a != b), None)
        result = {
            "scheme": cell.label, "scenario": cell.scenario, "decode_tps": cell.decode_tps.median,
            "decode_stdev": cell.decode_tps.stdev, "first_token_ms": cell.first_token_s.median * 1000,
            "artifact_mb": cell.artifact_bytes / 1e6, "identical_to_fp32": same, "first_difference": first,
        }  # fmt: skip
        results.append(result)
        rows.append([result["scheme"], result["scenario"], f"{result['decode_tps']:.1f} ±{result['decode_stdev']:.1f}",
                     f"{result['first_token_ms']:.0f}", f"{result['artifact_mb']:.0f}", f"{same:.0%}",
                     first if first is not None else "–"])  # fmt: skip
    Path(__file__).with_name("int8_schemes.json").write_text(
        json.dumps({"environment": report["environment"], "results": results}, indent=2) + "\n"
    )
    print(tabulate(rows, headers=["scheme", "scenario", "decode tok/s", "first token ms", "IR MB",
                                  "greedy tokens = FP32", "first difference"], tablefmt="github"))  # fmt: skip


if __name__ == "__main__":
    main()
