"""`compress evaluate`: the task metric that fits each model, side by side."""

from __future__ import annotations

import json

import click

from cli.main import cli, emit_result
from cli.options import build_config, check_json, config_options, json_option, overwrite_option
from compressor.evaluation.evaluate import EvaluateConfig


@cli.command()
@click.argument("models", nargs=-1)
@config_options(EvaluateConfig)
@click.option("--teacher", default=None, help="Report fidelity to this model (default: the first MODEL when several are given).")
@json_option
@overwrite_option
def evaluate(models, teacher, json_path, overwrite, **options):
    """Score each MODEL (default: the bundled MiniLM) on DATA with the metric that fits it.

    Embedding encoders: logistic-regression probe accuracy on frozen embeddings; classifiers:
    accuracy and macro-F1; causal LMs: perplexity. All models see the same split.
    """
    from compressor.evaluation.runner import evaluate_models

    config = build_config(EvaluateConfig, options)
    check_json(json_path, overwrite=overwrite)
    records = evaluate_models(list(models or [None]), config, teacher=teacher)
    if emit_result(json.dumps([r.to_dict() for r in records], indent=2), json_path):
        return
    _print_table(records)


def _print_table(records):
    from rich.console import Console
    from rich.table import Table

    task = records[0].metrics["task"]
    table = Table(title=f"evaluate ({task}, {records[0].metrics['test_size']} test examples)")
    table.add_column("model", overflow="fold")
    table.add_column("unique params", justify="right")
    cols = {"embedding": ["accuracy", "macro_f1"], "classification": ["accuracy", "macro_f1"], "lm": ["perplexity"]}[task]
    for c in cols:
        table.add_column(c.replace("_", "-"), justify="right")
    table.add_column("of first", justify="right")
    table.add_column("cosine to teacher", justify="right")
    first = records[0].metrics[cols[0]]
    for r in records:
        m = r.metrics
        fid = m.get("fidelity", {}).get("embedding_cosine")
        table.add_row(m["model"], f"{r.params_after:,}", *[f"{m[c]:.4f}" for c in cols], f"{m[cols[0]] / first:.1%}" if first else "-",
                      "-" if fid is None else f"{fid:.4f}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    console.print(table)
