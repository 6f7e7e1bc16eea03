"""The evaluation stage on folders: models in, their records side by side out.

`compress evaluate` runs `evaluate_models`; a recipe's ``evaluate`` stage runs `run_evaluate`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CompressError, ConfigError
from ..io import check_writable, staged_folder, write_text_atomic
from ..record import StageRecord
from .evaluate import EvaluateConfig


def evaluate_models(models: list, config: EvaluateConfig, *, teacher=None) -> list[StageRecord]:
    """Score each model on the same split; fidelity to ``teacher`` (default: the first model,
    when there are several).

    Raises:
        ConfigError: the models need different metrics (say, an encoder and a causal LM).
    """
    from ..models import as_loaded
    from .evaluate import evaluate, load_split, pick_task

    loaded = [as_loaded(m) for m in models]
    ref = as_loaded(teacher) if teacher is not None else (loaded[0] if len(loaded) > 1 else None)
    tasks = {pick_task(m, config.task) for m in loaded}
    if len(tasks) > 1:
        raise ConfigError(f"the models need different metrics ({', '.join(sorted(tasks))}); evaluate them apart")
    split = load_split(config, need_labels=tasks != {"lm"})
    records = []
    for model in loaded:
        _, record = evaluate(model, config, teacher=ref if ref is not model else None, split=split)
        record.metrics["model"] = model.name
        records.append(record)
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
