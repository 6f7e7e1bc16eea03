"""`compress report` on a tiny BERT: the original, optimum's baselines and two variants side by side."""

from __future__ import annotations

import pytest

import csv
import json
import random
import shutil

from click.testing import CliRunner

from cli.main import cli
from compressor.export import ExportConfig, export
from compressor.models import load_model
from compressor.quantization import method_config
from compressor.sharing import ShareConfig, save_checkpoint, share
from conftest import stderr_lines


def labelled_csv(path, rows=60):
    """Two classes: words spelled from the first half of the alphabet, or from the second."""
    rng = random.Random(0)
    halves = {"pos": "abcdefghijklm", "neg": "nopqrstuvwxyz"}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = "pos" if i % 2 else "neg"
            words = ("".join(rng.choices(halves[label], k=rng.randint(2, 7))) for _ in range(rng.randint(3, 8)))
            writer.writerow([" ".join(words) + ".", label])
    return path


def test_report_compares_variants_with_the_original_and_optimums_baselines(tiny_dirs, tmp_path):
    original = str(tiny_dirs["bert"])
    int8 = tmp_path / "int8"
    export(load_model(original), ExportConfig(), int8, quantize=method_config("int8"))
    shared, _ = share(load_model(original), ShareConfig(plan="0-1,2-3", fidelity=False))
    save_checkpoint(shared, tmp_path / "shared")
    data = labelled_csv(tmp_path / "reviews.csv")
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, [
        "report", str(int8), str(tmp_path / "shared"), "-o", str(out), "--original", original,
        "--names", "ours int8,shared", "--baselines", "--repeats", "2", "--warmup", "1", "--batch-sizes", "1,4",
        "--seq-len", "16", "--threads", "1", "--data", str(data), "--train-size", "36", "--test-size", "24",
        "--json", "-"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)  # the record alone on stdout; the steps on stderr
    steps = [line for line in res.stderr.splitlines() if line.startswith("report: ")]
    assert steps[0].startswith("report: exporting the baselines") and len(steps) == 2 + len(result["rows"])
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "report.png", "baselines"}
    assert json.loads((out / "report.json").read_text())["rows"] == result["rows"]
    assert (out / "report.png").stat().st_size > 1000

    rows = {r["label"]: r for r in result["rows"]}
    assert [r["label"] for r in result["rows"]] == ["original", "optimum ONNX fp32", "optimum ONNX int8",
                                                   "optimum O2 fp32", "optimum O2 int8", "ours int8", "shared"]
    assert [r["kind"] for r in result["rows"]] == ["PyTorch fp32", "ONNX fp32", "ONNX int8", "ONNX fp32", "ONNX int8",
                                                  "ONNX int8", "PyTorch fp32"]
    assert result["task"] == "feature-extraction" and result["metric"] == "probe accuracy"
    base, fp32, q8 = rows["original"], rows["optimum ONNX fp32"], rows["optimum ONNX int8"]
    # optimum's plain export is the same model: same metric, embeddings the same up to rounding
    # (on a random tiny model the probe's accuracy itself says little; fidelity is the sharp check)
    assert fp32["value"] == base["value"] and fp32["of_original"] == 1.0
    assert fp32["fidelity"] > 0.999 and base["fidelity"] is None
    assert 0.9 < q8["fidelity"] <= 1.0 + 1e-6 and 0.9 < rows["ours int8"]["fidelity"] <= 1.0 + 1e-6
    assert q8["size_bytes"] < fp32["size_bytes"]
    assert rows["ours int8"]["size_bytes"] == (int8 / "model.onnx").stat().st_size
    assert rows["shared"]["parameters"] < base["parameters"]
    for row in result["rows"]:
        assert 0.0 <= row["value"] <= 1.0
        assert set(row["latency"]) == {"1", "4"}
        for lat in row["latency"].values():
            assert 0 < lat["p50_ms"] <= lat["p90_ms"] and lat["throughput"] > 0
        # a tiny model's call takes well under the 50 ms a timed run lasts: several calls a run
        assert row["latency"]["1"]["calls_per_run"] > 1
        assert row["size_vs_optimum_int8"] > 0 and row["speedup_vs_optimum_int8"] > 0
    assert q8["size_vs_optimum_int8"] == 1.0
    # optimum's O2 route: the fused graph computes the same embeddings; its int8 is smaller
    o2, o2q = rows["optimum O2 fp32"], rows["optimum O2 int8"]
    assert o2["fidelity"] > 0.999 and 0.9 < o2q["fidelity"] <= 1.0 + 1e-6
    assert o2q["size_vs_optimum_o2_int8"] == 1.0 and o2q["size_bytes"] < o2["size_bytes"] / 2
    assert all(r["speedup_vs_optimum_o2_int8"] > 0 for r in result["rows"])
    # speed against O2 int8 at every batch size measured, each from that batch's medians
    for row in result["rows"]:
        assert set(row["speedups_vs_optimum_o2_int8"]) == {"1", "4"}
        for b, speed in row["speedups_vs_optimum_o2_int8"].items():
            assert speed == pytest.approx(o2q["latency"][b]["p50_ms"] / row["latency"][b]["p50_ms"])
    assert o2q["speedups_vs_optimum_o2_int8"] == {"1": 1.0, "4": 1.0}
    assert "size vs optimum O2 int8" in (out / "report.md").read_text()
    assert "| speed vs optimum O2 int8 (b1) | speed vs optimum O2 int8 (b4) |" in (out / "report.md").read_text()
    prov = result["provenance"]
    assert prov["threads"] == 1 and prov["packages"]["onnxruntime"] and prov["packages"]["torch"]
    assert result["config"]["batch_sizes"] == [1, 4] and result["config"]["repeats"] == 2
    md = (out / "report.md").read_text()
    assert all(f"| {label} |" in md for label in rows)
    assert "on 24 test texts" in md  # fidelity is measured on the test split, which is smaller than 500


def test_report_refuses_bad_input_and_writes_nothing(tiny_dirs, tmp_path):
    runner = CliRunner()
    not_a_folder = tmp_path / "model.onnx"
    not_a_folder.write_text("")
    out = tmp_path / "report"
    for args in ([str(not_a_folder)], [str(tmp_path / "missing")], [str(tmp_path), "--names", "a,b"],
                 [str(tmp_path), "--batch-sizes", "1,x"]):
        res = runner.invoke(cli, ["report", *args, "-o", str(out), "--original", str(tiny_dirs["bert"])])
        assert res.exit_code == 2, (args, res.output)
        assert len(stderr_lines(res.stderr)) == 1, res.stderr
    assert not out.exists()

    # a sequence longer than the model reads; an export folder whose model.onnx is not ONNX
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dirs["bert"], broken)
    (broken / "model.onnx").write_text("not a protobuf")
    for args, words in (([str(tiny_dirs["bert"]), "--seq-len", "4096"], "--seq-len 4096 is longer than"),
                        ([str(broken)], "is not an ONNX model onnxruntime can load")):
        res = runner.invoke(cli, ["report", *args, "-o", str(out), "--original", str(tiny_dirs["bert"]),
                                  "--no-baselines", "--repeats", "1", "--warmup", "0"])
        assert res.exit_code == 2, (args, res.output)
        lines = stderr_lines(res.stderr)
        assert len(lines) == 1 and words in lines[0], res.stderr
    assert not out.exists()


def test_report_scores_every_row_on_the_quality_suite(tiny_dirs, tmp_path):
    original = str(tiny_dirs["bert"])
    int8 = tmp_path / "int8"
    export(load_model(original), ExportConfig(check_lengths=[8]), int8, quantize=method_config("int8"))
    tasks = f"{labelled_csv(tmp_path / 'a.csv')},{labelled_csv(tmp_path / 'b.csv', rows=80)}"
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, [
        "report", str(int8), "-o", str(out), "--original", original, "--no-baselines", "--repeats", "1",
        "--warmup", "0", "--batch-sizes", "2", "--seq-len", "16", "--threads", "1", "--data", str(tmp_path / "a.csv"),
        "--train-size", "30", "--test-size", "20", "--suite", "--suite-tasks", tasks, "--suite-train-size", "30",
        "--suite-test-size", "20", "--pool-size", "30", "--neighbours", "5", "--json", "-"])
    assert res.exit_code == 0, res.output
    base, ours = json.loads(res.stdout)["rows"]
    assert base["suite"]["neighbour_agreement"] == 1.0 and base["suite"]["retained"] == 1.0
    assert set(base["suite"]["tasks"]) == {str(tmp_path / "a.csv"), str(tmp_path / "b.csv")}
    assert 0.0 < ours["suite"]["neighbour_agreement"] <= 1.0 and ours["suite"]["retained"] > 0
    for task in ours["suite"]["tasks"].values():
        p, n = task["accuracy"], task["n_test"]
        assert n == 20 and abs(task["stderr"] - (p * (1 - p) / n) ** 0.5) < 1e-9
    assert "neighbour agreement @5" in (out / "report.md").read_text()

    res = CliRunner().invoke(cli, ["report", "-o", str(tmp_path / "r2"), "--original", str(tiny_dirs["llama"]),
                                   "--no-baselines", "--suite"])
    assert res.exit_code == 2 and "--suite scores sentence embeddings" in res.stderr and not (tmp_path / "r2").exists()


def test_report_measures_generation_of_a_causal_lm(tiny_dirs, tmp_path):
    """A causal LM's report has a generation table: time to first token, decode tokens/s and
    greedy agreement, for PyTorch and a KV-cache export (which reproduces the original's tokens)."""
    original = tiny_dirs["llama"]
    ours = tmp_path / "ours"
    export(load_model(original), ExportConfig(check_lengths=[8]), ours)
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, [
        "report", str(ours), "-o", str(out), "--original", str(original), "--no-baselines", "--no-peak-memory",
        "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "--seq-len", "16", "--threads", "1",
        "--prompt-tokens", "24", "--new-tokens", "8", "--generation-repeats", "2", "--test-size", "16", "--json", "-"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["ours"]["kind"] == "ONNX fp32 + KV cache" and rows["original"]["kind"] == "PyTorch fp32"
    for row in rows.values():
        g = row["generation"]
        assert g["ttft_ms"] > 0 and g["decode_tokens_per_s"] > 0 and "peak_rss_mib" not in g
    assert rows["ours"]["generation"]["greedy_agreement"] == 1.0 == rows["ours"]["fidelity"]
    assert abs(rows["ours"]["value"] / rows["original"]["value"] - 1) < 1e-3  # perplexity: the same model
    md = (out / "report.md").read_text()
    assert "| time to first token (ms) | decode tokens/s |" in md and "24-token prompt, 8 new tokens" in md

    # a prompt and its new tokens past the model's 128 positions: one line, nothing written
    out2 = tmp_path / "report2"
    res = CliRunner().invoke(cli, ["report", str(ours), "-o", str(out2), "--original", str(original),
                                   "--no-baselines", "--prompt-tokens", "100", "--new-tokens", "64"])
    assert res.exit_code == 2, res.output
    lines = stderr_lines(res.stderr)
    assert len(lines) == 1 and "--prompt-tokens 100 + --new-tokens 64 is longer than" in lines[0], res.stderr
    assert not out2.exists()


@pytest.mark.slow  # a full report with optimum's baselines and peak memory in fresh processes: ~30 s
def test_report_on_a_decoder_whose_tokenizer_has_no_pad_token(tmp_path):
    """Real decoders (Llama, SmolLM2) ship no pad token; optimum's baseline export keeps the
    tokenizer as it is, and the report pads every row's inputs all the same."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_model, make_tokenizer

    folder = tmp_path / "llama"
    make_model("llama").save_pretrained(folder)
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    int8 = tmp_path / "int8"
    export(load_model(folder), ExportConfig(check_lengths=[8]), int8, quantize=method_config("int8"))
    out = tmp_path / "report"
    res = CliRunner().invoke(cli, [
        "report", str(int8), "-o", str(out), "--original", str(folder), "--repeats", "1", "--warmup", "1",
        "--batch-sizes", "1,2", "--seq-len", "16", "--threads", "1", "--prompt-tokens", "32", "--new-tokens", "8",
        "--generation-repeats", "1", "--json", "-"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert [r["label"] for r in rows][:3] == ["original", "optimum ONNX fp32", "optimum ONNX int8"]
    assert all(r["latency"] for r in rows) and rows[0]["metric"] == "perplexity"
    # optimum's baselines are its with-past exports, and the generation figures are set against its fp32
    assert [r["kind"] for r in rows[1:3]] == ["ONNX fp32 + KV cache", "ONNX int8 + KV cache"]
    assert rows[1]["generation"]["decode_vs_optimum_fp32"] == 1.0 and rows[1]["generation"]["greedy_agreement"] == 1.0
    for r in rows:
        g = r["generation"]
        assert g["peak_rss_mib"] > 100 and 0 <= g["model_rss_mib"] < g["peak_rss_mib"]
        assert g["size_vs_optimum_fp32"] > 0 and g["decode_tokens_per_s"] > 0


def test_peak_memory_of_a_fresh_process_is_its_own_not_its_parents():
    """Linux carries getrusage's ru_maxrss across execve: a child of a big process would report
    the parent's peak. The figure the report uses is the child's own."""
    import subprocess
    import sys

    ballast = bytearray(600 * 2**20)  # the parent holds 600 MiB while the child starts
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touched, so it is resident
    code = ("import numpy as np; from compressor.io import peak_rss_mib as p; a = p(); "
            "x = np.ones(300 * 2**20 // 8); b = p(); print(a, b)")
    before, after = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split())
    del ballast
    assert before < 400, before  # not the parent's 600 MiB and more
    assert after - before > 250, (before, after)  # the child's own 300 MiB array shows


def test_report_without_optimums_fp32_rows_keeps_its_int8_routes(tiny_dirs, tmp_path):
    """--no-fp32-baselines: optimum's int8 routes (built from its fp32 exports) stay rows and the
    speed and size ratios against them; the fp32 exports, which score what the original scores,
    are not measured."""
    original = str(tiny_dirs["bert"])
    data = labelled_csv(tmp_path / "reviews.csv")
    res = CliRunner().invoke(cli, [
        "report", original, "-o", str(tmp_path / "r"), "--original", original, "--names", "again",
        "--no-fp32-baselines", "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "--seq-len", "16",
        "--threads", "1", "--data", str(data), "--train-size", "36", "--test-size", "24", "--json", "-"])
    assert res.exit_code == 0, res.output
    rows = {r["label"]: r for r in json.loads(res.stdout)["rows"]}
    assert list(rows) == ["original", "optimum ONNX int8", "optimum O2 int8", "again"]
    assert rows["optimum O2 int8"]["speedups_vs_optimum_o2_int8"] == {"1": 1.0}
    assert rows["optimum ONNX int8"]["size_vs_optimum_int8"] == 1.0 and rows["again"]["fidelity"] > 0.999
