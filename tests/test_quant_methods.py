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


def test_each_method_applies_its_own_defaults_to_options_not_given():
    """Only the options a user set reach the method: a method whose default for a shared option
    differs (here block_size 64) changes no other method's, and an option set for another method
    is refused by its flag's own spelling."""
    from compressor.export.runner import quantize_config

    @dataclasses.dataclass(kw_only=True)
    class WideBlocks(QuantMethod):
        """Another default for a shared option.

        Attributes:
            block_size: Weights per scale.
        """

        name: ClassVar[str] = "wide-blocks"
        block_size: int = 64

    register_method(WideBlocks)(tag_graph)
    try:
        flat = {s.name: s.default for s in method_option_specs() if s.name != "mode"}
        assert flat["block_size"] is None  # no one default for all methods
        assert quantize_config("int4", flat, given=set()).block_size == 32
        assert quantize_config("wide-blocks", flat, given=set()).block_size == 64
        assert quantize_config("int4", {**flat, "block_size": 16}, given={"block_size"}).block_size == 16
        with pytest.raises(ConfigError, match="--per-channel/--per-tensor is not for int4; it is an option of int8"):
            quantize_config("int4", {**flat, "per_channel": False}, given={"per_channel"})
        with pytest.raises(ConfigError, match="--calibration-max-length apply to --quantize or --fp16"):
            quantize_config(None, {**flat, "max_length": 64}, given={"max_length"})
    finally:
        unregister_method("wide-blocks")


def test_a_method_option_named_like_an_export_option_is_refused(tiny_dirs):
    @dataclasses.dataclass(kw_only=True)
    class Clashing(QuantMethod):
        """A method whose option is also the export's.

        Attributes:
            atol: Not this method's to take.
        """

        name: ClassVar[str] = "clashing"
        atol: float = 0.5

    register_method(Clashing)(tag_graph)
    try:
        result = CliRunner().invoke(cli, ["export", "--help"])
        assert isinstance(result.exception, TypeError) and "atol" in str(result.exception)
    finally:
        unregister_method("clashing")
    assert CliRunner().invoke(cli, ["export", "--help"]).exit_code == 0  # the registry as it was


def test_a_quantize_stage_stored_with_every_old_option_still_loads():
    """A recipe stage stored before the methods had options of their own lists all of them, at
    their defaults or off: they are left out, and a real one of another method is still refused."""
    old = {"mode": "int8", "calibration": None, "calibration_samples": 128, "max_length": 128, "per_channel": True,
           "isa": "auto", "block_size": 32, "accuracy_level": 4, "int4_method": "rtn", "int8_share": 0.0,
           "embedding_bits": 4, "embedding_hot_share": 0.0, "per_token": "all", "min_cosine": 0.9,
           "text_column": None, "encoding": "utf-8"}
    assert QuantMethod.from_dict(old) == Int8Dynamic(per_channel=True, embedding_bits=4, per_token="all")
    assert QuantMethod.from_dict({**old, "mode": "fp16", "per_channel": False, "embedding_bits": None,
                                  "per_token": None, "min_cosine": 0.999}) == Fp16()
    with pytest.raises(ConfigError, match="--int8-share is not for int8"):
        QuantMethod.from_dict({**old, "int8_share": 0.2})


def test_the_ffn_down_projections_are_found_in_a_bf16_model(tiny_dirs):
    """The export traces a float32 copy of a bf16 model; the FFN down-projections (int8-static's
    dynamic ranges, --per-token ffn-down) are named from the model's own modules."""
    import torch

    from compressor.export.config import ExportConfig
    from compressor.export.stage import traced_model
    from compressor.models import load_model

    loaded = load_model(str(tiny_dirs["bert"]))
    fp32 = traced_model(loaded, "feature-extraction", ExportConfig())[1]
    loaded.model.to(torch.bfloat16)
    model, bf16 = traced_model(loaded, "feature-extraction", ExportConfig())
    assert len(fp32) == loaded.geometry.num_layers and bf16 == fp32
    assert next(model.parameters()).dtype == torch.float32


def test_a_graph_past_the_limit_keeps_its_weights_beside_it(tiny_dirs, tmp_path):
    """The export's one write: past protobuf's limit (here set to 0) the tensors go to
    model.onnx.data, and onnxruntime runs the pair as it ran the single file."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from compressor.export import ExportConfig, export
    from compressor.models import load_model
    from compressor.onnx.graph import save_model

    export(load_model(str(tiny_dirs["bert"])), ExportConfig(check_lengths=[8]), tmp_path / "one")
    model = onnx.load(str(tmp_path / "one" / "model.onnx"))
    assert save_model(model, tmp_path / "one.onnx") is False and not (tmp_path / "one.onnx.data").exists()
    assert save_model(model, tmp_path / "two.onnx", limit=0) is True
    assert (tmp_path / "two.onnx.data").stat().st_size > (tmp_path / "two.onnx").stat().st_size
    feed = {"input_ids": np.array([[2, 10, 11, 3]]), "attention_mask": np.ones((1, 4), dtype=np.int64),
            "token_type_ids": np.zeros((1, 4), dtype=np.int64)}
    one, two = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                for f in ("one.onnx", "two.onnx"))
    np.testing.assert_array_equal(one, two)
