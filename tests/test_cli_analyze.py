"""`compress analyze` through click's CliRunner, and once as the installed program."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import cli


def run(*args):
    result = CliRunner().invoke(cli, ["analyze", *map(str, args)])
    return result


def test_writes_json_markdown_and_heatmaps(tiny_dirs, tmp_path):
    out = tmp_path / "report"
    result = run(tiny_dirs["llama"], "--groups", "2", "-o", out, "--max-samples", "8")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["analysis.json", "analysis.md", "similarity.png", "weights_by_sublayer.png"]
    record = json.loads((out / "analysis.json").read_text())
    m = record["metrics"]
    assert record["stage"] == "analyze" and record["config"]["groups"] == 2
    n = m["model"]["num_layers"]
    assert n == 4
    for role in m["weights"]["sublayers"]:  # a random-init tiny model: unrelated layers
        assert all(abs(m["weights"]["raw"][role][i][j]) < 0.5 for i in range(n) for j in range(n) if i != j)
    assert m["weights"]["sublayers"] == ["query", "key", "value", "attn_out", "ffn_gate", "ffn_in", "ffn_out"]
    assert len(m["activations"]["block_influence"]) == n
    assert m["activations"]["num_texts"] == 8
    assert len(m["grouping"]["recommended"]["groups"]) == 2
    assert set(m["grouping"]["by_groups"]) == {"1", "2", "3", "4"}
    assert m["grouping"]["by_groups"]["4"]["score"] == 1.0
    assert (out / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "analysis.md").read_text()
    assert "## Adjacent layers" in md and "FFN gate" in md
    assert "Recommended --groups 2" in result.output


def test_json_to_stdout_and_custom_data(tiny_dirs, tmp_path):
    data = tmp_path / "cal.jsonl"
    data.write_text("\n".join(json.dumps({"body": f"sentence number {i}"}) for i in range(5)))
    result = run(tiny_dirs["gpt2"], "--json", "-", "--data", data, "--metric", "angular", "--no-weights")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert "weights" not in record["metrics"]
    assert record["metrics"]["activations"]["num_texts"] == 5
    assert record["metrics"]["grouping"]["metric"] == "angular"


def test_weights_only_defaults_to_aligned_weight_metric(tiny_dirs, tmp_path):
    result = run(tiny_dirs["distilbert"], "--no-activations", "--json", tmp_path / "a.json", "--markdown", tmp_path / "a.md")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["metrics"]["grouping"]["metric"] == "aligned-weight"
    assert "activations" not in record["metrics"]
    assert (tmp_path / "a.md").read_text().startswith("# Layer similarity analysis")


def _bad_cases(tiny_dirs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    not_model = tmp_path / "not_model"
    not_model.mkdir()
    (not_model / "notes.txt").write_text("x")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5"}')
    bert = tiny_dirs["bert"]
    one_char = tmp_path / "one.txt"
    one_char.write_text("a\n")
    mismatched = tmp_path / "mismatched"  # a BERT config beside GPT-2 weights
    shutil.copytree(tiny_dirs["gpt2"], mismatched)
    shutil.copy(bert / "config.json", mismatched / "config.json")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bert, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_st = tmp_path / "bad_st"
    bad_st.mkdir()
    (bad_st / "modules.json").write_text("[1, 2]")
    return {
        "missing path": ([tmp_path / "missing"], "does not exist"),
        "not a model": ([not_model], "not a Hugging Face model folder"),
        "unsupported": ([t5], "t5 is an encoder-decoder model"),
        "groups 0": ([bert, "--groups", "0"], "--groups must be at least 1"),
        "too many groups": ([bert, "--groups", "5"], "more than the model's 4 layers"),
        "empty data": ([bert, "--data", empty], "contains no text"),
        "bad encoding": ([bert, "--data", latin], "not valid utf-8"),
        "missing data": ([bert, "--data", tmp_path / "nope.csv"], "does not exist"),
        "hub offline": (["bert-base"], "pass a local model folder"),
        "bad encoding name": ([bert, "--data", empty, "--encoding", "nosuch"], "unknown encoding"),
        "no cuda": ([bert, "--device", "cuda"], "CUDA is not available"),
        "bad device": ([bert, "--device", "tpu9"], "device"),
        "not an integer": ([bert, "--groups", "abc"], "'abc' is not a valid integer"),
        "one token": ([bert, "--data", one_char, "--no-weights"], "give more text"),
        "wrong weights": ([mismatched], "do not match its config"),
        "corrupt weights": ([corrupt], "could not load the weights"),
        "bad modules.json": ([bad_st], "not a sentence-transformers module list"),
    }


@pytest.mark.parametrize("case", ["missing path", "not a model", "unsupported", "groups 0", "too many groups",
                                  "empty data", "bad encoding", "missing data", "hub offline", "bad encoding name",
                                  "no cuda", "bad device", "not an integer", "one token", "wrong weights",
                                  "corrupt weights", "bad modules.json"])
def test_bad_input_one_line_exit_2_nothing_written(tiny_dirs, tmp_path, case):
    args, message = _bad_cases(tiny_dirs, tmp_path)[case]
    out = tmp_path / "out"
    result = run(*args, "-o", out, "--json", tmp_path / "r.json")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("compress: error: ")
    assert message in result.stderr
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_output_paths_that_cannot_work_fail_before_the_analysis(tiny_dirs, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run(tiny_dirs["bert"], "-o", afile / "sub")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    same = tmp_path / "same"
    result = run(tiny_dirs["bert"], "-o", same, "--plots", same)
    assert result.exit_code == 2 and "given for two outputs" in result.stderr and not same.exists()
    result = run(tiny_dirs["bert"], "--json", tmp_path / "y.md", "--markdown", tmp_path / "y.md")
    assert result.exit_code == 2 and not (tmp_path / "y.md").exists()


def test_existing_output_needs_overwrite(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = run(tiny_dirs["bert"], "-o", out, "--no-activations")
    assert result.exit_code == 2 and "already exists; pass --overwrite" in result.stderr
    assert (out / "mine.txt").read_text() == "keep me"
    result = run(tiny_dirs["bert"], "-o", out, "--no-activations", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "mine.txt").exists() and (out / "analysis.json").exists()
    existing = tmp_path / "r.json"
    existing.write_text("old")
    result = run(tiny_dirs["bert"], "--json", existing, "--no-activations")
    assert result.exit_code == 2 and existing.read_text() == "old"


@pytest.mark.slow  # a fresh process of the installed program on the real MiniLM: ~7 s
def test_installed_compress_program(tiny_dirs, tmp_path):
    exe = shutil.which("compress", path=str(Path(sys.executable).parent)) or shutil.which("compress")
    assert exe, "the `compress` console script is not installed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([exe, "analyze", str(tiny_dirs["qwen2"]), "--groups", "2", "--json", "-"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["metrics"]["model"]["model_type"] == "qwen2"
    assert len(record["metrics"]["grouping"]["recommended"]["groups"]) == 2
    bad = subprocess.run([exe, "analyze", str(tmp_path / "missing")], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


def test_validate_applies_the_plans_and_ranks_them_by_measured_damage(tiny_dirs, tmp_path):
    """--validate K: K group counts, each shared and (as many blocks) dropped, measured on held-out text."""
    from click.testing import CliRunner

    from cli.main import cli

    out = tmp_path / "a"
    result = CliRunner().invoke(cli, ["analyze", str(tiny_dirs["llama"]), "--validate", "3", "-o", str(out),
                                      "--no-weights", "--json", "-"])
    assert result.exit_code == 0, result.output
    v = json.loads(result.stdout)["metrics"]["validation"]
    assert v["measure"] == "next_token_kl" and not v["higher_is_better"] and v["held_out_texts"] >= 8
    assert [p["kind"] for p in v["plans"]] == ["share", "drop"] * 3
    assert all(p["measured"] >= 0 for p in v["plans"]) and len(v["ranked"]) == 6
    measured = sorted(p["measured"] for p in v["plans"])
    assert [next(p for p in v["plans"] if (p.get("plan") or f"drop {p['dropped']}") == r)["measured"]
            for r in v["ranked"]] == measured  # ranked by the measured number, least damage first
    assert v["rank_correlation"] is None or -1 <= v["rank_correlation"] <= 1
    assert "Plans applied and measured" in (out / "analysis.md").read_text()
    bad = CliRunner().invoke(cli, ["analyze", str(tiny_dirs["llama"]), "--validate", "9", "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "plans that share layers" in bad.output and not (tmp_path / "b").exists()


def test_sharing_a_layer_with_its_permuted_copy_measures_no_damage(tiny_dirs):
    import torch

    from compressor.adapters.alignment import permute_weights
    from compressor.analysis.validate import averaged_copy
    from compressor.fidelity import fidelity
    from compressor.models import load_model
    from test_alignment import random_permutation

    loaded = load_model(str(tiny_dirs["bert"]))
    adapter = loaded.adapter
    g = adapter.geometry(loaded.model.config)
    blocks = adapter.blocks(loaded.model)
    w, b = adapter.block_weights(blocks[0], g)
    with torch.no_grad():
        adapter.load_block_weights(blocks[1], *permute_weights(w, b, random_permutation(g, 3), g), g)
    shared = averaged_copy(loaded, [[0, 1], [2], [3]])
    assert fidelity(shared, loaded, ["a text to compare on", "and another one"])["embedding_cosine"] > 0.99999
