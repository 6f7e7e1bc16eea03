"""Embedding tables and output heads as weight-only blocks in int4 exports
(`compressor/onnx/tables.py`): a tied head and its table read one set of blocks, each
operator computes exactly what the blocks dequantize to, and a tied decoder's int4 file stores the
vocabulary matrix once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import ConfigError
from compressor.export import ExportConfig, export
from compressor.models import load_model
from compressor.models.stats import unique_parameters
from compressor.quantization import method_config
from compressor.grids.rows import half_scales, quantize_rows
from compressor.onnx.tables import block_quantize_tables, supported
from conftest import stderr_lines

pytestmark = pytest.mark.skipif(not supported(), reason="this onnxruntime's GatherBlockQuantized takes no uint8 blocks")

VOCAB, HIDDEN = 50, 64


def _lookup_and_head(tied: bool) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """ids -> Gather(table) -> embedded; x -> MatMul(head weight) -> logits, the head the table's
    transpose when ``tied`` (as the exporter writes a tied LM head)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    table[3] = 0.0  # an all-zero row: a block whose scale must not divide by zero
    head = table.T.copy() if tied else rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["embedded"], name="/embed/Gather"),
         helper.make_node("MatMul", ["x", "head"], ["logits"], name="/lm_head/MatMul")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, HIDDEN])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), table, head


@pytest.mark.parametrize("bits", [8, 4])
def test_a_tied_head_and_its_table_read_one_set_of_blocks_exactly(bits):
    model, table, _ = _lookup_and_head(tied=True)
    _, done = block_quantize_tables(model, bits=bits, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"})
    assert done["tied"] == 1 and done["stored_matrices"] == 1
    assert {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2} \
        == {f"table_B{bits}_scale"}  # no float copy of the matrix left, only its scales
    nodes = {n.op_type: n for n in model.graph.node}
    assert nodes["GatherBlockQuantized"].input[0] == nodes["MatMulNBits"].input[1]  # the same bytes
    _, _, dequantized = quantize_rows(table, bits, 16)
    # each block's scale searched: never more squared error than round-to-nearest over the
    # block's peak (whose every value is within half a step), and less on the whole
    half = 2 ** (bits - 1)
    blocks = table.reshape(VOCAB, -1, 16)
    step = half_scales(np.maximum(np.abs(blocks).max(-1, keepdims=True), 1e-30) / (half - 1))  # as stored
    nearest = np.clip(np.rint(blocks / step), -half, half - 1) * step
    assert np.all(np.abs(nearest - blocks) <= step * 0.502)
    error, nearest_error = (np.square(d - blocks).sum(-1) for d in (dequantized.reshape(blocks.shape), nearest))
    assert np.all(error <= nearest_error) and (bits == 8 or error.sum() < 0.9 * nearest_error.sum())
    assert not dequantized[3].any()

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 3, 49], [7, 7, 1]], dtype=np.int64)
    x = np.random.default_rng(1).standard_normal((5, HIDDEN)).astype(np.float32)
    embedded, logits = session.run(None, {"ids": ids, "x": x})
    assert embedded.shape == (2, 3, HIDDEN)
    np.testing.assert_array_equal(embedded, dequantized[ids])  # the rows the blocks hold, exactly
    np.testing.assert_allclose(logits, x @ dequantized.T, atol=1e-4, rtol=1e-5)


def test_an_untied_head_and_table_get_blocks_of_their_own():
    model, table, head = _lookup_and_head(tied=False)
    _, done = block_quantize_tables(model, bits=8, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"})
    assert done["tied"] == 0 and done["stored_matrices"] == 2
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, HIDDEN)).astype(np.float32)
    embedded, logits = session.run(None, {"ids": np.array([[1, 2]], dtype=np.int64), "x": x})
    np.testing.assert_array_equal(embedded[0], quantize_rows(table, 8, 16)[2][[1, 2]])
    np.testing.assert_allclose(logits, x @ quantize_rows(head.T, 8, 16)[2].T, atol=1e-4, rtol=1e-5)


def test_two_lookups_of_one_table_read_one_set_of_blocks():
    """A table gathered twice (and with scalar indices once): one set of blocks, one Reshape of its
    scales, each lookup the exact dequantized rows."""
    model, table, _ = _lookup_and_head(tied=True)
    model.graph.node.append(helper.make_node("Gather", ["table", "one_id"], ["again"], name="/again/Gather"))
    model.graph.input.append(helper.make_tensor_value_info("one_id", TensorProto.INT64, []))
    model.graph.output.append(helper.make_tensor_value_info("again", TensorProto.FLOAT, None))
    _, done = block_quantize_tables(model, bits=4, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"})
    assert done["tables"] == 1 and done["lookups"] == 2 and done["stored_matrices"] == 1
    assert [n.op_type for n in model.graph.node].count("Reshape") == 3  # the scales once, each lookup's rows
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((1, HIDDEN), np.float32)
    embedded, _, again = session.run(None, {"ids": np.array([[2, 9]], np.int64), "x": x, "one_id": np.array(9)})
    dequantized = quantize_rows(table, 4, 16)[2]
    np.testing.assert_array_equal(embedded[0], dequantized[[2, 9]])
    np.testing.assert_array_equal(again, dequantized[9])


def test_a_hidden_size_of_no_whole_blocks_is_left_to_int8():
    model, _, _ = _lookup_and_head(tied=True)
    assert block_quantize_tables(model, bits=8, block_size=48, accuracy_level=1, heads={"/lm_head/MatMul"})[1] == {}
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul"]


def test_a_tied_decoders_int4_file_stores_its_vocabulary_matrix_once(tiny_dirs, tmp_path):
    """GPT-2 ties its head: before, the int4 file stored the matrix twice (an int8 Gather table
    and an int8 head); now one set of 8-bit blocks both read, the check passing, and 4-bit tables
    make the file smaller still."""
    loaded = load_model(str(tiny_dirs["gpt2"]))
    unique, _ = unique_parameters(loaded.model)
    sizes = {}
    for bits in (8, 4):
        record = export(loaded, ExportConfig(check_lengths=[8, 32]), tmp_path / str(bits),
                        quantize=method_config("int4", block_size=16, embedding_bits=bits))
        m = record.metrics
        assert m["graph"]["tables"]["tied"] == 1 and m["check"]["mean_cosine"] >= 0.8
        assert m["stored_numbers"] <= unique * 1.01 + 1024  # the tied matrix once (it was unique + vocab x hidden)
        graph = onnx.load(str(tmp_path / str(bits) / "model.onnx"))
        head = [n for n in graph.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "logits"]
        lookups = [n for n in graph.graph.node if n.op_type == "GatherBlockQuantized"]
        assert len(head) == 1 and any(n.input[0] == head[0].input[1] for n in lookups)
        assert all(a.i == bits for a in head[0].attribute if a.name == "bits")
        sizes[bits] = (tmp_path / str(bits) / "model.onnx").stat().st_size
    assert sizes[4] < sizes[8]


@pytest.mark.parametrize("optimize", [0, 2])
def test_int8_with_4_bit_tables_is_smaller_and_still_checks_itself(optimize, tiny_dirs, tmp_path):
    """--quantize int8 --embedding-bits 4 on an encoder, plain and O2-fused: the tables become
    GatherBlockQuantized (none left to a Gather of int8), the projections int8 as before, the
    file smaller than plain int8's, the export's check and sentence-transformers' passing."""
    loaded = load_model(str(tiny_dirs["bert"]))
    records = {}
    for bits in (None, 4):
        records[bits] = export(loaded, ExportConfig(check_lengths=[8, 32], optimize=optimize), tmp_path / str(bits),
                               quantize=method_config("int8", embedding_bits=bits))
    m = records[4].metrics
    assert m["graph"]["tables"]["tables"] == 3 and m["graph"]["tables"]["bits"] == 4  # words, positions, token types
    assert m["projections"]["float_on_weights"] == 0 and m["check"]["mean_cosine"] >= 0.9
    assert m["check"]["sentence_transformers"]["passed"]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "4" / "model.onnx")).graph.node]
    assert ops.count("GatherBlockQuantized") == 3 and "tables" not in records[None].metrics["graph"]
    assert m["file_bytes"] < records[None].metrics["file_bytes"]
    # optimum's ORTQuantizer cannot type a graph with com.microsoft nodes: onnxruntime's quantizer, saying why
    assert m["graph"]["quantizer"].endswith("(on the fused graph)" if optimize else "(on the graph with block tables)")


def test_embedding_bits_are_checked():
    with pytest.raises(ConfigError, match="embedding-bits"):
        method_config("int4", embedding_bits=2)
    with pytest.raises(ConfigError, match="embedding-bits"):
        method_config("fp16", embedding_bits=4)
    assert method_config("int4").embedding_bits is None  # int4 takes 8, int8 the quantizer's own tables


def test_a_projection_shaped_like_a_table_is_no_head():
    """A square projection beside a square position table (GPT-2 medium: 1024 positions, width
    1024) is a projection: only MatMuls that write an output, or multiply by a table's
    transpose, are heads."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["positions", "ids"], ["embedded"], name="/wpe/Gather"),
         helper.make_node("MatMul", ["embedded", "proj"], ["hidden"], name="/h.0/attn/c_proj/MatMul"),
         helper.make_node("MatMul", ["hidden", "head"], ["logits"], name="/lm_head/MatMul")],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "positions"),
         numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32), "proj"),
         numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32), "head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, done = block_quantize_tables(model, bits=8, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"})
    assert done["heads"] == 1 and done["tied"] == 0 and done["tables"] == 1
    assert [n.op_type for n in model.graph.node if n.name == "/h.0/attn/c_proj/MatMul"] == ["MatMul"]


def test_a_table_something_else_reads_too_is_left_alone():
    """A table that another node reads as well (here a Transpose) would keep its float copy
    beside the blocks: it is not converted."""
    model, _, _ = _lookup_and_head(tied=False)
    model.graph.node.append(helper.make_node("Transpose", ["table"], ["table_t"], name="/other"))
    model.graph.output.append(helper.make_tensor_value_info("table_t", TensorProto.FLOAT, None))
    _, done = block_quantize_tables(model, bits=8, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"})
    assert done["tables"] == 0 and done["heads"] == 1
    assert "Gather" in [n.op_type for n in model.graph.node]


def test_embedding_bits_that_no_table_can_take_fail_in_one_line(tiny_dirs, tmp_path):
    """--embedding-bits asked for, but the tables are 32 wide and the blocks 64: one line, exit
    non-zero, no output folder (not a silent int8 export)."""
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "--quantize", "int8", "--embedding-bits", "4",
                                   "--block-size", "64", "-o", str(out)])
    assert res.exit_code != 0 and not out.exists()
    assert len(stderr_lines(res.stderr)) == 1 and "--embedding-bits 4" in res.stderr, res.stderr


def test_a_lookup_only_tables_scales_are_stored_in_float16_and_read_back_exactly():
    """An untied table's scales take 2 bytes each, behind a Cast: the lookup still gives the exact
    rows `quantize_rows` computes, whose scales float16 holds; rounding them again changes nothing,
    and a block of tiny values keeps them (its scale lifted to float16's smallest normal, not 0)."""
    model, table, _ = _lookup_and_head(tied=False)
    table[5, :16] = 1e-4  # a block whose scale (1.4e-5) is below float16's normal range
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(table, "table"))
    block_quantize_tables(model, bits=4, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"})
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    assert kinds["table_B4_scale"] == TensorProto.FLOAT16 and kinds["head_B4T_scale"] == TensorProto.FLOAT
    dequantized = quantize_rows(table, 4, 16)[2]
    np.testing.assert_array_equal(quantize_rows(dequantized, 4, 16)[2], dequantized)
    assert np.all(dequantized[5, :16] > 0)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    embedded, _ = session.run(None, {"ids": np.array([[5, 0, 49]], np.int64), "x": np.zeros((1, HIDDEN), np.float32)})
    np.testing.assert_array_equal(embedded[0], dequantized[[5, 0, 49]])


def test_hot_rows_keep_the_most_used_tokens_in_8_bits():
    """--embedding-hot-share: the most used 20% of the token table's rows in 8-bit blocks, the rest
    in 4; every lookup gives exactly the row its own table holds (hot rows within an 8-bit half
    step of the float row, 16x finer than 4 bits), and an unused row is never hot."""
    from compressor.grids.rows import dequantized_table, hot_row_order

    model, table, _ = _lookup_and_head(tied=False)
    counts = np.zeros(VOCAB, np.int64)
    counts[[4, 9, 17, 30]] = [50, 40, 30, 20]
    counts[40] = 100  # five used tokens: 20% of 50 rows is 10, only 5 used
    _, done = block_quantize_tables(model, bits=4, block_size=16, accuracy_level=1, heads={"/lm_head/MatMul"},
                                 row_counts=counts, hot_share=0.2, ids_input="ids")
    hot = hot_row_order(counts, 0.2)
    assert hot.tolist() == [40, 4, 9, 17, 30] and done["hot_rows"] == 5 and done["hot_tokens_read"] == 1.0
    assert len(hot_row_order(np.array([3, 2, 5, 1]), 0.9)) == 3  # never every row: the 4-bit table keeps one
    assert {t.name: t.data_type for t in model.graph.initializer}["table_slots"] == TensorProto.INT16  # 2 bytes a row
    ids = np.array([[40, 4, 0, 49], [30, 3, 17, 1]], np.int64)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    embedded, _ = session.run(None, {"ids": ids, "x": np.zeros((1, HIDDEN), np.float32)})
    expected = dequantized_table(table, 4, 16, hot)
    np.testing.assert_array_equal(embedded, expected[ids])
    step8 = np.abs(table[hot]).reshape(len(hot), -1, 16).max(-1) / 127 / 2
    assert np.all(np.abs(expected[hot] - table[hot]).reshape(len(hot), -1, 16).max(-1) <= step8 * 1.01 + 1e-7)
    cold = np.setdiff1d(np.arange(VOCAB), hot)
    assert np.abs(expected[cold] - table[cold]).max() > 4 * np.abs(expected[hot] - table[hot]).max()


def test_hot_rows_in_an_encoder_export_check_and_cost_less_than_an_8_bit_table(tiny_dirs, tmp_path):
    """A tiny BERT exported int8 with 4-bit tables and 10% hot rows: the token table alone split
    (positions and token types stay 4-bit), the check passing, the token table's bytes (its
    blocks, scales and slots) between the 4-bit and the 8-bit table's."""
    loaded = load_model(str(tiny_dirs["bert"]))
    sizes, records = {}, {}
    for name, bits, share in (("b4", 4, 0.0), ("hot", 4, 0.1), ("b8", 8, 0.0)):
        records[name] = export(loaded, ExportConfig(check_lengths=[8, 32]), tmp_path / name,
                               quantize=method_config("int8", embedding_bits=bits, embedding_hot_share=share))
        graph = onnx.load(str(tmp_path / name / "model.onnx"))
        sizes[name] = sum(len(t.raw_data) for t in graph.graph.initializer
                          if t.name.startswith("embeddings.word_embeddings.weight"))
    tables = records["hot"].metrics["graph"]["tables"]
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    assert tables["hot_rows"] == round(0.1 * vocab) and tables["operators"]["GatherBlockQuantized"] == 4
    assert tables["hot_rows_counted_on"] == "packaged calibration text"
    from compressor.export.render import export_summary_rows

    line = dict(export_summary_rows(records["hot"]))["embeddings"]
    assert line.startswith("3 tables as 4-bit blocks of 32; the 13 most used token rows in 8 bits (") and \
        line.endswith("of the tokens of packaged calibration text)"), line
    assert records["hot"].metrics["check"]["mean_cosine"] >= records["b4"].metrics["check"]["mean_cosine"] - 1e-4
    assert sizes["b4"] < sizes["hot"] < sizes["b8"]


def test_hot_rows_are_checked_and_refused_where_a_head_reads_the_table(tiny_dirs, tmp_path):
    for bad in (dict(embedding_bits=4, embedding_hot_share=1.0), dict(embedding_bits=8, embedding_hot_share=0.1),
                dict(embedding_hot_share=0.1), dict(embedding_bits=4, embedding_hot_share="0.1")):
        with pytest.raises(ConfigError, match="embedding-hot-share"):
            method_config("int8", **bad)
    assert method_config("int8", embedding_bits=4, embedding_hot_share=0.1, calibration="movie-snippets").calibration
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "out"  # GPT-2 ties its table to the head: one set of blocks, one precision
    res = CliRunner().invoke(cli, ["export", str(tiny_dirs["gpt2"]), "--quantize", "int4", "--embedding-bits", "4",
                                   "--block-size", "16", "--embedding-hot-share", "0.1", "-o", str(out)])
    assert res.exit_code != 0 and not out.exists()
    assert len(stderr_lines(res.stderr)) == 1 and "--embedding-hot-share" in res.stderr, res.stderr


@pytest.mark.parametrize("bits", [4, 8])
def test_searched_block_scales_round_what_was_rounded_to_itself_in_numpy_and_torch(bits):
    """A block whose peak was clipped onto the lowest code (-8, -128) finds its own scale again,
    so a table trained on its blocks is stored as trained; torch's rounding is numpy's."""
    import torch

    from compressor.grids.aware import round_rows

    rng = np.random.default_rng(bits)
    rows = rng.standard_t(3, (64, 64)).astype(np.float32)  # heavy tails: clipped peaks
    rows[::3, 5] = -np.abs(rows).max() * 2  # negative peaks
    once = quantize_rows(rows, bits, 16)[2]
    np.testing.assert_array_equal(quantize_rows(once, bits, 16)[2], once)
    np.testing.assert_array_equal(round_rows(torch.from_numpy(rows), bits, 16).numpy(), once)


def test_int4_picks_4_bit_tables_for_an_encoder_whose_tables_are_a_large_share(tiny_dirs, tmp_path):
    """--quantize int4 with no --embedding-bits: an encoder shared 4 -> 1, whose tables are about
    half its weights, gets 4-bit tables (the record says why) and checks itself; a decoder, whose
    head reads its table, keeps 8-bit blocks."""
    from compressor.sharing import ShareConfig, share

    encoder, _ = share(load_model(str(tiny_dirs["bert"])), ShareConfig(plan="0-3", lora_rank=0, fidelity=False))
    m = export(encoder, ExportConfig(check_lengths=[8, 32]), tmp_path / "bert",
               quantize=method_config("int4", block_size=16)).metrics
    assert m["graph"]["table_bits_default"]["bits"] == 4 and m["graph"]["table_bits_default"]["tables_share_of_weights"] >= 0.25
    assert m["graph"]["embeddings"] == "4-bit blocks" and m["check"]["mean_cosine"] >= 0.8
    decoder = load_model(str(tiny_dirs["llama"]))
    d = export(decoder, ExportConfig(check_lengths=[8, 32]), tmp_path / "llama",
               quantize=method_config("int4", block_size=16)).metrics
    assert d["graph"]["table_bits_default"]["bits"] == 8
