"""Quantization methods are data with handlers: a method defined in one module (here, this test)
appears in `compress export`, the recipe schema and an export with no edit anywhere else."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import pytest
from click.testing import CliRunner

from cli.main import cli
from compressor.errors import ConfigError
from compressor.pipeline import stages
from compressor.quantization import Fp16, Int4, Int8Dynamic, Int8Static, QuantMethod, method_config
from compressor.quantization.config import method_option_specs, methods, register_method, unregister_method


@dataclasses.dataclass(kw_only=True)
class Tagged(QuantMethod):
    """A toy method: leaves the weights float and tags the graph.

    Attributes:
        tag_value: What the graph's ``toy_tag`` metadata says.
    """

    name: ClassVar[str] = "toy-tag"
    default_min_cosine: ClassVar[float] = 0.9999
    float_weights: ClassVar[bool] = True

    tag_value: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.tag_value < 0:
            raise ConfigError(f"--tag-value must be at least 0, got {self.tag_value}", option="tag_value")


def tag_graph(model, config: Tagged, context):
    import onnx

    onnx.helper.set_model_props(model, {"toy_tag": str(config.tag_value)})
    return model, {"tagged": config.tag_value, "matmuls": sum(n.op_type == "MatMul" for n in model.graph.node)}


@pytest.fixture
def toy_method():
    register_method(Tagged)(tag_graph)
    try:
        yield Tagged
    finally:
        unregister_method(Tagged.name)


def test_the_built_in_methods_are_registered_in_order():
    assert list(methods()) == ["int8", "int8-static", "int4", "fp16"]
    assert [methods()[n] for n in methods()] == [Int8Dynamic, Int8Static, Int4, Fp16]
    assert method_config("int4", block_size=16) == Int4(block_size=16)
    assert QuantMethod.from_dict({"mode": "int8-static", "calibration": "x"}) == Int8Static(calibration="x")
    assert QuantMethod.from_dict(Int4(int4_method="hqq").to_dict()) == Int4(int4_method="hqq")  # round trip


def test_a_method_checks_only_its_own_options():
    with pytest.raises(ConfigError, match="--block-size is not for fp16; it is an option of int8, int8-static, int4"):
        method_config("fp16", block_size=16)
    with pytest.raises(ConfigError, match="--quantize must be one of int8, int8-static, int4, fp16, got 'int3'"):
        method_config("int3")
    with pytest.raises(TypeError):  # a method class takes only its own fields
        Int4(per_token="all")


def test_a_toy_method_appears_in_the_command_the_schema_and_an_export(toy_method, tiny_dirs, tmp_path):
    # the command: its name among --quantize's choices, its own option with the help of its field
    help_text = " ".join(CliRunner().invoke(cli, ["export", "--help"]).output.split())
    assert "--quantize [int8|int8-static|int4|fp16|toy-tag]" in help_text
    assert "--tag-value INTEGER [toy-tag] What the graph's toy_tag metadata says. [default: 1]" in help_text
    # the recipe schema: the quantize stage's options, from the same registry
    schema = {o["name"]: o for o in stages.recipe_schema()["quantize"]["options"]}
    assert "toy-tag" in schema["mode"]["choices"] and tuple(schema["tag_value"]["methods"]) == ("toy-tag",)
    assert {s.name for s in method_option_specs()} >= {"tag_value", "block_size", "per_token"}
    # an export through the command: the handler ran, its record and the graph say so
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "--quantize", "toy-tag", "--tag-value", "7",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["config"]["quantize"] == {"mode": "toy-tag", "text_column": None, "encoding": "utf-8",
                                            "min_cosine": 0.9999, "tag_value": 7}
    assert report["metrics"]["graph"]["tagged"] == 7 and report["metrics"]["graph"]["matmuls"] > 0
    assert report["metrics"]["check"]["mean_cosine"] > 0.9999  # weights left float: the check passes
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx"), load_external_data=False).metadata_props}
    assert props["toy_tag"] == "7"
    # its own check, and another method's option refused by name
    bad = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "--quantize", "toy-tag", "--tag-value", "-1",
                                   "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--tag-value must be at least 0" in bad.output
    bad = CliRunner().invoke(cli, ["export", str(tiny_dirs["bert"]), "--quantize", "toy-tag", "--per-token", "all",
                                   "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--per-token is not for toy-tag; it is an option of int8, int8-static" in bad.output
    assert not (tmp_path / "bad").exists()


def test_a_toy_method_runs_in_a_recipe(toy_method, tiny_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_dirs['bert']}\nstages:\n  - quantize: {{mode: toy-tag, tag_value: 3}}\n"
                      "  - export: {check_lengths: [8]}\n")
    result = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "job")])
    assert result.exit_code == 0, result.output
    (report,) = (tmp_path / "job").glob("*export*/export_report.json")
    assert json.loads(report.read_text())["metrics"]["graph"]["tagged"] == 3


def test_int8_quantizes_a_fused_decoder_graph(tiny_dirs, tmp_path):
    """A decoder's --optimize 1 graph (fused RMSNorm: com.microsoft nodes) takes dynamic int8: the
    fusion declares its operator domain, which onnxruntime's quantizer's shape inference needs
    (before, the export ended in a traceback)."""
    from compressor.export import ExportConfig, export
    from compressor.models import load_model

    record = export(load_model(str(tiny_dirs["llama"])), ExportConfig(check_lengths=[8], optimize=1), tmp_path / "int8",
                    quantize=Int8Dynamic())
    graph = record.metrics["graph"]
    assert graph["optimized"]["fused"]["SkipSimplifiedLayerNormalization"] > 0
    assert graph["quantizer"] == "onnxruntime.quantization.quantize_dynamic (on the fused graph)"
    assert record.metrics["projections"]["float_on_weights"] == 0 and record.metrics["check"]["mean_cosine"] > 0.99
