"""Passes on onnxruntime's weight-only block nodes (``MatMulNBits``) after its quantizer wrote them."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


def set_accuracy_level(model: onnx.ModelProto, level: int) -> tuple[onnx.ModelProto, int]:
    """``accuracy_level`` on every MatMulNBits node that lacks it (onnxruntime's HQQ writes none,
    whatever it is asked), so that the option means the same for every method; how many were set."""
    missing = [n for n in model.graph.node if n.op_type == "MatMulNBits"
               and not any(a.name == "accuracy_level" for a in n.attribute)]
    for node in missing:
        node.attribute.append(helper.make_attribute("accuracy_level", level))
    return model, len(missing)


def replace_blocks(model: onnx.ModelProto, blocks: dict[str, tuple[np.ndarray, ...]]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Blocks fitted elsewhere (GPTQ's, a quantization-aware fine-tune's) in place of the ones
    onnxruntime's quantizer wrote, on each MatMulNBits whose weight ``blocks`` has (onnxruntime
    names a weight's blocks ``<weight>_Q4``).

    Args:
        model: The quantized graph.
        blocks: Float weight name -> ``(packed blocks, scales, zero points)`` in MatMulNBits'
            layout (`grids.gptq.pack_matmul_nbits`).

    Returns:
        The model and ``{"fitted": weights replaced, "left_to_rtn": block weights not in blocks}``.

    Raises:
        ValueError: blocks whose shapes are not onnxruntime's for that weight.
    """
    inits = {t.name: t for t in model.graph.initializer}
    done, missing = set(), set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[1].endswith("_Q4"):
            continue
        weight = node.input[1].removesuffix("_Q4")
        if weight not in blocks:
            missing.add(weight)
            continue
        if weight in done:
            continue
        for name, array in zip(node.input[1:4], blocks[weight]):
            if tuple(inits[name].dims) != array.shape:
                raise ValueError(f"blocks for {weight} have shape {array.shape}, onnxruntime's "
                                 f"{tuple(inits[name].dims)}")
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        done.add(weight)
    return model, {"fitted": len(done), "left_to_rtn": len(missing)}
