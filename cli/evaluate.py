"""`compress evaluate`: the task metric that fits each model, side by side; ``--suite``: the
quality suite (several tasks and neighbour agreement) of each encoder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.main import cli, emit_result, log_format
from cli.options import (
    build_config,
    check_json,
    config_options,
    json_option,
    overwrite_option,
)
from compressor.config import flag, option_specs
from compressor.evaluation.config import EvaluateConfig
from compressor.evaluation.suite import SuiteConfig

#: Options of plain evaluation that the suite does not read (it has its own tasks and splits).
NOT_FOR_SUITE = ("data", "label_column", "text_column", "encoding", "task", "train_size", "test_size")


@cli.command()
@click.argument("models", nargs=-1)
@config_options(EvaluateConfig)
@click.option("--suite", is_flag=True,
              help="Score each MODEL (a sentence-embedding encoder) on the quality suite: probe accuracy on "
                   "--suite-tasks and neighbour agreement with the first MODEL, the original.")
@config_options(SuiteConfig, exclude=("seed",))  # --seed seeds the suite too
@click.option("--teacher", default=None, help="Report fidelity to this model (default: the first MODEL when several are given).")
@json_option
@overwrite_option
def evaluate(models, suite, teacher, json_path, overwrite, **options):
    """Score each MODEL (default: the bundled MiniLM) on DATA with the metric that fits it.

    Embedding encoders: logistic-regression probe accuracy on frozen embeddings; classifiers:
    accuracy and macro-F1; causal LMs: perplexity. All models see the same split.

    With --suite, each encoder is scored on several tasks (movie snippets, SMS spam, TREC
    question types, BBC News) with standard errors, plus the overlap of each text's nearest
    neighbours with the first MODEL's, and the accuracy it retains of the first MODEL's.
    """
    from compressor.errors import ConfigError
    from compressor.evaluation.runner import evaluate_models, suite_models
    from compressor.pipeline.events import EventLog

    ctx = click.get_current_context()
    given = {name for name in options if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    config = build_config(EvaluateConfig, options)
    log = EventLog(log_format())
    if suite:
        clash = [flag(n) for n in NOT_FOR_SUITE if n in given] + (["--teacher"] if teacher else [])
        if clash:
            raise ConfigError(f"--suite scores its own tasks against the first MODEL; drop {', '.join(clash)} "
                              "(the suite's options are --suite-tasks, --suite-train-size, ...)")
        suite_config = build_config(SuiteConfig, options)
        check_json(json_path, overwrite=overwrite)
        records = suite_models(list(models or [None]), config, suite_config, log=log)
        if emit_result(json.dumps([r.to_dict() for r in records], indent=2), json_path):
            return
        _print_suite(records)
        return
    only_suite = [flag(s.name) for s in option_specs(SuiteConfig) if s.name != "seed" and s.name in given]
    if only_suite:
        raise ConfigError(f"{', '.join(only_suite)} set(s) the quality suite; add --suite")
    check_json(json_path, overwrite=overwrite)
    records = evaluate_models(list(models or [None]), config, teacher=teacher, log=log)
    if emit_result(json.dumps([r.to_dict() for r in records], indent=2), json_path):
        return
    _print_table(records)


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=140)


def _print_table(records):
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
    _console().print(table)


def _print_suite(records):
    """Task rows x model columns: ``0.812 ± 0.012``; then neighbour agreement and retained."""
    from rich.table import Table

    first = records[0].metrics
    short = [Path(r.metrics["model"]).name or r.metrics["model"] for r in records]
    names = short if len(set(short)) == len(short) else [r.metrics["model"] for r in records]
    table = Table(title=f"quality suite (probe accuracy ± standard error; neighbours and retained against {names[0]})")
    table.add_column("task", overflow="fold")
    for name in names:
        table.add_column(name, justify="right", overflow="fold")
    for task, s in first["tasks"].items():
        label = f"{task} ({s['classes']} classes, {s['n_train']:,} / {s['n_test']:,})"
        table.add_row(label, *[_pm(r.metrics["tasks"][task]["accuracy"], r.metrics["tasks"][task]["stderr"])
                               for r in records])
    table.add_row(f"neighbour agreement@{first['neighbours']} ({first['pool_size']:,} texts)",
                  *[_pm(r.metrics["neighbour_agreement"], r.metrics["neighbour_stderr"]) for r in records])
    table.add_row("retained (mean of accuracy / original's)",
                  *["-" if r.metrics["retained"] is None else f"{r.metrics['retained']:.1%}" for r in records])
    table.add_row("unique params", *[f"{r.params_after:,}" for r in records])
    _console().print(table)


def _pm(value, stderr) -> str:
    return "-" if value is None else f"{value:.3f} ± {stderr:.3f}"
