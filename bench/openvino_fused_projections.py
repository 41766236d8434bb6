"""What fusing a layer's sibling projections in the IR does to OpenVINO's decode:
BENCHMARKS.md's "Fused projections" table, bench/openvino_fused_projections.json.

The per-node profile (bench/openvino_profile.py) puts 1.45 ms of a 23.7 ms decode step in
the small q/k/v/o projections, whose fixed cost per node outweighs their weights, and
reads gate/up at 87-89 % of the bandwidth where the single large lm_head reaches 96 %.
The CPU plugin fuses q/k/v itself only on CPUs with AMX. qwenrt's pass
(qwenrt/convert/fused_projections.py) does it in the graph: the projections of a layer
that read the same activations become one INT8 matrix product over their stacked
weights, zero points, scales and biases, split afterwards.

Three IRs of the demo checkpoint: optimum-intel's export as it is, with q/k/v fused (what
`qwenrt convert` writes) and with gate/up fused as well; each at the plugin's default
inference precision and at f32. Each variant runs in a fresh process through qwenrt's
streaming path: the short chat prompt of `qwenrt compare`, 2 threads, prefix cache off,
128 greedy tokens, 1 warm-up and the median of 5; variants interleaved over 5 rounds,
since this host's speed drifts. The greedy tokens of every variant are compared with the
unfused IR's at the same precision.

    python bench/openvino_fused_projections.py
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from qwenrt.convert.fused_projections import ATTENTION_PROJECTIONS, FUSED_ATTENTION, fuse_projections

HERE = Path(__file__).parent
ROUNDS, WARMUP, REPEAT, NEW_TOKENS = 5, 1, 5, 128
# The plugin's default on a CPU with AVX512-BF16, like this one, is bf16; f32 is the
# default elsewhere.
PRECISIONS = {"plugin default (bf16 here)": {}, "f32": {"INFERENCE_PRECISION_HINT": "f32"}}
QKV = (ATTENTION_PROJECTIONS, FUSED_ATTENTION)
GATE_UP = (("gate_proj", "up_proj"), "gate_up_proj")
FUSED_GROUPS = {"qkv (qwenrt's default)": [QKV], "qkv+gate_up": [QKV, GATE_UP]}


def build(unfused: Path, target: Path, groups: list[tuple[tuple[str, ...], str]]) -> list[int]:
    """An OpenVINO folder at ``target``: ``unfused``'s, with each group of projections
    fused by qwenrt's own pass; how many layers each group was fused in."""
    import openvino as ov

    model = ov.Core().read_model(unfused / "openvino_model.xml")
    fused = [fuse_projections(model, names, fused_name) for names, fused_name in groups]
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for path in unfused.iterdir():
        if not path.name.startswith("openvino_model."):
            (partial / path.name).symlink_to(path.resolve())
    ov.save_model(model, partial / "openvino_model.xml", compress_to_fp16=False)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return fused


def measure(ir_dir: Path, properties: dict[str, Any]) -> dict[str, Any]:
    from openvino_settings import end_medians, engine_with, short_prompt_ends

    from qwenrt.compare.scenarios import scenario
    from qwenrt.runtimes import GenerationConfig, TokenEvent

    with engine_with(properties, ir_dir) as engine:
        _, ends = short_prompt_ends(engine, NEW_TOKENS, WARMUP, REPEAT)
        ids = engine.chat_prompt_ids(scenario("short").messages)
        greedy = engine.stream(ids, GenerationConfig(max_tokens=NEW_TOKENS, ignore_eos=True))
        tokens = [event.token_id for event in greedy if isinstance(event, TokenEvent) and event.token_id >= 0]
    return {**end_medians(ends), "tokens": tokens}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print(json.dumps(measure(Path(sys.argv[2]), json.loads(sys.argv[3]))))
        return
    from openvino_settings import interleaved_rounds

    from qwenrt.convert.checkpoint import Checkpoint
    from qwenrt.convert.openvino_int8 import export_openvino_int8
    from qwenrt.paths import cache_root, default_model_dir
    from qwenrt.runtimes.hf_transformers import TransformersEngine

    work = cache_root() / "bench" / "fused-projections"
    folders = {"unfused": work / "unfused"}
    if not (folders["unfused"] / "openvino_model.xml").is_file():
        print("exporting the demo checkpoint without fusion", file=sys.stderr)
        folders["unfused"].mkdir(parents=True, exist_ok=True)
        checkpoint = Checkpoint.open(TransformersEngine.artifact_path(default_model_dir()))
        export_openvino_int8(checkpoint, folders["unfused"], fuse_qkv=False)
    for name, groups in FUSED_GROUPS.items():
        folders[name] = work / name.split()[0].replace("+", "-")
        print(f"building {name}: layers fused {build(folders['unfused'], folders[name], groups)}", file=sys.stderr)
    variants = {(folder, precision): (folders[folder], properties)
                for precision, properties in PRECISIONS.items() for folder in folders}  # fmt: skip
    commands = {key: ([__file__, "--one", str(ir_dir), json.dumps(properties)], {})
                for key, (ir_dir, properties) in variants.items()}  # fmt: skip
    runs = interleaved_rounds(commands, ROUNDS)
    rows = []
    for (folder, precision), results in runs.items():
        tokens, reference = results[0]["tokens"], runs[("unfused", precision)][0]["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(tokens, reference, strict=True)) if a != b), len(reference))
        rows.append({
            "projections": folder,
            "inference_precision": precision,
            "decode_tokens_per_second_median": statistics.median(r["decode_tokens_per_second"] for r in results),
            "first_token_ms_median": statistics.median(r["first_token_ms_median"] for r in results),
            "leading_greedy_tokens_as_unfused": same,
            "of_tokens": len(reference),
            "tokens_deterministic": all(r["tokens"] == tokens for r in results),
            "runs": [{name: value for name, value in r.items() if name != "tokens"} for r in results],
        })  # fmt: skip
    (HERE / "openvino_fused_projections.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
