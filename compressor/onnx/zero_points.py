"""Float zero points of int4 blocks on onnxruntime's fast path, as a block-sum offset.

HQQ (and any asymmetric grid whose offset is not a whole number of steps, such as GGUF's Q4_1)
gives each block a float zero point: ``w = scale * (q - zero)``. onnxruntime 1.32's CPU
``MatMulNBits`` runs float zero points off its int8 kernel, whatever the accuracy level: about
5x slower to decode (reports/bench_int4_methods.md). The same product splits exactly into the
symmetric blocks the fast kernel runs and one small float product::

    w = scale * (q - 2^(bits-1)) + scale * (2^(bits-1) - zero)
    x @ w^T = MatMulNBits(x, q, scale) + blocksum(x) @ offset^T

where ``offset = scale * (2^(bits-1) - zero)`` is one number per block (N x K / block_size) and
``blocksum(x)`` sums each block of ``x``'s K inputs (a MatMul with a 0/1 K x blocks matrix, so it
takes inputs of any rank). The offsets take the place of the zero points (as many numbers), the
block sums of an input are computed once for every projection that reads it, and one 0/1 matrix
serves every projection of the same K and block size. Exact in fp32; at accuracy level 4 the
symmetric part's activations are int8 as for RTN.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import ZERO_POINT_OFFSET, attribute, drop_unused_initializers

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def fold_float_zero_points(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Rewrite every ``MatMulNBits`` of ``model``'s main graph whose zero points are floats into
    the symmetric ``MatMulNBits`` plus a block-sum offset (module docstring); returns how many.

    The float zero points' initializers are removed when nothing else reads them.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    block_sums: dict[tuple[str, int, int], str] = {}  # (input, K, block size) -> its block sums
    ones: dict[tuple[int, int, str], str] = {}  # (K, block size, dtype) -> the 0/1 matrix
    nodes, added, folded = [], [], 0

    def fresh(name: str) -> str:
        out, i = name, 0
        while out in names:
            i += 1
            out = f"{name}_{i}"
        names.add(out)
        return out

    for node in graph.node:
        nodes.append(node)
        found = _float_zero_point_offsets(node, inits)
        if found is None:
            continue
        k, block, blocks, dtype, offsets = found
        x = node.input[0]
        sums = block_sums.get((x, k, block))
        if sums is None:
            key = (k, block, str(dtype))
            if key not in ones:
                matrix = np.zeros((k, blocks), dtype)
                matrix[np.arange(k), np.arange(k) // block] = 1
                ones[key] = fresh(f"block_ones_{k}_{block}")
                added.append(numpy_helper.from_array(matrix, ones[key]))
            sums = block_sums[(x, k, block)] = fresh(f"{x}_block_sums")
            nodes.append(helper.make_node("MatMul", [x, ones[key]], [sums], name=fresh(f"{node.name}_BlockSums"),
                                          doc_string=ZERO_POINT_OFFSET))
        offset_name = fresh(f"{node.input[1]}_zero_offsets")
        added.append(numpy_helper.from_array(offsets, offset_name))

        out = node.output[0]
        symmetric, offset_out = fresh(f"{out}_symmetric"), fresh(f"{out}_offset")
        node.output[0] = symmetric
        inputs = list(node.input)
        inputs[3] = ""  # absent: the symmetric zero point 2^(bits-1)
        while inputs and not inputs[-1]:
            inputs.pop()
        del node.input[:]
        node.input.extend(inputs)
        nodes.append(helper.make_node("MatMul", [sums, offset_name], [offset_out],
                                      name=fresh(f"{node.name}_ZeroOffset"), doc_string=ZERO_POINT_OFFSET))
        nodes.append(helper.make_node("Add", [symmetric, offset_out], [out], name=fresh(f"{node.name}_AddZeroOffset")))
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
        drop_unused_initializers(model)
    return model, folded


def _float_zero_point_offsets(node: onnx.NodeProto, inits: dict) -> tuple | None:
    """For a MatMulNBits with float zero points over contiguous blocks of K: ``(K, block size,
    blocks, dtype, the offsets (blocks, N))``; ``None`` for any other node."""
    if node.op_type != "MatMulNBits" or len(node.input) < 4 or node.input[3] not in inits \
            or node.input[2] not in inits:
        return None
    zero = inits[node.input[3]]
    # (blocks given by g_idx, or prepacked scales, are not contiguous blocks of K: left as they are)
    if zero.data_type not in FLOAT_TYPES or (len(node.input) > 4 and node.input[4]) \
            or attribute(node, "weight_prepacked", 0):
        return None
    k, n, bits, block = (attribute(node, "K"), attribute(node, "N"), attribute(node, "bits", 4),
                         attribute(node, "block_size"))
    blocks = -(-k // block)
    scales = numpy_helper.to_array(inits[node.input[2]])
    dtype = scales.dtype  # the input's type (zero points may be fp16 beside fp32 scales)
    scales = scales.astype(np.float32).reshape(n, blocks)
    zeros = numpy_helper.to_array(zero).astype(np.float32).reshape(n, blocks)
    return k, block, blocks, dtype, (scales * (2 ** (bits - 1) - zeros)).T.astype(dtype)  # (blocks, N)
