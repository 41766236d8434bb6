"""``qwenrt compare --ladder``: the write-up's optimisation steps, re-measured on this machine.

From the default transformers FP32 pipeline to an engine with a KV cache, then threads
set to the physical cores, then 8-bit weights, then OpenVINO generating two prompts at
once. Each step is one cell, run in its own process like every comparison cell.
"""

from __future__ import annotations

from pathlib import Path

from qwenrt.compare.measure import CellSpec
from qwenrt.errors import QwenrtError
from qwenrt.manifest import GGUF_KEY, artifact_files
from qwenrt.runtimes.threads import physical_cores

LADDER_DIR = "ladder"
# The write-up's steps are those of particular engines: the two it compares, and its starting point.
LADDER_RUNTIMES = ("gguf", "openvino", "transformers")


def ladder_specs(model_dir: Path, max_tokens: int, repeat: int, warmup: int) -> list[CellSpec]:
    cores = physical_cores()
    f16 = str(float_gguf(model_dir))
    common = {"model_dir": str(model_dir), "scenario": "short", "max_tokens": max_tokens, "repeat": repeat,
              "warmup": warmup}  # fmt: skip
    return [
        CellSpec(runtime="transformers", threads=cores, engine_defaults=True,
                 label="transformers FP32 generate, torch default threads", **common),
        CellSpec(runtime="gguf", threads=cores, engine_defaults=True, artifact=f16,
                 label="engine with KV cache — llama.cpp F16, its default threads", **common),
        CellSpec(runtime="gguf", threads=cores, artifact=f16,
                 label=f"threads = physical cores ({cores}) — llama.cpp F16", **common),
        CellSpec(runtime="gguf", threads=cores, label="8-bit weights — llama.cpp Q8_0", **common),
        CellSpec(runtime="openvino", threads=cores, label="8-bit weights — OpenVINO INT8, latency hint", **common),
        CellSpec(runtime="openvino", threads=cores, batch=2,
                 label="batch 2 — OpenVINO INT8, two prompts at once (aggregate)", **common),
    ]  # fmt: skip


def float_gguf(model_dir: Path) -> Path:
    """An F16 GGUF of the model's source checkpoint, made once beside its artifacts.

    qwenrt ships 8-bit artifacts; the ladder needs a float one to show what an engine
    gains before quantisation does.
    """
    from qwenrt.runtimes.hf_transformers import TransformersEngine

    gguf_files = artifact_files(model_dir, GGUF_KEY)
    if not gguf_files:
        raise QwenrtError(f"{model_dir}: the ladder needs the GGUF artifact; run 'qwenrt convert' first")
    target = Path(model_dir) / LADDER_DIR / gguf_files[0].name.replace("-q8_0.gguf", "-f16.gguf")
    if target.is_file():
        return target
    try:
        import gguf

        from qwenrt.convert.checkpoint import Checkpoint
        from qwenrt.convert.gguf_writer import write_gguf
    except ImportError:
        raise QwenrtError(
            "the ladder needs the convert extra (torch, transformers): pip install 'qwenrt[convert]'"
        ) from None
    checkpoint = Checkpoint.open(TransformersEngine.artifact_path(model_dir))
    target.parent.mkdir(exist_ok=True)
    partial = target.with_suffix(".partial")
    try:
        write_gguf(checkpoint, partial, gguf.GGMLQuantizationType.F16)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target
