"""Encoder exports in the sentence-transformers layout, and sentence pooling inside the graph."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.export import ExportConfig, export
from compressor.export.sentence import reference_embeddings
from compressor.models import load_model
from compressor.quantization import method_config
from compressor.sharing import ShareConfig, save_checkpoint, share
from conftest import stderr_lines

TEXTS = ["The film is a joy from start to finish.", "A dull, lifeless script.",
         "Nothing about it works, and it goes on for far too long, scene after scene."]


def st_folder(tiny_dirs, tmp_path, pooling: str = "cls", normalize: bool = True):
    """The tiny BERT as a sentence-transformers model: CLS pooling (not the mean a folder
    without modules.json falls back to) and a Normalize module."""
    folder = tmp_path / "st-bert"
    shutil.copytree(tiny_dirs["bert"], folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                 "pooling_mode_cls_token": pooling == "cls",
                                                                 "pooling_mode_mean_tokens": pooling == "mean"}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48, "do_lower_case": False}))
    return folder


def test_shared_encoder_export_runs_in_sentence_transformers_as_in_pytorch(tiny_dirs, tmp_path):
    """Pooling and Normalize travel from the source through a shared checkpoint into the export;
    sentence-transformers' ONNX backend then gives the compressed PyTorch model's embeddings."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from sentence_transformers import SentenceTransformer

    source = load_model(st_folder(tiny_dirs, tmp_path))
    assert (source.pooling, source.normalize) == ("cls", True)
    shared, _ = share(source, ShareConfig(plan="0-1,2-3", lora_rank=4, fidelity=False))
    save_checkpoint(shared, tmp_path / "shared")
    compressed = load_model(tmp_path / "shared")
    assert (compressed.pooling, compressed.normalize) == ("cls", True)
    out = tmp_path / "onnx"
    record = export(compressed, ExportConfig(check_lengths=[8, 32]), out)

    st = record.metrics["check"]["sentence_transformers"]
    assert st["modules"] == ["Transformer", "Pooling", "Normalize"] and st["min_cosine"] >= 0.9999
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 48  # the source's
    model = SentenceTransformer(str(out), backend="onnx", device="cpu")
    got = model.encode(TEXTS, convert_to_tensor=True).float()
    enc = compressed.tokenizer(TEXTS, padding=True, return_tensors="pt")
    ref = reference_embeddings(compressed.adapter.base(compressed.model), compressed, dict(enc))
    assert torch.nn.functional.cosine_similarity(got, ref).min() >= 0.9999
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-3)
    # CLS pooling, not the mean pooling sentence-transformers falls back to without modules.json
    mean = torch.nn.functional.normalize(
        (compressed.adapter.base(compressed.model)(**enc).last_hidden_state * enc["attention_mask"][..., None]).sum(1)
        / enc["attention_mask"].sum(1, keepdim=True), dim=-1)
    assert torch.nn.functional.cosine_similarity(got, mean.detach()).min() < 0.999
    # and optimum still loads the very same folder
    ORTModelForFeatureExtraction.from_pretrained(out)(**enc)


def test_a_model_that_does_not_normalize_gets_no_normalize_module(tiny_dirs, tmp_path):
    out = tmp_path / "onnx"
    record = export(load_model(st_folder(tiny_dirs, tmp_path, pooling="mean", normalize=False)),
                    ExportConfig(check_lengths=[8]), out, quantize=method_config("int8"))
    st = record.metrics["check"]["sentence_transformers"]
    assert st["modules"] == ["Transformer", "Pooling"] and not (out / "2_Normalize").exists()
    assert st["norm_max"] - st["norm_min"] > 1e-3  # norms are the model's own
    assert st["needs"] == {"mean_cosine": method_config("int8").min_cosine} and st["mean_cosine"] >= st["needs"]["mean_cosine"]


def test_pooling_in_graph_outputs_the_sentence_embedding_in_plain_onnxruntime(tiny_dirs, tmp_path):
    loaded = load_model(st_folder(tiny_dirs, tmp_path))
    out = tmp_path / "onnx"
    res = CliRunner().invoke(cli, ["export", str(tmp_path / "st-bert"), "-o", str(out), "--pooling-in-graph",
                                   "--check-lengths", "8,32"])
    assert res.exit_code == 0, res.output
    assert "sentence_embedding" in res.output and "passed" in res.output
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="np")
    got = session.run(["sentence_embedding"], {i.name: enc[i.name] for i in session.get_inputs()})[0]
    ref = reference_embeddings(loaded.adapter.base(loaded.model), loaded,
                               {k: torch.from_numpy(v) for k, v in enc.items()}).numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-3)
    # the shared-weight accounting still holds: the wrapper adds no stored numbers
    report = json.loads((out / "export_report.json").read_text())
    assert report["params_after"] <= report["params_before"] * 1.01


def test_pooling_in_graph_on_a_decoder_and_stale_files_are_refused_or_replaced(tiny_dirs, tmp_path):
    out = tmp_path / "onnx"
    res = CliRunner().invoke(cli, ["export", str(tiny_dirs["llama"]), "-o", str(out), "--pooling-in-graph"])
    assert res.exit_code == 2 and not out.exists()
    lines = stderr_lines(res.stderr)
    assert len(lines) == 1 and "--pooling-in-graph" in lines[0], res.stderr

    # a folder that holds another model: refused without --overwrite, replaced whole with it
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "model.onnx").write_text("another model")
    (out / "2_Normalize").mkdir()
    res = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "-o", str(out), "--check-lengths", "8"])
    assert res.exit_code == 2 and (out / "onnx" / "model.onnx").read_text() == "another model"
    res = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "-o", str(out), "--check-lengths", "8",
                                   "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "onnx").exists() and not (out / "2_Normalize").exists()  # no stale model for ST to find
    assert json.loads((out / "modules.json").read_text())[1]["path"] == "1_Pooling"


@pytest.mark.slow  # the real all-MiniLM-L6-v2 through sentence-transformers: ~15 s
def test_minilm_export_matches_its_own_sentence_transformers_pipeline(tmp_path):
    from sentence_transformers import SentenceTransformer

    from compressor.models import bundled_model_dir

    out = tmp_path / "onnx"
    export(load_model(None), ExportConfig(check_lengths=[8, 32]), out)
    ours = SentenceTransformer(str(out), backend="onnx", device="cpu").encode(TEXTS, convert_to_tensor=True)
    theirs = SentenceTransformer(str(bundled_model_dir()), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, theirs).min() >= 0.9999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-3)


def test_optimized_export_fuses_attention_and_keeps_shared_weights_once(tiny_dirs, tmp_path):
    """onnxruntime's O2 fusions on a shared model: every layer's attention fused, the fused
    query/key/value weights of a group stored once, fp32 still equal to PyTorch, int8 fused too."""
    import onnx

    shared, _ = share(load_model(tiny_dirs["bert"]), ShareConfig(plan="0-1,2-3", lora_rank=0, fidelity=False))
    save_checkpoint(shared, tmp_path / "shared")
    compressed = load_model(tmp_path / "shared")
    fp32 = export(compressed, ExportConfig(check_lengths=[8, 32], optimize=2), tmp_path / "fp32")
    layers = compressed.geometry.num_layers
    optimized = fp32.metrics["graph"]["optimized"]
    assert optimized["fused"]["Attention"] == layers and optimized["copies_merged"] >= 2
    assert fp32.params_after <= fp32.params_before  # the per-layer copies of a group's weights merged
    assert fp32.metrics["check"]["max_abs_diff"] < 1e-4
    plain = export(compressed, ExportConfig(check_lengths=[8]), tmp_path / "plain")
    assert abs(fp32.params_after - plain.params_after) <= 2 * 1024  # the optimizer's odd constant aside

    int8 = export(compressed, ExportConfig(check_lengths=[8, 32], optimize=2), tmp_path / "int8",
                  quantize=method_config("int8"))
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "QAttention" in ops and "Attention" not in ops
    proj = int8.metrics["projections"]
    assert proj["on_weights"] > 0 and proj["float_on_weights"] == 0
    assert int8.params_after <= int8.params_before

    for args, words in ((["--optimize", "2", "--quantize", "int8-static", "--calibration", "movie-snippets",
                          str(tiny_dirs["llama"])], "is not supported for text-generation-with-past"),
                        (["--optimize", "2", "--quantize", "int4", str(tiny_dirs["bert"])], "is not supported"),
                        (["--optimize", "3", str(tiny_dirs["bert"])], "the levels are 0, 1 and 2")):
        res = CliRunner().invoke(cli, ["export", *args, "-o", str(tmp_path / "refused")])
        assert res.exit_code == 2 and not (tmp_path / "refused").exists(), res.output
        assert len(stderr_lines(res.stderr)) == 1 and words in res.stderr, res.stderr


def test_the_sentence_checks_fail_on_a_layout_or_graph_that_strays(tiny_dirs, tmp_path):
    """The sentence-transformers check fails when the folder's pooling is not the model's; the
    comparison behind both checks fails on strayed embeddings and on norms that are not 1."""
    from compressor.errors import ExportError
    from compressor.export.sentence import check_sentence_transformers, compare_embeddings

    loaded = load_model(st_folder(tiny_dirs, tmp_path))  # CLS pooling, normalized
    out = tmp_path / "onnx"
    export(loaded, ExportConfig(check_lengths=[8]), out)
    pooling = out / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**cfg, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    base = loaded.adapter.base(loaded.model)
    with pytest.raises(ExportError, match="lowest cosine"):
        check_sentence_transformers(out, base, loaded, TEXTS, None)

    ref = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert compare_embeddings(ref.clone(), ref, loaded, None, "x")["passed"]
    with pytest.raises(ExportError, match="mean cosine"):
        compare_embeddings(-ref, ref, loaded, 0.9, "x")
    with pytest.raises(ExportError, match="norms"):
        compare_embeddings(ref * 3, ref, loaded, None, "x")  # the right direction, not normalized
