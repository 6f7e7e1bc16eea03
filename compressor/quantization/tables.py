"""Embedding tables and output heads as weight-only blocks, for int4 exports.

A language model's vocabulary matrix is its largest: 49,152 x 576 in SmolLM2-135M, a fifth of the
parameters, and most small decoders tie it, using the one matrix for the lookup of the input
tokens and for the output head. The exporter writes it twice (a ``Gather`` table and a ``MatMul``
weight, transposed) and onnxruntime's quantizers keep both: int8 with one scale for the whole
tensor each, 57 MB of a 108 MB file for SmolLM2 with 8 of its 30 blocks dropped. Here the matrix is
quantized once, in blocks along the hidden dimension with one scale each (symmetric, as
``MatMulNBits`` reads them by default), and both uses read those same bytes: the head through
``MatMulNBits`` (N = vocabulary, K = hidden: its weight layout is the table's own rows), the
lookup through ``GatherBlockQuantized`` (onnxruntime's block-quantized Gather, which dequantizes
only the rows it gathers). A table nothing ties to a head gets the same blocks, read by its own
``GatherBlockQuantized``.

The head's activations stay in the precision ``accuracy_level`` gives every MatMulNBits, not
the one scale per call that dynamic int8 gives them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..onnx_graph import attribute, drop_unused_initializers, read_values, runtime_schema

#: Bits a table or head may be stored in: what both MatMulNBits and GatherBlockQuantized read.
TABLE_BITS = (4, 8)


def supported() -> bool:
    """Whether this onnxruntime's GatherBlockQuantized reads uint8 blocks with a ``bits``
    attribute (older versions take only the int4 types, which need opset 21)."""
    schema = runtime_schema("GatherBlockQuantized")
    return schema is not None and "bits" in schema.attributes


def quantize_rows(rows: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of ``rows`` (N x K, K a multiple of ``block_size``) in blocks
    along K: ``(packed blocks (N, K / block_size, block_size * bits / 8) uint8, scales
    (N, K / block_size) float32, the dequantized rows)``. Codes are offset by 2^(bits-1), the
    zero point both operators assume when none is given; the scale maps a block's largest
    magnitude to 2^(bits-1) - 1."""
    n, k = rows.shape
    half = 2 ** (bits - 1)
    blocks = rows.astype(np.float32).reshape(n, k // block_size, block_size)
    peak = np.abs(blocks).max(axis=-1)
    scales = np.where(peak > 0, peak / (half - 1), 1.0).astype(np.float32)
    codes = (np.clip(np.rint(blocks / scales[..., None]), -half, half - 1) + half).astype(np.uint8)
    dequantized = ((codes.astype(np.float32) - half) * scales[..., None]).reshape(n, k)
    if bits == 4:  # two codes a byte, the first in the low half
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scales, dequantized


def block_quantize_tables(model: onnx.ModelProto, *, bits: int, block_size: int, accuracy_level: int,
                          heads: set[str] | None = None) -> dict[str, Any]:
    """Store ``model``'s embedding tables and output heads as ``bits``-bit blocks, in place.

    Args:
        model: The graph, changed in place.
        bits: 4 or 8.
        block_size: Weights per scale along the hidden dimension.
        accuracy_level: The heads' MatMulNBits ``accuracy_level``.
        heads: Names of the MatMul nodes that are output heads (those that write a graph
            output); a MatMul whose weight equals a table's transpose is a tied head too. ``None``:
            the tables only.

    A head whose weight is the transpose of a table (tied) and that table share one set of
    blocks. Left as they are (the int8 path takes them): tables and heads whose hidden size is
    not a whole number of blocks, Gathers on another axis, non-fp32 weights, and a weight that
    some other node reads too (replacing it would store it twice).
    Returns what was done: tables, lookups, heads and tied pairs stored as blocks.
    """
    inits = {t.name: t for t in model.graph.initializer}
    floats = onnx.TensorProto.FLOAT
    # how many nodes read each value (a node's subgraphs included: such a reader is never replaced)
    readers = Counter(name for node in model.graph.node for name in read_values([node]))

    def fits(name: str, hidden_axis: int) -> bool:
        t = inits.get(name)
        return t is not None and t.data_type == floats and len(t.dims) == 2 and t.dims[hidden_axis] % block_size == 0

    gathers = [n for n in model.graph.node if n.op_type == "Gather" and attribute(n, "axis", 0) == 0 and fits(n.input[0], 1)]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.output and fits(n.input[1], 0)]
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    table_of = {}  # a tied head's weight -> the table it is the transpose of
    if heads is not None:
        shapes: dict[tuple, list[str]] = {}  # GPT-2's token and position tables can have one shape
        for g in gathers:
            if g.input[0] not in shapes.setdefault(tuple(inits[g.input[0]].dims), []):
                shapes[tuple(inits[g.input[0]].dims)].append(g.input[0])
        for node in matmuls:
            weight = node.input[1]
            for table in shapes.get(tuple(inits[weight].dims)[::-1], []):
                if weight != table and weight not in table_of and np.array_equal(array(table), array(weight).T):
                    table_of[weight] = table
    head_nodes = [n for n in matmuls if heads is not None and (n.name in heads or n.input[1] in table_of)]
    # one initializer both gathered and multiplied by is left alone (its rows and its columns
    # would need blocks of their own), and a weight is replaced only when every node that reads
    # it is: otherwise its float copy would stay beside the blocks
    looked_up = {g.input[0] for g in gathers}
    head_nodes = [n for n in head_nodes if n.input[1] not in looked_up]
    users = Counter(g.input[0] for g in gathers) + Counter(n.input[1] for n in head_nodes)
    whole = {name for name, count in users.items() if count == readers[name]}
    tables = [g for g in gathers if g.input[0] in whole]
    kept_tables = {g.input[0] for g in tables}
    head_nodes = [n for n in head_nodes if n.input[1] in whole and (n.input[1] not in table_of
                                                                     or table_of[n.input[1]] in kept_tables)]

    # one set of blocks per distinct matrix, keyed by (initializer, whether its rows are the transpose)
    stored: dict[tuple[str, bool], tuple[str, str, int, int]] = {}  # -> (blocks, scales, rows, hidden)
    new_inits, replaced = [], {}  # a replaced node's first output -> the nodes in its place
    tied = 0

    def blocks_for(name: str, transposed: bool) -> tuple[str, str, int, int]:
        key = (name, transposed)
        if key not in stored:
            rows = array(name).T if transposed else array(name)
            codes, scales, _ = quantize_rows(rows, bits, block_size)
            base = f"{name}_B{bits}{'T' if transposed else ''}"
            new_inits.extend([numpy_helper.from_array(codes, base), numpy_helper.from_array(scales, f"{base}_scale")])
            stored[key] = (base, f"{base}_scale", rows.shape[0], rows.shape[1])
        return stored[key]

    for head in head_nodes:
        weight = head.input[1]
        rows_of = table_of.get(weight)
        tied += rows_of is not None
        blob, scale, n, k = blocks_for(rows_of, False) if rows_of else blocks_for(weight, True)
        replaced[head.output[0]] = [helper.make_node(
            "MatMulNBits", [head.input[0], blob, scale], list(head.output), name=f"{head.name}_Q{bits}",
            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)]
    reshaped: set[str] = set()  # scales already given the blocks' rank (one Reshape per matrix)
    for table in tables:
        blob, scale, n, k = blocks_for(table.input[0], False)
        base = table.output[0]
        names = {s: f"{base}/{s}" for s in ("index_shape", "out_shape", "blocks")}
        lookup = []
        if scale not in reshaped:
            # GatherBlockQuantized's scales have the blocks' rank; onnxruntime folds this Reshape at load
            new_inits.extend([numpy_helper.from_array(np.array([n, k // block_size, 1], dtype=np.int64), f"{scale}/shape3"),
                              numpy_helper.from_array(np.array([k], dtype=np.int64), f"{scale}/hidden")])
            lookup.append(helper.make_node("Reshape", [scale, f"{scale}/shape3"], [f"{scale}/3d"], name=f"{scale}/3d"))
            reshaped.add(scale)
        replaced[table.output[0]] = lookup + [
            helper.make_node("GatherBlockQuantized", [blob, table.input[1], f"{scale}/3d"], [names["blocks"]],
                             name=f"{base}_Q{bits}", domain="com.microsoft", bits=bits, block_size=block_size,
                             gather_axis=0, quantize_axis=2),
            helper.make_node("Shape", [table.input[1]], [names["index_shape"]], name=names["index_shape"]),
            helper.make_node("Concat", [names["index_shape"], f"{scale}/hidden"], [names["out_shape"]],
                             name=names["out_shape"], axis=0),
            helper.make_node("Reshape", [names["blocks"], names["out_shape"]], list(table.output), name=f"{base}/rows"),
        ]
    if not replaced:
        return {}
    nodes = []
    for node in model.graph.node:
        nodes.extend(replaced.get(node.output[0] if node.output else None, [node]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    drop_unused_initializers(model)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"bits": bits, "block_size": block_size, "tables": len({t.input[0] for t in tables}), "lookups": len(tables),
            "heads": len(head_nodes), "tied": tied,
            "stored_matrices": len(stored),
            "operators": dict(Counter(n.op_type for ns in replaced.values() for n in ns
                                      if n.op_type in ("MatMulNBits", "GatherBlockQuantized")))}
