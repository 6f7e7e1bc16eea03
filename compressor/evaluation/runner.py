"""The evaluation stage on folders: models in, their records side by side out.

`compress evaluate` runs `evaluate_models` (``--suite``: `suite_models`); a recipe's ``evaluate``
stage runs `run_evaluate`; `STAGE` declares the stage (its command, which scores several models,
is written in ``cli/evaluate.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from ..contract import StageRun, Stage
from ..errors import CompressError, ConfigError
from ..io import check_writable, staged_folder, write_text_atomic
from ..record import StageRecord
from .config import EvaluateConfig
from .suite import SuiteConfig


def progress_of(log, model) -> Callable[[str], None] | None:
    """Progress lines of ``model``'s evaluation as ``evaluate_step`` events of ``log`` (an
    `EventLog`, or ``None`` for none): ``evaluate: <model>: <step>``."""
    if log is None:
        return None
    return lambda step: log.emit("evaluate_step", model=model.name, step=step)


def evaluate_models(models: list, config: EvaluateConfig, *, teacher=None, log=None) -> list[StageRecord]:
    """Score each model on the same split; fidelity to ``teacher`` (default: the first model,
    when there are several).

    Args:
        log: An `EventLog` that gets an ``evaluate_step`` event as each long step starts.

    Raises:
        ConfigError: the models need different metrics (say, an encoder and a causal LM).
    """
    from ..models import as_loaded
    from .stage import evaluate, load_split, pick_task

    loaded = [as_loaded(m) for m in models]
    ref = as_loaded(teacher) if teacher is not None else (loaded[0] if len(loaded) > 1 else None)
    tasks = {pick_task(m, config.task) for m in loaded}
    if len(tasks) > 1:
        raise ConfigError(f"the models need different metrics ({', '.join(sorted(tasks))}); evaluate them apart")
    split = load_split(config, need_labels=tasks != {"lm"})
    records = []
    for model in loaded:
        _, record = evaluate(model, config, teacher=ref if ref is not model else None, split=split,
                             progress=progress_of(log, model))
        record.metrics["model"] = model.name
        records.append(record)
    return records


def suite_models(models: list, config: EvaluateConfig, suite: SuiteConfig, *, log=None) -> list[StageRecord]:
    """Score each model on the quality suite: the first is the original, the others are compared
    with it (neighbour agreement, retained); the original's own comparison is with itself (1.0).

    Args:
        models: Model folders, hub ids or `LoadedModel` (``None``: the bundled model).
        config: How texts are embedded (``max_length``, ``batch_size``, ``device``).
        suite: The suite's tasks and sizes.
        log: An `EventLog` that gets an ``evaluate_step`` event as each model's task starts.

    Returns:
        One record per model; ``metrics`` holds ``task: "suite"``, ``model``, ``reference`` and the
        `SuiteScores` as a dict.

    Raises:
        ConfigError: a causal LM among the models (the suite scores sentence embeddings).
        DataError: a task that cannot be fetched or read (before any model is scored).
    """
    from ..models import as_loaded, unique_parameters
    from .stage import pick_task
    from .suite import compare, load_suite, model_embedder, suite_scores

    loaded = [as_loaded(m) for m in models]
    for model in loaded:
        if pick_task(model, "auto") == "lm":
            raise ConfigError(f"--suite scores sentence embeddings, and {model.name} is a causal language model; "
                              "evaluate it without --suite (perplexity)")
        if model.tokenizer is None:
            raise ConfigError(f"{model.name} has no tokenizer; evaluation needs one")
    data = load_suite(suite)  # every task fetched and split before the first model runs
    records, reference = [], None
    for model in loaded:
        start = time.perf_counter()
        embed = model_embedder(model, max_length=config.max_length, batch_size=config.batch_size, device=config.device)
        scores = suite_scores(embed, data, suite, reference=reference, progress=progress_of(log, model))
        if reference is None:
            reference = scores = compare(scores, scores)  # the original against itself: 1.0, the invariant
        metrics = {"task": "suite", "model": model.name, "reference": loaded[0].name, **scores.to_dict()}
        settings = {**suite.to_dict(), "max_length": config.max_length, "batch_size": config.batch_size,
                    "device": config.device}
        records.append(StageRecord.build("evaluate", settings, before=unique_parameters(model.model), metrics=metrics,
                                         started=start))
    return records


def recorded_teacher(loaded):
    """The original a compressed model records, loaded, and why not where it cannot be:
    ``(teacher or None, reason or None)``. The original itself has none."""
    from ..models import load_model

    if not loaded.origin or loaded.origin == loaded.source:
        return None, None
    try:
        return load_model(loaded.origin), None
    except CompressError as e:  # the original is not reachable from here; the task metric still counts
        return None, str(e)


def run_evaluate(model, config: EvaluateConfig, output: str | Path, *, overwrite: bool = False) -> StageRecord:
    """Score ``model``, with fidelity to the original it records, and write ``evaluate.json``."""
    from ..models import as_loaded

    check_writable(output, overwrite=overwrite, folder=True)
    loaded = as_loaded(model)
    teacher, unreachable = recorded_teacher(loaded)
    (record,) = evaluate_models([loaded], config, teacher=teacher)
    if unreachable:
        record.metrics["fidelity_skipped"] = unreachable
    with staged_folder(output, overwrite=overwrite) as tmp:
        write_text_atomic(tmp / "evaluate.json", json.dumps(record.to_dict(), indent=2))
    return record


def run(run: StageRun) -> StageRecord:
    """``evaluate.json``; with fidelity to the original the model records, if it is not the original."""
    return run_evaluate(run.model, run.config, run.output, overwrite=run.overwrite)


STAGE = Stage("evaluate", EvaluateConfig, run,
                  key_metrics=("metrics.accuracy", "metrics.macro_f1", "metrics.perplexity",
                               "metrics.fidelity.embedding_cosine"), own_command=True)
