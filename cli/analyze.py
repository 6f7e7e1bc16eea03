"""`compress analyze`: how similar are the model's layers, and how should they be grouped."""

from __future__ import annotations

import json

import click

from cli.main import cli
from cli.options import config_options, dtype_option, json_flag, output_option, overwrite_option, trust_remote_code_option
from compressor.analysis.config import AnalyzeConfig


@cli.command()
@click.argument("model", required=False)
@config_options(AnalyzeConfig)
@output_option("Folder for analysis.json, analysis.md and the heatmap PNGs.", required=False)
@json_flag("the tables")
@click.option("--markdown", "markdown_path", type=click.Path(), default=None, help="Write a Markdown report here.")
@click.option("--plots", "plots_dir", type=click.Path(), default=None, help="Write heatmap PNGs into this folder.")
@overwrite_option
@trust_remote_code_option
@dtype_option
def analyze(model, output, json_path, markdown_path, plots_dir, overwrite, trust_remote_code, dtype, **options):
    """Measure how similar MODEL's layers are and recommend which to share.

    Prints raw and permutation-aligned weight cosine for every sublayer, CKA and angular
    distance of layer outputs, Block Influence per layer, and the best contiguous grouping
    for every group count.
    """
    from cli.options import build_config
    from compressor.analysis.render import print_report
    from compressor.analysis.runner import run_analyze

    config = build_config(AnalyzeConfig, options)
    record, written = run_analyze(model, config, output, json_path=json_path, markdown_path=markdown_path,
                                  plots_dir=plots_dir, overwrite=overwrite, trust_remote_code=trust_remote_code,
                                  dtype=dtype)
    if json_path == "-":
        click.echo(json.dumps(record.to_dict(), indent=2))
        return
    print_report(record.metrics)
    if written:
        click.echo("wrote " + ", ".join(written))
