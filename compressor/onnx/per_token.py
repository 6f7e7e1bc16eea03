"""Per-token activation ranges for dynamic int8 (``compress export --quantize int8 --per-token``).

onnxruntime's dynamic int8 rounds each projection's input with one scale and zero point for the
whole tensor, from its minimum and maximum (``DynamicQuantizeLinear``): one range for every
token of every text in the batch. A few tokens with large activations (the separator, a
punctuation mark: Bondarenko et al., 2021) set the step for all the others, and a text's
embedding depends on the texts it happens to be batched with. Token-wise ranges (ZeroQuant, Yao
et al., 2022; LLM.int8(), Dettmers et al., 2022) give each row its own scale. They apply to the
products of an activation and a weight; ``QAttention`` (onnxruntime's fused int8 attention)
takes one input scale, and the attention scores of an unfused graph (two activations
multiplied) keep the quantizer's one range per tensor, so the batch still matters, less.

onnxruntime's ``MatMulInteger`` takes one zero point for its whole input, so the rows are
rounded symmetrically: each row's scale is its largest magnitude over 127, around the one zero
point 128 (``QuantizeLinear`` along the rows of the input seen as a matrix), and the row's scale
multiplies the product's row afterwards::

    DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)
    becomes
    Reshape(x, [-1, K]) -> ReduceMax / ReduceMin -> s = max|row| / 127
    QuantizeLinear(x, s, 128, axis 0) -> MatMulInteger(zero point 128) -> Cast -> Mul(w_scale)
    -> Mul(s per row) -> Reshape(back to x's leading dimensions)

In a graph that already holds onnxruntime's contrib operators (the O2-fused one, block tables),
``MatMulInteger -> Cast -> Mul(w_scale)`` is one ``MatMulIntegerToFloat`` (scale 1 for the
input, whose rows are scaled after): a third less extra time on the demo's MiniLM, whose graph
keeps only standard operators otherwise.

The weights, their per-channel scales and their sharing are untouched: only how the input is
rounded changes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import consumers as readers
from .graph import in_scopes, initializers

#: The zero point every row is rounded around (uint8: codes 1..255 for -127..127 steps).
ZERO_POINT = 128


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _projections(node: onnx.NodeProto, consumers: dict, inits: dict, outputs: set[str]) -> list[tuple] | None:
    """``(MatMulInteger, Cast, output Mul, scale Mul, weight scale)`` of every product reading
    the ``DynamicQuantizeLinear`` ``node``; ``None`` when anything else reads its outputs
    (``QAttention``, a product of two activations, a graph output) or a product is not a 2-D
    weight's."""
    quantized, scale, zero = node.output
    if outputs & set(node.output):
        return None
    found = []
    for m in consumers.get(quantized, []):
        if m.op_type != "MatMulInteger" or m.input[0] != quantized or (len(m.input) > 2 and m.input[2] != zero) \
                or m.input[1] not in inits or len(inits[m.input[1]].dims) != 2:
            return None
        casts = consumers.get(m.output[0], [])
        if len(casts) != 1 or casts[0].op_type != "Cast" or m.output[0] in outputs or casts[0].output[0] in outputs:
            return None
        muls = consumers.get(casts[0].output[0], [])
        if len(muls) != 1 or muls[0].op_type != "Mul":
            return None
        other = [name for name in muls[0].input if name != casts[0].output[0]]
        scale_mul = next((n for n in consumers.get(scale, []) if n.op_type == "Mul" and n.output[0] in other), None)
        if scale_mul is None or scale_mul.output[0] in outputs \
                or any(reader is not muls[0] for reader in consumers.get(scale_mul.output[0], [])):
            return None
        weight_scale = next(name for name in scale_mul.input if name != scale)
        found.append((m, casts[0], muls[0], scale_mul, weight_scale))
    users = {id(n) for entry in found for n in (entry[0], entry[3])}
    if not found or any(id(n) not in users for n in consumers.get(scale, []) + consumers.get(zero, [])):
        return None
    return found


def per_token_inputs(model: onnx.ModelProto, scopes: tuple[str, ...] | None = None) -> tuple[onnx.ModelProto, int]:
    """Give every ``DynamicQuantizeLinear`` whose readers are all ``MatMulInteger`` products with
    a weight (an initializer) a range per row (per token) instead of one per tensor, in place;
    with ``scopes``, only those whose products all lie inside these modules (`in_scopes`).
    Returns how many inputs now have per-token ranges."""
    opset = _opset(model)
    if opset < 13:  # QuantizeLinear along an axis, Unsqueeze's axes as an input
        return model, 0
    rewrite = _Rewrite(model, opset)
    inits, consumers = rewrite.inits, readers(rewrite.nodes)
    outputs = {o.name for o in model.graph.output}
    done = 0
    for node in rewrite.nodes:
        if node.op_type != "DynamicQuantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        products = _projections(node, consumers, inits, outputs)
        if products is None or (scopes is not None and not all(in_scopes(m.name, scopes) for m, *_ in products)):
            continue
        widths = {inits[m.input[1]].dims[0] for m, *_ in products}
        if len(widths) != 1:
            continue
        quantized, row_scale, lead = rewrite.rows(node, widths.pop())
        for product in products:
            rewrite.product(product, quantized, row_scale, lead)
        done += 1
    if done:
        rewrite.write()
    return model, done


class _Rewrite:
    """The nodes of one graph's per-token rewrite, written in place of the old ones at the end."""

    def __init__(self, model: onnx.ModelProto, opset: int):
        self.model, self.opset = model, opset
        self.inits = initializers(model)
        self.nodes = list(model.graph.node)  # one set of node objects: the bookkeeping keys on them
        # a graph that already needs onnxruntime's contrib operators (fused attention, block
        # tables) takes its MatMulIntegerToFloat too; one of standard operators only stays so
        self.contrib = any(n.domain == "com.microsoft" for n in self.nodes)
        self.replaced: dict[int, list[onnx.NodeProto]] = {}  # id(old node) -> the nodes in its place
        self.removed: set[int] = set()
        self.constants: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        self.constants[name] = value
        return name

    def reduce(self, op: str, x: str, out: str) -> onnx.NodeProto:
        if self.opset >= 18:
            return helper.make_node(op, [x, self.const("per_token_axis1", np.array([1], np.int64))], [out], keepdims=0)
        return helper.make_node(op, [x], [out], axes=[1], keepdims=0)

    def rows(self, node: onnx.NodeProto, k: int) -> tuple[str, str, str]:
        """In place of ``node``: its input as rows of ``k``, each quantized symmetrically around
        the zero point ``MatMulInteger`` takes; ``(quantized rows, 2-d row scales, leading shape)``."""
        const, reduce = self.const, self.reduce
        x, tag = node.input[0], node.output[0]
        rows, scale, quantized = f"{tag}_rows", f"{tag}_row_scale", f"{tag}_per_token"
        self.replaced[id(node)] = [
            helper.make_node("Reshape", [x, const(f"per_token_shape_{k}", np.array([-1, k], np.int64))], [rows]),
            reduce("ReduceMax", rows, f"{tag}_row_max"),
            reduce("ReduceMin", rows, f"{tag}_row_min"),
            helper.make_node("Neg", [f"{tag}_row_min"], [f"{tag}_row_neg_min"]),
            helper.make_node("Max", [f"{tag}_row_max", f"{tag}_row_neg_min",
                                     const("per_token_tiny", np.array(np.finfo(np.float32).tiny * 127, np.float32))],
                             [f"{tag}_row_peak"]),
            helper.make_node("Mul", [f"{tag}_row_peak", const("per_token_inv127", np.array(1 / 127, np.float32))], [scale]),
            helper.make_node("Shape", [scale], [f"{tag}_row_count"]),
            helper.make_node("Expand", [const("per_token_zero_1", np.array([ZERO_POINT], np.uint8)), f"{tag}_row_count"],
                             [f"{tag}_row_zero"]),
            helper.make_node("QuantizeLinear", [rows, scale, f"{tag}_row_zero"], [quantized], axis=0),
            helper.make_node("Unsqueeze", [scale, const("per_token_axis1", np.array([1], np.int64))], [f"{tag}_row_scale_2d"]),
            helper.make_node("Shape", [x], [f"{tag}_shape"]),
            helper.make_node("Slice", [f"{tag}_shape", const("per_token_zero_i64", np.array([0], np.int64)),
                                       const("per_token_minus1", np.array([-1], np.int64))], [f"{tag}_lead"]),
        ]
        return quantized, f"{tag}_row_scale_2d", f"{tag}_lead"

    def product(self, product: tuple, quantized: str, row_scale: str, lead: str) -> None:
        """One product of the quantized rows with its weight, scaled by each row's scale after it
        and reshaped back (one ``MatMulIntegerToFloat`` in a graph with contrib operators)."""
        m, cast, mul, scale_mul, weight_scale = product
        n = self.inits[m.input[1]].dims[1]
        zero = self.const("per_token_zero_point", np.array(ZERO_POINT, np.uint8))
        out = mul.output[0]
        if self.contrib:  # one kernel for the product and its weight scales, no int32 tensor between
            b_zero = m.input[3] if len(m.input) > 3 else ""
            head = [helper.make_node(
                "MatMulIntegerToFloat", [quantized, m.input[1], self.const("per_token_one", np.array(1.0, np.float32)),
                                         weight_scale, zero, b_zero], [f"{out}_per_token_rows"],
                name=f"{m.name}_per_token", domain="com.microsoft")]
            self.removed.update((id(m), id(cast)))
        else:
            m.input[0] = quantized
            if len(m.input) > 2:
                m.input[2] = zero
            else:
                m.input.append(zero)
            mul.input[:] = [cast.output[0], weight_scale]
            mul.output[0] = f"{out}_per_token_rows"
            head = [mul]
        self.replaced[id(mul)] = head + [
            helper.make_node("Mul", [f"{out}_per_token_rows", row_scale], [f"{out}_per_token_scaled"]),
            helper.make_node("Concat", [lead, self.const(f"per_token_width_{n}", np.array([n], np.int64))],
                             [f"{out}_per_token_shape"], axis=0),
            helper.make_node("Reshape", [f"{out}_per_token_scaled", f"{out}_per_token_shape"], [out]),
        ]
        self.removed.add(id(scale_mul))

    def write(self) -> None:
        order = []
        for node in self.nodes:
            if id(node) not in self.removed:
                order += self.replaced.get(id(node), [node])
        del self.model.graph.node[:]
        self.model.graph.node.extend(order)
        self.model.graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in self.constants.items()
                                            if name not in self.inits)
