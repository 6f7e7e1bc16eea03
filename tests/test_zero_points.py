"""int4 blocks with float zero points (HQQ's) as symmetric MatMulNBits plus a block-sum offset."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.onnx.graph import ZERO_POINT_OFFSET, weight_matmuls
from compressor.onnx.zero_points import fold_float_zero_points


def _blocks(rng, n: int, k: int, block: int):
    """Random 4-bit codes packed as MatMulNBits reads them (K padded to whole blocks), scales and
    float zero points, and the weight (N x K) they stand for: ``scale * (q - zero)``."""
    blocks = -(-k // block)
    q = rng.integers(0, 16, (n, blocks * block)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32)
    zeros = rng.uniform(0, 15, (n, blocks)).astype(np.float32)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    expand = np.repeat(np.arange(blocks), block)
    weight = scales[:, expand] * (q.astype(np.float32) - zeros[:, expand])
    return packed, scales.reshape(-1), zeros.reshape(-1), weight[:, :k]


def _graph(rng, *, k: int = 80, block: int = 32, level: int = 1):
    """x (batch, seq, K) -> three MatMulNBits with float zero points: two read x (N 24 and 16),
    one reads the first's output (K 24); the sum of the last two is the output."""
    nodes, inits, weights = [], [], {}
    for name, src, n, kk in (("a", "x", 24, k), ("b", "x", 16, k), ("c", "a_out", 16, 24)):
        packed, scales, zeros, weights[name] = _blocks(rng, n, kk, block if name != "c" else 16)
        inits += [numpy_helper.from_array(packed, f"{name}_Q4"), numpy_helper.from_array(scales, f"{name}_scales"),
                  numpy_helper.from_array(zeros, f"{name}_zero_points")]
        nodes.append(helper.make_node("MatMulNBits", [src, f"{name}_Q4", f"{name}_scales", f"{name}_zero_points"],
                                      [f"{name}_out"], name=name, domain="com.microsoft", K=kk, N=n, bits=4,
                                      block_size=block if name != "c" else 16, accuracy_level=level))
    nodes.append(helper.make_node("Add", ["b_out", "c_out"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model, weights


def _run(model, x):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("level", [1, 4])
def test_folded_zero_points_compute_the_same_product(level):
    rng = np.random.default_rng(0)
    model, w = _graph(rng, level=level)
    x = rng.normal(size=(2, 5, 80)).astype(np.float32)
    expected = x @ w["b"].T + (x @ w["a"].T) @ w["c"].T
    before = _run(model, x)
    assert fold_float_zero_points(model)[1] == 3
    after = _run(model, x)
    onnx.checker.check_model(model)
    scale = np.abs(expected).max()
    if level == 1:  # fp32 throughout: exact to rounding, as the float-zero-point kernel was
        assert np.abs(after - expected).max() < 1e-4 * scale
        assert np.abs(before - expected).max() < 1e-4 * scale
    else:  # int8 activations in the symmetric part, as for RTN: close, not exact
        assert np.abs(after - expected).max() < 0.03 * scale
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 3 and all(len(n.input) == 3 for n in nbits)  # symmetric: no zero points left
    inits = {t.name for t in model.graph.initializer}
    assert not any(name.endswith("_zero_points") for name in inits)
    marked = [n for n in model.graph.node if n.doc_string == ZERO_POINT_OFFSET]
    # block sums once per (input, K, block size): x once for a and b, a_out once for c; one offset each
    assert len(marked) == 2 + 3
    ones = [t for t in model.graph.initializer if t.name.startswith("block_ones_")]
    assert sorted(tuple(t.dims) for t in ones) == [(24, 2), (80, 3)]  # one 0/1 matrix per (K, block)
    offsets = [t for t in model.graph.initializer if "zero_offsets" in t.name]
    assert sum(int(np.prod(t.dims)) for t in offsets) == 24 * 3 + 16 * 3 + 16 * 2  # as many as the zero points
    assert weight_matmuls(model)["float_on_weights"] == 0  # the offsets are not projections


def test_integer_and_absent_zero_points_are_left_alone():
    rng = np.random.default_rng(1)
    model, _ = _graph(rng)
    for t in model.graph.initializer:  # integer zero points: the fast kernel already runs them
        if t.name.endswith("_zero_points"):
            t.CopyFrom(numpy_helper.from_array(np.zeros(-(-int(t.dims[0]) // 2), np.uint8), t.name))
    before = model.SerializeToString()
    assert fold_float_zero_points(model)[1] == 0
    assert model.SerializeToString() == before


def test_fp16_zero_points_beside_fp32_scales_fold_in_the_input_type():
    rng = np.random.default_rng(2)
    model, w = _graph(rng)
    for t in model.graph.initializer:  # the schema allows fp16 zero points with fp32 scales and input
        if t.name.endswith("_zero_points"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    x = rng.normal(size=(1, 3, 80)).astype(np.float32)
    before = _run(model, x)
    assert fold_float_zero_points(model)[1] == 3
    after = _run(model, x)
    assert np.abs(after - before).max() < 1e-4 * np.abs(before).max()
    assert all(t.data_type == TensorProto.FLOAT for t in model.graph.initializer
               if t.name.startswith("block_ones_") or "zero_offsets" in t.name)


def test_blocks_given_by_g_idx_are_left_alone():
    rng = np.random.default_rng(3)
    model, _ = _graph(rng)
    node = next(n for n in model.graph.node if n.name == "a")
    model.graph.initializer.append(numpy_helper.from_array(rng.permutation(np.arange(80) // 32).astype(np.int32), "g"))
    node.input.append("g")  # input k in block g[k], not k // block_size: the 0/1 matrix would be wrong
    assert fold_float_zero_points(model)[1] == 2
    assert len(next(n for n in model.graph.node if n.name == "a").input) == 5
