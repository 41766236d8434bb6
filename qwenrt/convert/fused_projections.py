"""Fuse each layer's query, key and value projections into one INT8 matrix product.

A decode step runs every matrix product of the model once for a single token. The
three attention projections of a Qwen2.5-0.5B layer read the same activations but hold
well under a megabyte of INT8 weights each, so the CPU plugin's fixed cost per node (a
kernel call, a thread barrier, a reorder of the output) outweighs their reading:
k_proj and v_proj ran at a quarter of the memory bandwidth in the plugin's own profile
(BENCHMARKS.md). The plugin fuses them itself only on CPUs with AMX.

Here the graph does it once, at conversion: the stacked u8 weights, zero points, scales
and biases become one compressed MatMul whose output a VariadicSplit hands back to the
original consumers. Every output channel keeps its own weights, zero point and scale,
so the arithmetic is unchanged (bit-identical logits at f32 inference precision), and
decode and the first token come a little sooner (BENCHMARKS.md, "OpenVINO, fused q/k/v
projections"; bench/openvino_fused_projections.py).

Only compressed MatMuls of the form nncf writes are fused; anything else is left as it
was, so the pass can only fail to apply, never produce a different model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
FUSED_ATTENTION = "qkv_proj"


def _source(node: Any, index: int) -> Any:
    return node.input(index).get_source_output().get_node()


def _constant_data(node: Any) -> np.ndarray | None:
    return node.get_data() if node.get_type_name() == "Constant" else None


def _compressed_weight(matmul: Any) -> dict[str, Any] | None:
    """The parts of a MatMul's INT8 weight as nncf writes it, per output channel:
    [Convert ←] Multiply(Convert(w) [− Convert(zero point)], scale). None for anything else."""
    if matmul.get_attributes() != {"transpose_a": False, "transpose_b": True}:
        return None
    node, output_type = _source(matmul, 1), None
    if node.get_type_name() == "Convert":
        node, output_type = _source(node, 0), node.get_output_element_type(0)
    if node.get_type_name() != "Multiply":
        return None
    scale = _constant_data(_source(node, 1))
    centred = _source(node, 0)
    zero_point = None
    if centred.get_type_name() == "Subtract":
        zero_point_convert = _source(centred, 1)
        if zero_point_convert.get_type_name() != "Convert":
            return None
        zero_point = _constant_data(_source(zero_point_convert, 0))
        if zero_point is None:
            return None
        centred = _source(centred, 0)
    if centred.get_type_name() != "Convert" or scale is None:
        return None
    weight = _constant_data(_source(centred, 0))
    if weight is None or weight.ndim != 2 or scale.shape != (weight.shape[0], 1):
        return None
    if zero_point is not None and zero_point.shape != (weight.shape[0], 1):
        return None
    return {
        "weight": weight, "zero_point": zero_point, "scale": scale,
        "compute_type": centred.get_output_element_type(0), "output_type": output_type,
    }  # fmt: skip


def _layout(part: dict[str, Any]) -> tuple[Any, ...]:
    """What must be alike for weights to be stacked: the element types, and whether a zero point is there."""
    zero_point = part["zero_point"]
    return (part["weight"].dtype, part["scale"].dtype, None if zero_point is None else zero_point.dtype,
            str(part["compute_type"]), str(part["output_type"]))  # fmt: skip


def _bias(matmul: Any) -> tuple[Any, np.ndarray] | None:
    """The Add of a constant bias that is the MatMul's only consumer, and the bias."""
    consumers = [target.get_node() for target in matmul.output(0).get_target_inputs()]
    if len(consumers) != 1 or consumers[0].get_type_name() != "Add":
        return None
    bias = _constant_data(_source(consumers[0], 1))
    return (consumers[0], bias) if bias is not None and bias.shape[-1] == bias.size else None


def _fuse(members: list[Any], parts: list[dict[str, Any]], fused_name: str, names: tuple[str, ...]) -> bool:
    import openvino.opset13 as ops

    first = parts[0]
    if len({_layout(part) for part in parts}) != 1:
        return False  # stacking weights of other element types would convert them
    found = [_bias(member) for member in members]
    biases = [bias for bias in found if bias is not None]
    if biases and len(biases) != len(members):
        return False

    weight = ops.convert(ops.constant(np.concatenate([part["weight"] for part in parts])), first["compute_type"])
    if first["zero_point"] is not None:
        zero_point = np.concatenate([part["zero_point"] for part in parts])
        weight = ops.subtract(weight, ops.convert(ops.constant(zero_point), first["compute_type"]))
    weight = ops.multiply(weight, ops.constant(np.concatenate([part["scale"] for part in parts])))
    if first["output_type"] is not None:
        weight = ops.convert(weight, first["output_type"])
    name = members[0].get_friendly_name().replace(names[0], fused_name)
    product = ops.matmul(members[0].input(0).get_source_output(), weight, False, True, name=name)
    tails = members
    if biases:
        bias = ops.constant(np.concatenate([values.reshape(-1) for _, values in biases]))
        product = ops.add(product, bias, name=biases[0][0].get_friendly_name().replace(names[0], fused_name))
        tails = [add for add, _ in biases]
    lengths = np.array([part["weight"].shape[0] for part in parts], np.int64)
    split = ops.variadic_split(product, ops.constant(np.int64(-1)), ops.constant(lengths), name=f"{name}/split")
    for index, tail in enumerate(tails):
        tail.output(0).replace(split.output(index))
    return True


def fuse_projections(model: Any, names: tuple[str, ...] = ATTENTION_PROJECTIONS,
                     fused_name: str = FUSED_ATTENTION) -> int:  # fmt: skip
    """Fuse, in place, each set of INT8 MatMuls named ``names`` (one of each, in that order in
    the fused output) that read the same input; returns how many sets were fused."""
    sets: dict[tuple[str, int], dict[str, Any]] = defaultdict(dict)
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul":
            continue
        name = next((name for name in names if f".{name}/" in node.get_friendly_name()), None)
        if name is not None:
            source = node.input(0).get_source_output()
            sets[(source.get_node().get_name(), source.get_index())][name] = node
    fused = 0
    for by_name in sets.values():
        if set(by_name) != set(names):
            continue
        members = [by_name[name] for name in names]
        parts = [part for part in map(_compressed_weight, members) if part is not None]
        if len(parts) == len(members) and _fuse(members, parts, fused_name, names):
            fused += 1
    if fused:
        model.validate_nodes_and_infer_types()
    return fused
