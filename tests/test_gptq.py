"""GPTQ int4 (`compressor/grids/gptq.py`): the fitted blocks beat round-to-nearest on the
output error they minimize, onnxruntime's MatMulNBits runs them exactly as they dequantize, and an
export with ``--int4-method gptq`` stores exactly those blocks, shared weights once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from cli.main import cli
from compressor.errors import ConfigError
from compressor.export import ExportConfig, export
from compressor.models import load_model
from compressor.onnx.graph import attribute
from compressor.quantization import method_config
from compressor.grids.gptq import dequantize, gptq, pack_matmul_nbits, round_to_nearest
from compressor.sharing import ShareConfig, share
from conftest import stderr_lines


def _correlated(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g) @ torch.randn(dim, dim, generator=g) * 0.3


def _matmul_nbits(b, scales, zero_points, k: int, n: int, block: int):
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S"),
                               numpy_helper.from_array(zero_points, "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_gptq_halves_the_output_error_and_onnxruntime_runs_its_blocks_exactly():
    """On correlated inputs (as a layer's are), GPTQ's output error is well below round-to-nearest
    on the same grid; its blocks, packed for MatMulNBits (an odd number of blocks and an input
    dimension that is not a whole number of blocks: padding and the zero points' last nibble),
    give onnxruntime the product with the weight `dequantize` says they stand for."""
    weight = torch.randn(24, 72, generator=torch.Generator().manual_seed(1))
    x = _correlated(3000, 72)
    q, scales, zeros = gptq(weight, x.T @ x, block_size=16)  # 72 = 4 blocks of 16 and a half
    assert q.max() <= 15 and scales.shape == zeros.shape == (24, 5)
    fitted = torch.from_numpy(dequantize(q, scales, zeros, 16))

    def error(w):
        return float(((x @ (weight - w).T) ** 2).mean())

    assert error(fitted) < 0.7 * error(round_to_nearest(weight, 16)), (error(fitted), error(round_to_nearest(weight, 16)))
    packed = pack_matmul_nbits(q, scales, zeros, 16)
    assert packed[0].shape == (24, 5, 8) and packed[2].shape == (24, 3)
    probe = np.random.default_rng(0).standard_normal((5, 72)).astype(np.float32)
    got = _matmul_nbits(*packed, k=72, n=24, block=16).run(None, {"x": probe})[0]
    np.testing.assert_allclose(got, probe @ fitted.numpy().T, rtol=1e-5, atol=1e-4)


def test_a_gptq_export_stores_the_fitted_blocks_once_per_shared_weight(tiny_dirs, tmp_path):
    """A shared Llama exported with --int4-method gptq: every int4 projection carries GPTQ's blocks
    (decoded from the graph, equal to the fitted weight), a shared weight is one set of blocks for
    all its layers, and the export's own check agrees with PyTorch at least as well as RTN with
    zero points does on the same model."""
    shared, _ = share(load_model(str(tiny_dirs["llama"])), ShareConfig(plan="0-1,2-3", lora_rank=0, fidelity=False))
    gptq_record = export(shared, ExportConfig(check_lengths=[8, 32]), tmp_path / "gptq",
                         quantize=method_config("int4", block_size=16, int4_method="gptq", accuracy_level=1))
    rtn_record = export(shared, ExportConfig(check_lengths=[8, 32]), tmp_path / "rtn",
                        quantize=method_config("int4", block_size=16, int4_method="rtn-asym", accuracy_level=1))
    graph = gptq_record.metrics["graph"]
    assert graph["gptq_weights"]["fitted"] == graph["int4_matmuls"] // 2 > 0  # two layers a weight
    assert graph["gptq_weights"]["left_to_rtn"] == 0 and graph["calibration"]["calibration_tokens"] > 1000

    model = onnx.load(str(tmp_path / "gptq" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and attribute(n, "bits") == 4]  # not the head
    by_layer = {}
    for node in nodes:
        b, scales, packed_zeros = (inits[name] for name in node.input[1:4])
        low, high = b & 0x0F, b >> 4
        q = np.stack([low, high], axis=-1).reshape(b.shape[0], -1)
        zeros = np.stack([packed_zeros & 0x0F, packed_zeros >> 4], axis=-1).reshape(b.shape[0], -1)[:, :scales.shape[1]]
        by_layer[node.name] = (node.input[1], dequantize(q, scales, zeros, 16))
    q_proj = [v for k, v in by_layer.items() if "self_attn/q_proj" in k]
    assert len(q_proj) == 4 and len({name for name, _ in q_proj}) == 2  # four layers, two stored weights
    weight = shared.model.model.layers[0].self_attn.q_proj.weight.detach()
    onnx_weight = next(w for k, (_, w) in by_layer.items() if "layers.0/self_attn/q_proj" in k)
    rtn_error = np.abs(round_to_nearest(weight, 16).numpy() - weight.numpy()).mean()
    assert np.abs(onnx_weight - weight.numpy()).mean() < 3 * rtn_error  # the same grid, moved by GPTQ
    assert not np.allclose(onnx_weight, round_to_nearest(weight, 16).numpy())  # and not the RTN blocks
    assert gptq_record.metrics["check"]["mean_cosine"] >= rtn_record.metrics["check"]["mean_cosine"] - 1e-3


def test_gptq_options_are_checked(tiny_dirs, tmp_path):
    method_config("int4", int4_method="gptq", calibration="movie-snippets")  # its own calibration text
    method_config("int4", int8_share=0.3, calibration="movie-snippets")  # ranks the projections on it
    with pytest.raises(ConfigError, match="only used by int8-static, by int4 with --int4-method gptq or --int8-share, and by --embedding-hot-share"):
        method_config("int4", int4_method="rtn", calibration="movie-snippets")
    for bad in (1.0, -0.1, True):
        with pytest.raises(ConfigError, match="--int8-share must be in"):
            method_config("int4", int8_share=bad)
    with pytest.raises(ConfigError, match="not for int8"):
        method_config("int8", int8_share=0.2)
    res = CliRunner().invoke(cli, ["export", str(tiny_dirs["llama"]), "--quantize", "int4", "--int4-method", "gptq",
                                   "--calibration", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "out")])
    assert res.exit_code != 0 and not (tmp_path / "out").exists()
    assert len(stderr_lines(res.stderr)) == 1 and "missing.txt" in res.stderr, res.stderr


def test_int8_share_keeps_the_projections_int4_hurts_most_in_int8(tiny_dirs, tmp_path):
    """--int8-share 0.3 on a tiny Llama: the projections kept in int8 are those whose int4 loses
    the largest share of their output on the calibration text (every one kept above every one
    left in int4), they add up to at most 30% of the projections' parameters, the graph has them
    as int8 MatMuls and the rest as MatMulNBits, and the export agrees with PyTorch better than
    plain int4 does."""
    loaded = load_model(str(tiny_dirs["llama"]))
    mixed = export(loaded, ExportConfig(check_lengths=[8, 32]), tmp_path / "mixed",
                   quantize=method_config("int4", block_size=16, int8_share=0.3, accuracy_level=1))
    plain = export(loaded, ExportConfig(check_lengths=[8, 32]), tmp_path / "plain",
                   quantize=method_config("int4", block_size=16, accuracy_level=1))
    kept = mixed.metrics["graph"]["calibration"]["int8_projections"]
    assert 0 < kept["share_kept"] <= 0.3 and kept["count"] > 0
    assert kept["lowest_error_kept"] >= kept["highest_error_int4"]
    graph = mixed.metrics["graph"]
    assert graph["int4_matmuls"] == plain.metrics["graph"]["int4_matmuls"] - kept["count"]
    assert graph["int8_block_matmuls"] == kept["count"] and graph["int8_matmuls"] == plain.metrics["graph"]["int8_matmuls"]
    assert mixed.metrics["check"]["mean_cosine"] > plain.metrics["check"]["mean_cosine"]
