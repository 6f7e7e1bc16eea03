"""Per-token activation ranges for dynamic int8 (`compressor/onnx/per_token.py`): the
rewritten product computes exactly the per-row rounding it claims, an outlier row no longer costs
the other rows their precision, an encoder's projections all read per-token inputs, and what
cannot take a range per row (``QAttention``, products of two activations) is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import ConfigError
from compressor.export import ExportConfig, export
from compressor.models import load_model
from compressor.quantization import method_config
from compressor.onnx.per_token import per_token_inputs

K, N = 48, 24


def _quantized_matmul(tmp_path, per_channel: bool = True, opset: int = 17, w: np.ndarray | None = None,
                      readers: int = 1) -> tuple[onnx.ModelProto, np.ndarray]:
    """x (any leading dimensions, K) -> MatMul(W) -> y (``readers`` > 1: y, y1, ... from as many
    products of the one input, as Q, K and V read theirs), through onnxruntime's own dynamic
    quantizer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32) * 0.1 if w is None else w
    outs = ["y"] + [f"y{i}" for i in range(1, readers)]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", f"w{i}"], [out], name=f"/dense{i}/MatMul")
                               for i, out in enumerate(outs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None) for out in outs],
                              [numpy_helper.from_array(w * (i + 1), f"w{i}") for i in range(readers)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     per_channel=per_channel)
    return onnx.load(str(tmp_path / "q.onnx")), w


def _run(model: onnx.ModelProto, x: np.ndarray, output: int = 0) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[output]


def _int8_channels(w: np.ndarray) -> np.ndarray:
    scale = np.abs(w).max(0) / 127
    return np.clip(np.round(w / scale), -127, 127) * scale


def _integer_dot_products_exact() -> bool:
    """Whether onnxruntime's int8 products are exact here: not an x86 CPU, or one with VNNI."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


@pytest.mark.parametrize("per_channel,opset,readers,contrib", [(True, 17, 1, False), (False, 17, 1, False),
                                                                (True, 18, 3, False), (True, 17, 3, True)])
def test_each_row_is_rounded_with_its_own_largest_magnitude(tmp_path, per_channel, opset, readers, contrib):
    if not _integer_dot_products_exact():
        # onnxruntime's u8s8 integer kernel on an x86 CPU without VNNI sums pairs of products in
        # int16 (vpmaddubsw), which saturates: a few outputs are a step off the exact reference
        pytest.skip("this CPU has no VNNI: onnxruntime's u8s8 MatMulInteger saturates pair sums in int16")
    model, w = _quantized_matmul(tmp_path, per_channel, opset, readers=readers)
    if contrib:  # a graph with onnxruntime's contrib operators in it already (as the O2-fused one)
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        model.graph.node.append(helper.make_node("Gelu", ["x"], ["gelu"], domain="com.microsoft"))
        model.graph.output.append(helper.make_tensor_value_info("gelu", TensorProto.FLOAT, None))
    assert per_token_inputs(model)[1] == 1  # one input, however many products read it
    if not contrib:  # onnx's checker knows no contrib operator
        onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    product = "MatMulIntegerToFloat" if contrib else "MatMulInteger"
    assert "DynamicQuantizeLinear" not in ops and ops.count(product) == readers
    assert contrib or not any(n.domain == "com.microsoft" for n in model.graph.node)  # standard operators stay so
    x = np.random.default_rng(1).standard_normal((2, 5, K)).astype(np.float32)
    x[0, 1] *= 40  # one outlier token
    x[1, 2] = 0.0  # and a row of zeros: a scale that must not divide by zero
    rows = x.reshape(-1, K)
    scale = np.maximum(np.abs(rows).max(1, keepdims=True), 1e-30) / 127
    for i in range(readers):
        got = _run(model, x, i)
        assert got.shape == (2, 5, N) and np.isfinite(got).all() and not got[1, 2].any()
        # the reference: each row symmetric over its own peak, the weight as the quantizer stored it
        wi = w * (i + 1)
        peak = np.abs(wi).max() / 127
        wq = _int8_channels(wi) if per_channel else np.clip(np.round(wi / peak), -127, 127) * peak
        want = (np.round(rows / scale) * scale) @ wq
        np.testing.assert_allclose(got.reshape(-1, N), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_an_outlier_token_no_longer_costs_the_others_their_precision(tmp_path):
    per_tensor, w = _quantized_matmul(tmp_path)
    per_token = onnx.ModelProto()
    per_token.CopyFrom(per_tensor)
    per_token_inputs(per_token)
    x = np.random.default_rng(2).standard_normal((1, 16, K)).astype(np.float32)
    x[0, 0] *= 100
    exact = x @ w
    errors = {name: np.abs(_run(m, x) - exact)[0, 1:].mean() for name, m in (("tensor", per_tensor), ("token", per_token))}
    # one range for the tensor: the other 15 tokens get about 100 times coarser steps
    assert errors["token"] < errors["tensor"] / 20


def _read_elsewhere(model: onnx.ModelProto, what: str) -> None:
    """Another reader of the quantizer's outputs (as QAttention reads them), of the product of
    the scales, or one of them a graph output."""
    dql = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear")
    if what == "quantized input":
        model.graph.node.append(helper.make_node("DequantizeLinear", list(dql.output), ["seen"]))
        model.graph.output.append(helper.make_tensor_value_info("seen", TensorProto.FLOAT, None))
    elif what == "scale product":
        product = next(n for n in model.graph.node if n.op_type == "Mul" and dql.output[1] in n.input)
        model.graph.node.append(helper.make_node("Neg", [product.output[0]], ["seen"]))
        model.graph.output.append(helper.make_tensor_value_info("seen", TensorProto.FLOAT, None))
    else:
        model.graph.output.append(helper.make_tensor_value_info(dql.output[1], TensorProto.FLOAT, None))


@pytest.mark.parametrize("what", ["quantized input", "scale product", "graph output"])
def test_inputs_read_by_anything_else_keep_their_range(tmp_path, what):
    model, _ = _quantized_matmul(tmp_path)
    _read_elsewhere(model, what)
    before = model.SerializeToString()
    assert per_token_inputs(model)[1] == 0 and model.SerializeToString() == before


def test_a_batched_weight_keeps_its_range(tmp_path):
    # onnxruntime quantizes MatMul(x, W[2, K, N]) into the same chain; its rows are not K inputs
    w = np.random.default_rng(3).standard_normal((2, K, N)).astype(np.float32)
    model, _ = _quantized_matmul(tmp_path, per_channel=False, w=w)
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node)
    assert per_token_inputs(model)[1] == 0


@pytest.mark.parametrize("which", ["all", "ffn-down"])
def test_an_encoders_projections_read_per_token_inputs_and_it_is_still_the_model(tiny_dirs, tmp_path, which):
    loaded = load_model(str(tiny_dirs["bert"]))
    layers = loaded.model.config.num_hidden_layers
    record = export(loaded, ExportConfig(), tmp_path / "out", quantize=method_config("int8", per_channel=True, per_token=which))
    graph = onnx.load(str(tmp_path / "out" / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    # per layer: the input of Q, K and V (one for the three), of the attention output, FFN in
    # and FFN out; the attention scores' two products (Q K^T, softmax V) multiply two
    # activations, not a weight, and keep optimum's one range per tensor (4 inputs)
    per_layer = 4 if which == "all" else 1
    assert record.metrics["graph"]["per_token_inputs"] == per_layer * layers == ops.count("QuantizeLinear")
    assert ops.count("DynamicQuantizeLinear") == (8 - per_layer) * layers and ops.count("MatMulInteger") == 8 * layers
    if which == "ffn-down":  # the rows rounded per token are the FFN's intermediate width
        reshapes = {tuple(numpy_helper.to_array(t)) for t in graph.graph.initializer if t.name.startswith("per_token_shape_")}
        assert reshapes == {(-1, loaded.model.config.intermediate_size)}
    assert record.metrics["check"]["mean_cosine"] > 0.99  # the export's own check against PyTorch


@pytest.mark.parametrize("mode", ["int4", "fp16"])
def test_per_token_is_refused_where_there_are_no_dynamic_int8_inputs(mode):
    with pytest.raises(ConfigError, match="--per-token"):
        method_config(mode, per_token="all")


def test_per_token_takes_all_or_the_ffn_down_projections():
    with pytest.raises(ConfigError, match="per.token"):
        method_config("int8", per_token="some")
