"""`compress evaluate`: the task metric that fits each model, side by side."""

from __future__ import annotations

import json

import click

from cli.main import cli, emit_result
from compressor.evaluation.evaluate import TASKS


@cli.command()
@click.argument("models", nargs=-1)
@click.option("--data", default="movie-snippets", show_default=True, help="A file, a packaged data set, or a Hugging Face dataset id.")
@click.option("--text-column", default=None)
@click.option("--label-column", default=None)
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--task", type=click.Choice(TASKS), default="auto", show_default=True)
@click.option("--teacher", default=None, help="Report fidelity to this model (default: the first MODEL when several are given).")
@click.option("--train-size", type=int, default=4000, show_default=True, help="Examples the probe is fitted on.")
@click.option("--test-size", type=int, default=2000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-length", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", default=None, help="Write the records as JSON here ('-' prints them).")
@click.option("--overwrite", is_flag=True)
def evaluate(models, data, text_column, label_column, encoding, task, teacher, train_size, test_size, seed, max_length,
             device, json_path, overwrite):
    """Score each MODEL (default: the bundled MiniLM) on DATA with the metric that fits it.

    Embedding encoders: logistic-regression probe accuracy on frozen embeddings; classifiers:
    accuracy and macro-F1; causal LMs: perplexity. All models see the same split.
    """
    from compressor.evaluation import EvaluateConfig

    config = EvaluateConfig(data=data, text_column=text_column, label_column=label_column, encoding=encoding, task=task,
                            train_size=train_size, test_size=test_size, seed=seed, max_length=max_length, device=device)
    if json_path and json_path != "-":
        from compressor.io import check_writable

        check_writable(json_path, overwrite=overwrite)

    from compressor.evaluation import evaluate as run_evaluate
    from compressor.evaluation import load_split, pick_task
    from compressor.models import load_model

    loaded = [load_model(m) for m in (models or [None])]
    ref = load_model(teacher) if teacher else (loaded[0] if len(loaded) > 1 else None)
    tasks = {pick_task(m, config.task) for m in loaded}
    if len(tasks) > 1:
        raise click.UsageError(f"the models need different metrics ({', '.join(sorted(tasks))}); evaluate them apart")
    split = load_split(config, need_labels=tasks != {"lm"})
    records = []
    for model in loaded:
        _, record = run_evaluate(model, config, teacher=ref if ref is not model else None, split=split)
        record.metrics["model"] = model.name
        records.append(record)

    result = json.dumps([r.to_dict() for r in records], indent=2)
    if emit_result(result, json_path):
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
