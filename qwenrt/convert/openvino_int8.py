"""Export a Qwen2 checkpoint to an OpenVINO IR with INT8 weights and tokenizer IRs.

optimum-intel does the export (a stateful model: the KV cache lives inside the
IR), nncf compresses the weights, qwenrt fuses each layer's q, k and v projections
(fused_projections.py), and openvino-tokenizers writes the tokenizer and detokenizer
IRs that openvino-genai needs beside the model.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.fused_projections import FUSED_ATTENTION, fuse_projections
from qwenrt.errors import SourceError, WriteError

MODEL_XML = "openvino_model.xml"
TOKENIZER_XML = "openvino_tokenizer.xml"
DETOKENIZER_XML = "openvino_detokenizer.xml"
REQUIRED_FILES = [MODEL_XML, "openvino_model.bin", TOKENIZER_XML, DETOKENIZER_XML]


@dataclass(frozen=True)
class Int8Scheme:
    """nncf's INT8 weight compression, one scale per output channel.

    nncf 3.x refuses group-wise INT8 ("INT8 modes require per-channel quantization"), so
    the only choice left is symmetric or not; BENCHMARKS.md has the measurement behind
    the default.
    """

    symmetric: bool = False

    def describe(self) -> str:
        return f"int8 {'sym' if self.symmetric else 'asym'} per-channel"


@dataclass(frozen=True)
class OpenVINOExport:
    weight_types: dict[str, int]  # element types of the weight matrices, with counts
    fused_projections: dict[str, int]  # the fused projection's name: layers where it was fused


def export_openvino_int8(
    checkpoint: Checkpoint, out_dir: Path, scheme: Int8Scheme = Int8Scheme(), *, fuse_qkv: bool = True
) -> OpenVINOExport:
    """Write the IR and tokenizer IRs into ``out_dir``.

    ``fuse_qkv=False`` keeps optimum-intel's graph as it is, for the benchmark that
    measures the fusion.
    """
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
    from transformers import AutoTokenizer

    quantization = OVWeightQuantizationConfig(bits=8, sym=scheme.symmetric, group_size=-1)
    try:
        model = OVModelForCausalLM.from_pretrained(
            checkpoint.path, export=True, compile=False, quantization_config=quantization, local_files_only=True
        )
        fused = {FUSED_ATTENTION: fuse_projections(model.model)} if fuse_qkv else {}
        model.save_pretrained(out_dir)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        tokenizer.save_pretrained(out_dir)
        ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
        ov.save_model(ov_tokenizer, out_dir / TOKENIZER_XML)
        ov.save_model(ov_detokenizer, out_dir / DETOKENIZER_XML)
    except OSError as exc:
        if exc.errno is not None:
            raise  # a real I/O failure (a full disk, say): the conversion names it and the way out
        # transformers raises errno-less OSErrors for files it cannot find in the checkpoint.
        raise SourceError(f"{checkpoint.path}: OpenVINO export failed ({exc})") from None
    except (ValueError, KeyError) as exc:
        raise SourceError(f"{checkpoint.path}: OpenVINO export failed ({exc})") from None
    except RuntimeError as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        if "iostream" in first_line:
            # OpenVINO's serializer reports a failed write (a full disk) only as a stream error.
            raise WriteError(
                f"OpenVINO could not write the model ({first_line}); the partial work was removed: free some space "
                f"beside the model folder and in {tempfile.gettempdir()} (the export's scratch space), "
                "or choose another --out, then convert again"
            ) from None
        raise SourceError(f"{checkpoint.path}: OpenVINO export failed ({first_line})") from None
    missing = [name for name in REQUIRED_FILES if not (out_dir / name).is_file()]
    if missing:
        raise SourceError(f"OpenVINO export did not write {', '.join(missing)}")
    return OpenVINOExport(weight_types(out_dir / MODEL_XML), fused)


def weight_types(model_xml: Path) -> dict[str, int]:
    """Element types of the IR's weight matrices (constants of rank 2), with counts."""
    import openvino as ov

    model = ov.Core().read_model(model_xml)
    types: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and len(op.get_output_partial_shape(0)) == 2:
            shape = op.get_output_shape(0)
            if min(shape) > 1:  # scales and zero points are vectors
                types[op.get_output_element_type(0).get_type_name()] += 1
    return dict(types)
