"""`compress export`: an ONNX folder optimum loads, checked against PyTorch, optionally quantized."""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from compressor.export.config import TASKS


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for model.onnx, config.json and the tokenizer.")
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True, help="What the ONNX model computes (auto: from the model's head).")
@click.option("--quantize", type=click.Choice(["int8", "int8-static"]), default=None, help="int8: dynamic; int8-static: activation ranges calibrated on --calibration.")
@click.option("--calibration", default=None, help="Text for int8-static (file, movie-snippets, or hub dataset id).")
@click.option("--calibration-samples", type=int, default=128, show_default=True, help="Calibration texts to run (int8-static).")
@click.option("--per-channel/--per-tensor", default=None,
              help="One int8 scale per output channel of a weight, or one per tensor (default: per tensor for int8, per channel for int8-static).")
@click.option("--fp16", is_flag=True, help="Half-precision weights and compute, for GPU targets.")
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--atol", type=float, default=1e-4, show_default=True, help="fp32: largest allowed difference from PyTorch (plus 1e-3 x |output|).")
@click.option("--min-cosine", type=float, default=None, help="int8/fp16: lowest allowed mean cosine to PyTorch's outputs (default 0.90 int8, 0.999 fp16).")
@click.option("--check-data", default=None, help="Real text the export is checked on (default: built-in sentences).")
@click.option("--text-column", default=None, help="Column (csv/tsv) or key (jsonl) holding the text.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the record as JSON here ('-' prints it instead of the summary).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code to run.")
def export(model, output, task, quantize, calibration, calibration_samples, per_channel, fp16, opset, atol, min_cosine,
           check_data, text_column, encoding, json_path, overwrite, trust_remote_code):
    """Export MODEL to ONNX in OUTPUT, in the layout optimum's ORTModelFor* classes load.

    The folder is loaded back through optimum and compared with PyTorch on real text at several
    lengths before it is written; an export past the tolerance fails (exit 1) and writes nothing.
    Weights that layers share are stored once, also after int8 quantization.
    """
    from compressor.errors import ConfigError
    from compressor.export import ExportConfig
    from compressor.io import check_distinct, check_writable
    from compressor.quantization import QuantizeConfig

    if fp16 and quantize:
        raise ConfigError("give --quantize or --fp16, not both")
    mode = "fp16" if fp16 else quantize
    if mode is None and (calibration or per_channel is not None or min_cosine is not None):
        raise ConfigError("--calibration, --per-channel/--per-tensor and --min-cosine apply to --quantize or --fp16")
    config = ExportConfig(task=task, opset=opset, atol=atol, check_data=check_data, text_column=text_column, encoding=encoding)
    qconfig = None
    if mode:
        qconfig = QuantizeConfig(mode=mode, calibration=calibration, text_column=text_column, encoding=encoding,
                                 calibration_samples=calibration_samples, per_channel=per_channel, min_cosine=min_cosine)
    check_distinct(output, json_path)
    check_writable(output, overwrite=overwrite, folder=True)
    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)

    from compressor.export import export as run_export
    from compressor.export.render import export_summary_rows
    from compressor.models import load_model

    loaded = load_model(model, trust_remote_code=trust_remote_code)
    record = run_export(loaded, config, output, quantize=qconfig, overwrite=overwrite)
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    echo_rows(export_summary_rows(record), output)
