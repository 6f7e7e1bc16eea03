"""`compress report`: size, speed and accuracy of compressed variants against the original and
optimum's plain ONNX routes, measured side by side."""

from __future__ import annotations

import json
import shlex
import sys

import click

from cli.main import cli, emit_result, log_format


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@cli.command()
@click.argument("variants", nargs=-1)
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for report.md, report.json, report.png and the baselines.")
@click.option("--original", default=None, help="The original model (default: the bundled all-MiniLM-L6-v2).")
@click.option("--names", default=None, help="Comma-separated row names for VARIANTS (default: their folder names).")
@click.option("--threads", type=int, default=2, show_default=True, help="Threads for every row.")
@click.option("--batch-sizes", default="1,32", show_default=True, help="Batch sizes for latency.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per sequence for latency.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed runs per row and batch size.")
@click.option("--baselines/--no-baselines", default=True, show_default=True, help="Add the original as optimum's plain ONNX fp32 and int8.")
@click.option("--data", default="movie-snippets", show_default=True, help="Labelled data for the task metric.")
@click.option("--train-size", type=int, default=4000, show_default=True)
@click.option("--test-size", type=int, default=2000, show_default=True)
@click.option("--title", default=None, help="Report title.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the result as JSON here ('-' prints it instead of the table).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def report(variants, output, original, names, threads, batch_sizes, seq_len, warmup, repeats, baselines, data, train_size,
           test_size, title, json_path, overwrite):
    """Measure VARIANTS (export folders, run in onnxruntime, or model folders, run in PyTorch)
    against the original in PyTorch fp32 and, as baselines, the original exported and int8-quantized
    the way optimum does it. One table: file size, unique parameters, latency p50/p90 per batch
    size, throughput, the task metric of `compress evaluate`, and fidelity to the original.
    """
    from pathlib import Path

    from compressor.errors import ConfigError
    from compressor.io import check_distinct, check_writable
    from compressor.report import ReportConfig

    config = ReportConfig(threads=threads, batch_sizes=_ints(batch_sizes), seq_len=seq_len, warmup=warmup, repeats=repeats,
                          baselines=baselines, data=data, train_size=train_size, test_size=test_size)
    labels = [n.strip() for n in names.split(",")] if names else [Path(v).name for v in variants]
    if len(labels) != len(variants):
        raise ConfigError(f"--names gives {len(labels)} names for {len(variants)} variants")
    for v in variants:
        if not Path(v).is_dir():
            raise ConfigError(f"variant {v} is not a folder")
    check_distinct(output, json_path)
    check_writable(output, overwrite=overwrite, folder=True)
    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)

    from compressor.io import staged_folder, write_text_atomic
    from compressor.models import load_model
    from compressor.pipeline.events import EventLog
    from compressor.report import report as run_report
    from compressor.report.render import chart, markdown

    loaded = load_model(original)
    title = title or f"{loaded.name}: size, speed and accuracy"
    command = shlex.join(["compress", *sys.argv[1:]]) if Path(sys.argv[0]).name == "compress" else None
    with staged_folder(output, overwrite=overwrite) as tmp:
        result = run_report(loaded, list(zip(labels, variants)), config, work=tmp, log=EventLog(log_format()))
        result["command"] = command
        write_text_atomic(tmp / "report.json", json.dumps(result, indent=2))
        write_text_atomic(tmp / "report.md", markdown(result, title=title, command=command))
        chart(result, tmp / "report.png", title=title)
    if emit_result(json.dumps(result, indent=2), json_path):
        return
    click.echo(markdown(result, title=title))
    click.echo(f"wrote {output}")
