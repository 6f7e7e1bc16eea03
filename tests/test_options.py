"""A stage's options are declared once, in its config dataclass: the command's flags, the
recipe's keys and the schema all come from there."""

from __future__ import annotations

import dataclasses
import json

import click
import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.options import build_config, config_options
from compressor.analysis.config import AnalyzeConfig
from compressor.config import TextOptions, field_help, option_specs
from compressor.errors import ConfigError
from compressor.evaluation.config import EvaluateConfig
from compressor.export.config import ExportConfig
from compressor.finetune.config import FinetuneConfig
from compressor.pipeline import stages
from compressor.pipeline.recipe import load_recipe
from compressor.pruning.config import PruneConfig
from compressor.quantization.config import QuantMethod
from compressor.report.config import ReportConfig
from compressor.sharing.config import ShareConfig

COMMANDS = {
    "analyze": (AnalyzeConfig,),
    "share": (ShareConfig,),
    "prune": (PruneConfig,),
    "finetune": (FinetuneConfig,),
    "evaluate": (EvaluateConfig,),
    "export": (ExportConfig, QuantMethod),
    "report": (ReportConfig,),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_config_field_is_an_option_of_its_command(command):
    params = {p.name for p in cli.commands[command].params}
    fields = {s.name for cls in COMMANDS[command] for s in option_specs(cls)}
    assert fields <= params, sorted(fields - params)


def test_text_options_are_one_dataclass_in_every_config_that_reads_text():
    for cls in (AnalyzeConfig, ShareConfig, PruneConfig, FinetuneConfig, EvaluateConfig):
        assert issubclass(cls, TextOptions), cls
        names = [s.name for s in option_specs(cls)]
        assert names[-3:] == ["data", "text_column", "encoding"], cls  # the stage's own options first
    assert field_help(ShareConfig)["encoding"] == "Text encoding of the file."


def test_defaults_types_choices_and_help_come_from_the_dataclass():
    specs = {s.name: s for s in option_specs(ReportConfig)}
    assert specs["batch_sizes"].kind == "list[int]" and specs["batch_sizes"].default == [1, 32]
    assert specs["baselines"].kind == "bool" and specs["baselines"].default is True
    assert specs["threads"].help.startswith("Intra-op threads for every row")
    assert {s.name: s for s in option_specs(PruneConfig)}["score"].choices == ("taylor", "magnitude")
    help_text = " ".join(CliRunner().invoke(cli, ["report", "--help"]).output.split())
    assert "--batch-sizes INT,... Batch sizes latency is measured at. [default: 1,32]" in help_text
    share_help = " ".join(CliRunner().invoke(cli, ["share", "--help"]).output.split())
    assert "[aligned-mean|mean|first]" in share_help
    assert "partition by --plan-metric" in share_help  # a field named in the help reads as its flag


def test_a_bad_value_fails_in_the_config_with_the_flag_named(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "-o", str(tmp_path / "r"), "--threads", "0"])
    assert result.exit_code == 2 and "--threads must be a positive number" in result.output
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "-o", str(tmp_path / "r"), "--batch-sizes", "1,a"])
    assert result.exit_code == 2 and "expected comma-separated integers" in result.output
    assert not (tmp_path / "r").exists()


def test_a_new_field_appears_in_the_command_the_recipe_and_the_schema(tmp_path, monkeypatch):
    @dataclasses.dataclass
    class KnobbedShareConfig(ShareConfig):
        """Sharing with one more option.

        Attributes:
            new_knob: How far to turn the new knob.
        """

        new_knob: int = 3

    # the command: the flag, its default and its help, and the value reaches the config
    seen = {}

    @click.command()
    @config_options(KnobbedShareConfig)
    def command(**options):
        seen["config"] = build_config(KnobbedShareConfig, options)

    runner = CliRunner()
    help_text = " ".join(runner.invoke(command, ["--help"]).output.split())
    assert "--new-knob INTEGER How far to turn the new knob. [default: 3]" in help_text
    assert runner.invoke(command, ["--groups", "2", "--new-knob", "7"]).exit_code == 0
    assert seen["config"].new_knob == 7

    # the recipe and the schema, once the stage's config is the new class
    monkeypatch.setitem(stages.STAGES, "share", dataclasses.replace(stages.STAGES["share"],
                                                                    config_class=KnobbedShareConfig))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - share: {groups: 2, new-knob: 5}\n")
    assert load_recipe(recipe).stages[0].config.new_knob == 5
    schema = {o["name"]: o for o in stages.recipe_schema()["share"]["options"]}
    assert schema["new_knob"]["default"] == 3 and schema["new_knob"]["help"] == "How far to turn the new knob."


def test_the_schema_lists_every_stage_with_its_options():
    result = CliRunner().invoke(cli, ["run", "--schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert list(schema) == list(stages.STAGES)
    assert {o["name"] for o in schema["finetune"]["options"]} == {s.name for s in option_specs(FinetuneConfig)}
    assert schema["quantize"]["feeds"] == "export"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_reads_as_text_not_as_python(command):
    help_text = CliRunner().invoke(cli, [command, "--help"]).output
    assert "None" not in help_text and "``" not in help_text


def test_a_quantization_flag_without_a_mode_is_refused_not_ignored(tiny_dirs, tmp_path):
    for args in (["--isa", "avx2"], ["--calibration-samples", "8"], ["--calibration-max-length", "16"]):
        result = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "-o", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and "apply to --quantize or --fp16" in result.output, args
    assert not (tmp_path / "x").exists()


def test_a_plan_given_as_json_on_the_command_line():
    from compressor.sharing.config import parse_plan

    assert parse_plan("[[2, 3], [0, 1]]", 4) == [[0, 1], [2, 3]]
    with pytest.raises(ConfigError, match="not a JSON list"):
        parse_plan("[[0, 1]", 2)
