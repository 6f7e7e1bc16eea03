"""`compress analyze`: how similar are the model's layers, and how should they be grouped."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.main import cli
from compressor.analysis.config import METRICS


@cli.command()
@click.argument("model", required=False)
@click.option("--groups", type=int, default=None, help="Recommend a plan with this many groups (default: about half the layers).")
@click.option("--metric", type=click.Choice(METRICS), default=None, help="Similarity that drives the grouping (default: cka, or aligned-weight with --no-activations).")
@click.option("--weights/--no-weights", default=True, show_default=True, help="Weight similarity, raw and permutation-aligned.")
@click.option("--activations/--no-activations", default=True, show_default=True, help="Activation similarity on calibration text.")
@click.option("--data", type=click.Path(), default=None, help="Calibration text: .txt, .csv, .tsv or .jsonl (default: built-in English sentences).")
@click.option("--text-column", default=None, help="Column (csv/tsv) or key (jsonl) holding the text.")
@click.option("--encoding", default="utf-8", show_default=True, help="Encoding of --data.")
@click.option("--max-samples", type=int, default=256, show_default=True, help="Use at most this many texts.")
@click.option("--max-length", type=int, default=128, show_default=True, help="Tokens per text.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Torch device for the forward passes.")
@click.option("-o", "--output", type=click.Path(), default=None, help="Folder for analysis.json, analysis.md and the heatmap PNGs.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the JSON result here ('-' prints it instead of the tables).")
@click.option("--markdown", "markdown_path", type=click.Path(), default=None, help="Write a Markdown report here.")
@click.option("--plots", "plots_dir", type=click.Path(), default=None, help="Write heatmap PNGs into this folder.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that already exist.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code to run.")
def analyze(model, groups, metric, weights, activations, data, text_column, encoding, max_samples, max_length,
            batch_size, device, output, json_path, markdown_path, plots_dir, overwrite, trust_remote_code):
    """Measure how similar MODEL's layers are and recommend which to share.

    Prints raw and permutation-aligned weight cosine for every sublayer, CKA and angular
    distance of layer outputs, Block Influence per layer, and the best contiguous grouping
    for every group count.
    """
    from compressor.analysis import AnalyzeConfig
    from compressor.io import check_distinct, check_writable

    config = AnalyzeConfig(
        groups=groups, metric=metric, weights=weights, activations=activations, data=data,
        text_column=text_column, encoding=encoding, max_samples=max_samples, max_length=max_length,
        batch_size=batch_size, device=device,
    )
    # Refuse to overwrite before the slow part, not after it.
    check_distinct(output, json_path, markdown_path, plots_dir)
    if output:
        check_writable(output, overwrite=overwrite, folder=True)
    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)
    if markdown_path:
        check_writable(markdown_path, overwrite=overwrite)
    if plots_dir:
        check_writable(plots_dir, overwrite=overwrite, folder=True)

    from compressor.analysis import analyze as run_analysis
    from compressor.analysis.render import markdown_report, print_report, save_heatmaps
    from compressor.io import staged_folder, write_text_atomic
    from compressor.models import load_model

    loaded = load_model(model, trust_remote_code=trust_remote_code)
    _, record = run_analysis(loaded, config)
    metrics = record.metrics
    result = json.dumps(record.to_dict(), indent=2)

    if json_path == "-":
        click.echo(result)
    else:
        print_report(metrics)

    written = []
    if output:
        with staged_folder(output, overwrite=overwrite) as tmp:
            write_text_atomic(tmp / "analysis.json", result)
            write_text_atomic(tmp / "analysis.md", markdown_report(metrics))
            save_heatmaps(metrics, tmp)
        written.append(output)
    if json_path and json_path != "-":
        written.append(write_text_atomic(json_path, result))
    if markdown_path:
        written.append(write_text_atomic(markdown_path, markdown_report(metrics)))
    if plots_dir:
        with staged_folder(plots_dir, overwrite=overwrite) as tmp:
            save_heatmaps(metrics, tmp)
        written.append(plots_dir)
    if written and json_path != "-":
        click.echo("wrote " + ", ".join(str(Path(p)) for p in written))
