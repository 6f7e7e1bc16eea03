"""Quantization-aware fine-tuning (`compressor/grids/aware.py`, ``finetune
--quantize-aware``): the student trains on its int4 blocks, the checkpoint is those blocks, and an
int4 export stores them as they are, so the ONNX file computes what the PyTorch checkpoint does."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from compressor.errors import ConfigError
from compressor.export import ExportConfig, export
from compressor.finetune import FinetuneConfig, finetune
from compressor.models import load_model
from compressor.onnx.graph import attribute
from compressor.quantization import method_config
from compressor.grids.gptq import block_grid, dequantize, on_grid, round_to_nearest, rtn_blocks

TEXTS = [f"the {w} of sentence {i} is {w[::-1]}" for i, w in enumerate(["cat", "dog", "river", "music", "film", "tree"] * 12)]


def test_blocks_at_once_are_the_grid_block_by_block_and_a_fixed_point():
    """`rtn_blocks` (all blocks at once, a partial last block included) gives `block_grid`'s scales
    and zero points block by block; rounding what it rounded changes nothing (`on_grid`), while
    float weights are off the grid."""
    torch.manual_seed(0)
    weight = torch.randn(24, 72) * torch.rand(24, 1)  # 4 blocks of 16 and a half block
    q, scales, zeros = rtn_blocks(weight, 16)
    for b, start in enumerate(range(0, 72, 16)):
        scale, zero = block_grid(weight[:, start:start + 16], 15)
        torch.testing.assert_close(scales[:, b], scale, rtol=0, atol=0)
        torch.testing.assert_close(zeros[:, b], zero, rtol=0, atol=0)
    assert q.min() >= 0 and q.max() <= 15 and q.shape == weight.shape
    rounded = round_to_nearest(weight, 16)
    np.testing.assert_allclose(rounded.numpy(), dequantize(q.numpy(), scales.numpy(), zeros.numpy(), 16), atol=1e-6)
    assert not on_grid(weight, 16) and on_grid(rounded, 16)
    torch.testing.assert_close(round_to_nearest(rounded, 16), rounded, rtol=0, atol=1e-6)
    assert not on_grid(rounded, 32)  # another block size is another grid
    # a block whose zero point and largest number are both half-way cases (weights that already
    # lay on another 4-bit grid): rounding half to even would take both down and leave 14 steps,
    # which a second rounding would stretch to 15; its extremes stay on the grid's ends instead
    tie = (torch.arange(16.0) - 6.5).repeat(2)[None, :] * 0.25
    once = round_to_nearest(tie, 32)
    assert on_grid(once, 32) and rtn_blocks(tie, 32)[0].max() == 15
    torch.testing.assert_close(round_to_nearest(once, 32), once, rtol=0, atol=0)


def _config(teacher, data, **kw):
    base = dict(teacher=str(teacher), data=str(data), max_steps=6, batch_size=8, max_length=32, lr=2e-3, train="all",
                save_every=0, quantize_aware=True, block_size=16)
    return FinetuneConfig(**{**base, **kw})


@pytest.fixture()
def data_file(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("\n".join(TEXTS))
    return f


def _projections(model):
    return {n: m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers")}


def test_quantize_aware_trains_on_the_blocks_and_the_export_stores_them(tiny_dirs, data_file, tmp_path):
    """A tiny Llama, 6 steps with --quantize-aware: every projection of the checkpoint lies on its
    int4 grid and moved from the original's rounding (the float weights behind it trained); an int4
    export (default rtn) finds them there and stores those blocks, each MatMulNBits dequantizing to
    the checkpoint's weight, so the export agrees with the checkpoint far better than a plain int4
    export of a float model agrees with it."""
    original = load_model(str(tiny_dirs["llama"]))
    start = {n: w.detach().clone() for n, w in _projections(original.model).items()}
    student, record = finetune(load_model(str(tiny_dirs["llama"])), _config(tiny_dirs["llama"], data_file),
                               output=tmp_path / "qat", teacher=original, progress=False)
    assert record.metrics["quantize_aware"] == {"bits": 4, "block_size": 16, "weights": 7 * 4}
    saved = load_model(str(tmp_path / "qat"))
    weights = _projections(saved.model)
    assert all(on_grid(w, 16) for w in weights.values())
    returned = _projections(student.model)  # the student handed back is the checkpoint written
    assert all(torch.equal(returned[n], w) for n, w in weights.items())
    assert any(not torch.equal(w, round_to_nearest(start[n], 16)) for n, w in weights.items())
    assert (tmp_path / "qat" / "quantize_aware.pt").is_file()

    rec = export(saved, ExportConfig(check_lengths=[8, 32]), tmp_path / "onnx",
                 quantize=method_config("int4", block_size=16, accuracy_level=1))
    graph = rec.metrics["graph"]
    assert graph["trained_grid"] == {"weights": 28, "off_grid": 0, "block_size": 16}
    assert graph["gptq_weights"] == {"fitted": 28, "left_to_rtn": 0}
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and attribute(n, "bits") == 4
                and "layers.0/self_attn/q_proj" in n.name)
    b, scales, packed = (inits[name] for name in node.input[1:4])
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[0], -1)
    zeros = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(b.shape[0], -1)[:, :scales.shape[1]]
    np.testing.assert_allclose(dequantize(q, scales, zeros, 16)[:, :weights["model.layers.0.self_attn.q_proj"].shape[1]],
                               weights["model.layers.0.self_attn.q_proj"].numpy(), atol=1e-6)
    plain = export(load_model(str(tiny_dirs["llama"])), ExportConfig(check_lengths=[8, 32]), tmp_path / "plain",
                   quantize=method_config("int4", block_size=16, accuracy_level=1))
    assert "trained_grid" not in plain.metrics["graph"]
    # dequantized from the graph, every trained projection (not only the one above) is the checkpoint's
    dequantized = [dequantize(np.stack([b & 0x0F, b >> 4], -1).reshape(b.shape[0], -1), sc,
                              np.stack([z & 0x0F, z >> 4], -1).reshape(b.shape[0], -1)[:, :sc.shape[1]], 16)
                   for b, sc, z in ((inits[n.input[1]], inits[n.input[2]], inits[n.input[3]]) for n in model.graph.node
                                    if n.op_type == "MatMulNBits" and attribute(n, "bits") == 4 and len(n.input) > 3)]
    assert len(dequantized) == 28
    for w in weights.values():
        assert any(d.shape[0] == w.shape[0] and d.shape[1] >= w.shape[1] and np.allclose(d[:, :w.shape[1]], w.numpy(), atol=1e-6) for d in dequantized)
    # (what is left: the embedding table and head in 8-bit blocks)
    qat_gap, plain_gap = 1 - rec.metrics["check"]["mean_cosine"], 1 - plain.metrics["check"]["mean_cosine"]
    assert qat_gap < 1e-4 and qat_gap < 0.2 * plain_gap, (qat_gap, plain_gap)


def test_a_quantize_aware_resume_continues_the_float_weights(tiny_dirs, data_file, tmp_path):
    """3 steps, then a resume to 6: the same rounded weights as 6 in one go (the float weights
    behind the checkpoint's rounded ones were saved and restored); a resume without them, or one
    that drops the option, is refused."""
    teacher = load_model(str(tiny_dirs["llama"]))
    straight, _ = finetune(load_model(str(tiny_dirs["llama"])), _config(tiny_dirs["llama"], data_file),
                           output=tmp_path / "a", teacher=teacher, progress=False)
    finetune(load_model(str(tiny_dirs["llama"])), _config(tiny_dirs["llama"], data_file, max_steps=3),
             output=tmp_path / "b", teacher=teacher, progress=False)
    resumed, rec = finetune(load_model(str(tmp_path / "b")), _config(tiny_dirs["llama"], data_file),
                            output=tmp_path / "b", teacher=teacher, resume=True, progress=False)
    assert rec.metrics["steps_this_run"] == 3
    a, b = _projections(load_model(str(tmp_path / "a")).model), _projections(load_model(str(tmp_path / "b")).model)
    for name, w in a.items():
        torch.testing.assert_close(b[name], w, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="--quantize-aware"):
        finetune(load_model(str(tmp_path / "b")), _config(tiny_dirs["llama"], data_file, quantize_aware=False,
                                                          block_size=32, max_steps=8),
                 output=tmp_path / "b", teacher=teacher, resume=True, progress=False)
    (tmp_path / "b" / "quantize_aware.pt").unlink()
    with pytest.raises(ConfigError, match="quantize_aware.pt"):
        finetune(load_model(str(tmp_path / "b")), _config(tiny_dirs["llama"], data_file, max_steps=8),
                 output=tmp_path / "b", teacher=teacher, resume=True, progress=False)
    assert json.loads((tmp_path / "b" / "finetune_report.json").read_text())["metrics"]["steps"] == 6


def test_quantize_aware_options_are_checked():
    with pytest.raises(ConfigError, match="--block-size must be a power of two"):
        FinetuneConfig(quantize_aware=True, block_size=24)
    with pytest.raises(ConfigError, match="--quantize-aware or --embedding-bits trains for; add one"):
        FinetuneConfig(block_size=64)
    with pytest.raises(ConfigError, match="true or false"):
        FinetuneConfig(quantize_aware="yes")


def test_an_export_keeps_trained_blocks_out_of_int8_and_refuses_what_would_round_them_again(tiny_dirs, tmp_path):
    """A model on its int4 grid (blocks of 16): --int8-share takes none of its projections into
    8 bits (they lose nothing in int4); --int4-method hqq (which would fit the blocks again) and
    another --block-size are refused in one line, and write nothing."""
    loaded = load_model(str(tiny_dirs["llama"]))
    with torch.no_grad():
        for w in _projections(loaded.model).values():
            w.copy_(round_to_nearest(w, 16))
    rec = export(loaded, ExportConfig(check_lengths=[8]), tmp_path / "share",
                 quantize=method_config("int4", block_size=16, int8_share=0.3, accuracy_level=1))
    graph = rec.metrics["graph"]
    assert graph["int8_block_matmuls"] == 0 and graph["trained_grid"]["weights"] == 28
    assert graph["calibration"]["int8_projections"]["count"] == 0
    with pytest.raises(ConfigError, match="--int4-method hqq would fit again"):
        export(loaded, ExportConfig(check_lengths=[8]), tmp_path / "hqq",
               quantize=method_config("int4", block_size=16, int4_method="hqq"))
    with pytest.raises(ConfigError, match="trained for int4 blocks of 16.*--block-size 16"):
        export(loaded, ExportConfig(check_lengths=[8]), tmp_path / "b32", quantize=method_config("int4", block_size=32))
    assert not (tmp_path / "hqq").exists() and not (tmp_path / "b32").exists()


def test_embedding_bits_trains_the_tables_on_the_exports_blocks(tiny_dirs, data_file, tmp_path):
    """--embedding-bits 4 on a tiny BERT (no --quantize-aware): the checkpoint's tables are their
    own symmetric 4-bit blocks (`tables.quantize_rows` gives them back unchanged: the export stores
    what was trained), its projections are left in float, and `round_rows` is `quantize_rows`."""
    from compressor.grids.aware import round_rows
    from compressor.grids.rows import quantize_rows

    torch.manual_seed(0)
    rows = torch.randn(10, 48)
    np.testing.assert_allclose(round_rows(rows, 4, 16).numpy(), quantize_rows(rows.numpy(), 4, 16)[2], atol=0)
    teacher = load_model(str(tiny_dirs["bert"]))
    _, record = finetune(load_model(str(tiny_dirs["bert"])),
                         _config(tiny_dirs["bert"], data_file, quantize_aware=False, embedding_bits=4),
                         output=tmp_path / "t4", teacher=teacher, progress=False)
    aware = record.metrics["quantize_aware"]
    assert aware["weights"] == 0 and aware["table_bits"] == 4 and aware["tables"] == 3  # words, positions, types
    saved = load_model(str(tmp_path / "t4")).model
    tables = [m.weight.detach() for m in saved.modules() if isinstance(m, torch.nn.Embedding)]
    for table in tables:
        np.testing.assert_allclose(quantize_rows(table.numpy(), 4, 16)[2], table.numpy(), atol=1e-6)
    assert not all(on_grid(m.weight.detach(), 16) for m in saved.modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ConfigError, match="--embedding-bits must be one of 4, 8"):
        FinetuneConfig(embedding_bits=3)


def test_int8_aware_rounds_inputs_as_dynamic_int8_does_and_weights_per_channel():
    """`fake_uint8` is onnxruntime's DynamicQuantizeLinear then DequantizeLinear (a real session,
    on a tensor that holds no 0 and one whose range is all negative), with the gradient passing
    straight through; `int8_channels` puts each output channel on codes -127..127 of its own
    scale, within half a step of the float weight, and rounding it again changes nothing."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from compressor.grids.aware import fake_uint8, int8_channels

    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    for x in (torch.randn(4, 7, 48) * 3 + 1, -torch.rand(5, 32) - 0.5):
        expected = session.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(fake_uint8(x).numpy(), expected, rtol=0, atol=1e-6)
    x = torch.randn(3, 16, requires_grad=True)
    (fake_uint8(x) * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(16.0).expand(3, 16))

    weight = torch.randn(12, 40) * torch.rand(12, 1)
    rounded = int8_channels(weight)
    step = weight.abs().amax(1, keepdim=True) / 127
    assert torch.all((rounded - weight).abs() <= step / 2 + 1e-7)
    codes = rounded / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
    torch.testing.assert_close(int8_channels(weight.T, transposed=True), rounded.T)
    torch.testing.assert_close(int8_channels(rounded), rounded, rtol=0, atol=1e-7)


def test_an_int8_aware_run_trains_on_int8_and_writes_its_rounded_weights(tiny_dirs, data_file, tmp_path):
    """--int8-aware on a tiny BERT: the run's record says 8 bits; the checkpoint keeps the float
    projections (the export's per-channel int8 rounds them as training did: onnxruntime's own
    rounding of a checkpoint weight is `int8_channels` of it) and the returned student
    is that checkpoint; the export checks; it cannot be combined with --quantize-aware."""
    from onnxruntime.quantization.quant_utils import quantize_data

    from compressor.grids.aware import int8_channels

    student, record = finetune(load_model(tiny_dirs["bert"]), _config(tiny_dirs["bert"], data_file, quantize_aware=False,
                                                                      int8_aware=True, block_size=32),
                               output=tmp_path / "out", progress=False)
    assert record.metrics["quantize_aware"]["bits"] == 8 and record.metrics["quantize_aware"]["weights"] >= 6 * 2
    saved = load_model(tmp_path / "out")
    linears = [m for m in saved.adapter.blocks(saved.model).modules() if isinstance(m, torch.nn.Linear)]
    assert linears and not any(torch.equal(int8_channels(m.weight), m.weight) for m in linears)
    assert all(torch.equal(a, b) for a, b in zip(saved.model.state_dict().values(), student.model.state_dict().values()))
    for m in linears:  # onnxruntime's own per-channel rounding of the float weight is the one trained on
        w = m.weight.detach().numpy()
        for row, expected in zip(w[:3], int8_channels(m.weight)[:3]):
            zero, scale, codes = quantize_data(row, onnx.TensorProto.INT8, symmetric=True)
            assert zero == 0
            np.testing.assert_allclose(codes.astype(np.float32) * scale, expected.numpy(), rtol=1e-6, atol=1e-7)
    exported = export(saved, ExportConfig(check_lengths=[8, 32]), tmp_path / "onnx",
                      quantize=method_config("int8", per_channel=True))
    assert exported.metrics["check"]["mean_cosine"] >= 0.9
    with pytest.raises(ConfigError, match="choose one"):
        _config(tiny_dirs["bert"], data_file, int8_aware=True)
