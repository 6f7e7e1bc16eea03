"""The stage contract: a stage declared once is a command, a recipe stage and a schema entry."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from cli.main import cli
from compressor.config import StageConfig
from compressor.contract import Stage, StageRun
from compressor.pipeline import EventLog, job_for_recipe, load_recipe, plan_job, run_job, stages
from compressor.record import StageRecord


@dataclass
class NoteConfig(StageConfig):
    """Options of a toy stage that writes a note about its model.

    Attributes:
        words: Words in the note.
        shout: Write the note in capitals.
    """

    words: int = 3
    shout: bool = False


def run_note(run: StageRun) -> StageRecord:
    """The toy stage on folders: one file in ``run.output``."""
    text = " ".join(["note"] * run.config.words)
    run.output.mkdir(parents=True, exist_ok=run.overwrite)
    (run.output / "note.txt").write_text(text.upper() if run.config.shout else text)
    return StageRecord("note", run.config.to_dict(), 1, 1, 4, 4, {"words": run.config.words, "model": run.model})


NOTE = Stage("note", NoteConfig, run_note, summary=lambda record: f"words  {record.metrics['words']}",
             help="Write a note about MODEL into OUTPUT.", output_help="Folder for the note.",
             key_metrics=("metrics.words",))


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(stages, "STAGES", dict(stages.STAGES))  # the registration stays inside the test
    stages.register(NOTE)


def test_a_stage_registered_after_import_is_a_command(registered, tmp_path):
    runner = CliRunner()
    assert "note" in runner.invoke(cli, ["--help"]).output
    help_text = " ".join(runner.invoke(cli, ["note", "--help"]).output.split())
    assert "Write a note about MODEL into OUTPUT." in help_text
    assert "--words INTEGER Words in the note. [default: 3]" in help_text and "--shout / --no-shout" in help_text
    assert "--trust-remote-code" in help_text and "--overwrite" in help_text

    out = tmp_path / "n"
    result = runner.invoke(cli, ["note", "some-model", "--words", "2", "--shout", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "note.txt").read_text() == "NOTE NOTE"
    assert result.output == f"words  2\nwrote {out}\n"
    again = runner.invoke(cli, ["note", "some-model", "-o", str(out), "--json", "-", "--overwrite"])
    assert again.exit_code == 0 and json.loads(again.output)["metrics"] == {"words": 3, "model": "some-model"}
    bad = runner.invoke(cli, ["note", "--words", "x", "-o", str(tmp_path / "m")])
    assert bad.exit_code == 2 and not (tmp_path / "m").exists()


def test_a_registered_stage_is_in_the_schema_and_runs_in_a_recipe(registered, tmp_path, tiny_dirs):
    schema = stages.recipe_schema()["note"]
    assert schema["writes_model"] is False and {o["name"]: o["default"] for o in schema["options"]} == {
        "words": 3, "shout": False}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - note: {words: 4}\n")
    job = job_for_recipe(load_recipe(recipe), tmp_path / "job", str(tiny_dirs["bert"]))
    result = run_job(job, plan_job(job).keys, log=EventLog(keep=True))
    assert result.status == "done" and result.metrics == {"note.words": 4}
    assert (tmp_path / "job" / "01-note" / "note.txt").read_text() == "note note note note"


def test_every_stage_package_declares_itself_once():
    for package in stages.STAGE_PACKAGES:
        names = [name for name, stage in stages.STAGES.items()
                 if stage.config_class.__module__.split(".")[1] == package]
        assert names, package
    assert [s.name for s in stages.STAGES.values() if s.has_command] == ["share", "prune"]
    assert all(name in cli.list_commands(None) for name in stages.STAGES if name != "quantize")
