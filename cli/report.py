"""`compress report`: size, speed and accuracy of compressed variants against the original and
optimum's plain ONNX routes, measured side by side."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from cli.main import cli, emit_result, log_format
from cli.options import build_config, check_json, config_options, json_option, output_option, overwrite_option
from compressor.report.config import ReportConfig


@cli.command()
@click.argument("variants", nargs=-1)
@output_option("Folder for report.md, report.json, report.png and the baselines.")
@click.option("--original", default=None, help="The original model (default: the bundled all-MiniLM-L6-v2).")
@click.option("--names", default=None, help="Comma-separated row names for VARIANTS (default: their folder names).")
@config_options(ReportConfig)
@click.option("--title", default=None, help="Report title.")
@json_option
@overwrite_option
def report(variants, output, original, names, title, json_path, overwrite, **options):
    """Measure VARIANTS (export folders, run in onnxruntime, or model folders, run in PyTorch)
    against the original in PyTorch fp32 and, as baselines, the original exported and int8-quantized
    the way optimum does it. One table: file size, unique parameters, latency p50/p90 per batch
    size, throughput, the task metric of `compress evaluate`, and fidelity to the original.
    """
    from compressor.errors import ConfigError
    from compressor.pipeline.events import EventLog
    from compressor.report.render import markdown
    from compressor.report.runner import run_report

    config = build_config(ReportConfig, options)
    labels = [n.strip() for n in names.split(",")] if names else [Path(v).name for v in variants]
    if len(labels) != len(variants):
        raise ConfigError(f"--names gives {len(labels)} names for {len(variants)} variants")
    check_json(json_path, output, overwrite=overwrite)
    command = shlex.join(["compress", *sys.argv[1:]]) if Path(sys.argv[0]).name == "compress" else None
    result, title = run_report(original, list(zip(labels, variants)), config, output, title=title, command=command,
                               overwrite=overwrite, log=EventLog(log_format()))
    if emit_result(json.dumps(result, indent=2), json_path):
        return
    click.echo(markdown(result, title=title))
    click.echo(f"wrote {output}")
