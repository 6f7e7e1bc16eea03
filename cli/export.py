"""`compress export`: an ONNX folder optimum loads, checked against PyTorch, optionally quantized."""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from cli.options import build_config, check_json, checkpoint_outputs, config_options
from compressor.export.config import ExportConfig
from compressor.quantization.config import QuantizeConfig

#: The quantization mode is --quantize and off by default: an export is fp32 unless asked; the
#: text options read both the check's and the calibration's text.
_FLAGS = {"mode": "--quantize", "per_channel": "--per-channel/--per-tensor", "max_length": "--calibration-max-length"}
_OVERRIDES = {
    "mode": {"default": None, "show_default": False,
             "help": "int8: dynamic; int8-static: activation ranges calibrated on --calibration; int4: weight-only "
                     "blocks (MatMulNBits; --block-size, --accuracy-level); fp16: half precision, for GPU targets."},
    "per_channel": {"default": None, "show_default": False},
    "min_cosine": {"help": "int8/int4/fp16: lowest allowed mean cosine to PyTorch's outputs (default 0.90 int8, "
                           "0.80 int4, 0.999 fp16)."},
    "text_column": {"help": "Column (csv/tsv) or key (jsonl) holding the text of --check-data and --calibration."},
    "encoding": {"help": "Text encoding of --check-data and --calibration.", "show_default": True},
}


@cli.command()
@click.argument("model", required=False)
@config_options(ExportConfig, QuantizeConfig, names=_FLAGS, overrides=_OVERRIDES)
@click.option("--fp16", is_flag=True, help="Half-precision weights and compute, for GPU targets (as --quantize fp16).")
@checkpoint_outputs("Folder for model.onnx, config.json and the tokenizer.")
def export(model, output, fp16, json_path, overwrite, trust_remote_code, **options):
    """Export MODEL to ONNX in OUTPUT, in the layout optimum's ORTModelFor* classes load.

    The folder is loaded back through optimum and compared with PyTorch on real text at several
    lengths before it is written; an export past the tolerance fails (exit 1) and writes nothing.
    Weights that layers share are stored once, also after int8 quantization.
    """
    from compressor.errors import ConfigError
    from compressor.export.render import export_summary_rows
    from compressor.export.runner import quantize_config, run_export

    mode = options.pop("mode")
    if fp16 and mode not in (None, "fp16"):
        raise ConfigError("give --quantize or --fp16, not both")
    config = build_config(ExportConfig, options)
    qconfig = quantize_config("fp16" if fp16 else mode, options)
    check_json(json_path, output, overwrite=overwrite)
    record = run_export(model, config, output, quantize=qconfig, overwrite=overwrite, trust_remote_code=trust_remote_code)
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    echo_rows(export_summary_rows(record), output)
