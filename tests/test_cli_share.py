"""`compress share` through click's CliRunner."""

import json

import pytest
from click.testing import CliRunner

from cli.main import cli


def run(*args):
    return CliRunner().invoke(cli, ["share", *map(str, args)])


def test_share_writes_checkpoint_that_other_commands_accept(tiny_dirs, tmp_path):
    out = tmp_path / "shared"
    result = run(tiny_dirs["bert"], "--plan", "0-1,2-3", "--lora-rank", "2", "-o", out, "--max-samples", "4")
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "compress.json", "model.safetensors", "share_report.json", "share_report.md",
            "tokenizer.json"} <= names
    record = json.loads((out / "share_report.json").read_text())
    assert record["params_after"] < record["params_before"]
    assert record["metrics"]["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    assert "compress finetune" in result.output and "embedding cosine to original" in result.output
    # the checkpoint is a MODEL for every command
    analysis = CliRunner().invoke(cli, ["analyze", str(out), "--json", "-", "--max-samples", "4"])
    assert analysis.exit_code == 0, analysis.output
    assert json.loads(analysis.stdout)["params_before"] == record["params_after"]
    again = run(out, "--plan", "0-3", "-o", tmp_path / "twice")
    assert again.exit_code == 2 and "already shared" in again.stderr


def test_json_stdout(tiny_dirs, tmp_path):
    result = run(tiny_dirs["llama"], "--groups", "2", "-o", tmp_path / "s", "--json", "-", "--no-fidelity", "--max-samples", "4")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["stage"] == "share" and len(record["metrics"]["plan"]) == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--groups", "9"], "more than the model's 4 layers"),
        (["--plan", "0-1,3"], "skips layer 2"),
        (["--plan", "0-2,2-3"], "repeats layer 2"),
        (["--plan", "0-3", "--lora-rank", "999"], "--lora-rank 999 is above"),
        (["--plan", "BROKEN_JSON"], "not valid JSON"),
        (["--plan", "0-3", "--groups", "2"], "not both"),
        ([], "give --groups K or --plan"),
    ],
)
def test_bad_input(tiny_dirs, tmp_path, args, message):
    broken = tmp_path / "plan.json"
    broken.write_text("{oops")
    args = [str(broken) if a == "BROKEN_JSON" else a for a in args]
    out = tmp_path / "out"
    result = run(tiny_dirs["gpt2"], *args, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("compress: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_is_kept(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result = run(tiny_dirs["bert"], "--plan", "0-3", "-o", out, "--no-fidelity")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "precious.txt").read_text() == "mine"
