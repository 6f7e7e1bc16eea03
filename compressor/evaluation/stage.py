"""The evaluation stage: ``model, record = evaluate(model, EvaluateConfig(...))``.

The metric fits the model:

* sentence-embedding encoders: accuracy of a logistic-regression probe on frozen embeddings
  (the usual way embedding models are scored), on a fixed, seeded train/test split;
* sequence classifiers: accuracy and macro-F1 with the model's own head, on the test split;
* causal LMs: perplexity on the held-out texts.

With a teacher, the record also holds the fidelity to it on the test texts (embedding cosine,
hidden-state error, next-token KL).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from ..errors import ConfigError
from ..models import LoadedModel, heads, unique_parameters
from ..record import StageRecord
from .config import TASKS, EvaluateConfig

#: What `compress evaluate` calls each kind of model's task.
EVALUATE_TASKS = {"classifier": "classification", "lm": "lm", "encoder": "embedding"}


def pick_task(loaded: LoadedModel, task: str) -> str:
    """The task to score ``loaded`` on; a forced task must fit the model's head."""
    return heads.pick_task(loaded, task, EVALUATE_TASKS)


def load_split(config: EvaluateConfig, *, need_labels: bool):
    """``(train_texts, train_labels, test_texts, test_labels)``; labels empty for perplexity."""
    from ..data.datasets import load_labelled, load_texts, train_test_split

    if need_labels:
        texts, labels = load_labelled(config.data, text_column=config.text_column, label_column=config.label_column,
                                      encoding=config.encoding, classes=True)
        if len(set(labels)) < 2:
            raise ConfigError(f"{config.data} has one class only; a probe needs at least two")
        split = train_test_split(texts, labels, config.train_size, config.test_size, config.seed)
        if len(set(split[1])) < 2:
            raise ConfigError(f"the train split of {config.train_size} holds one class only; use a larger --train-size")
        return split
    texts = load_texts(config.data, text_column=config.text_column, encoding=config.encoding)
    order = list(range(len(texts)))
    random.Random(config.seed).shuffle(order)  # the same held-out texts for every model
    return [], [], [texts[i] for i in order[: config.test_size]], []


def evaluate(loaded: LoadedModel, config: EvaluateConfig, *, teacher: LoadedModel | None = None,
             split=None, progress: Callable[[str], None] | None = None) -> tuple[LoadedModel, StageRecord]:
    """Score ``loaded`` on its task, and against ``teacher`` if given.

    Args:
        loaded: The model.
        config: Data, split and task.
        teacher: The original, for fidelity.
        split: A split from `load_split` to reuse (several models on the same data).
        progress: Called with a short line as each long step starts.

    Returns:
        The model, unchanged, and a record whose metrics hold ``task`` and the task's numbers
        (``accuracy``/``macro_f1`` or ``perplexity``), plus ``fidelity`` with a teacher.
    """
    from ..fidelity import check_teacher, fidelity
    from .probe import classifier_metrics, embed, perplexity, probe_accuracy

    start = time.perf_counter()
    task = pick_task(loaded, config.task)
    if loaded.tokenizer is None:
        raise ConfigError(f"{loaded.name} has no tokenizer; evaluation needs one")
    tr_x, tr_y, te_x, te_y = split or load_split(config, need_labels=task != "lm")
    kw = {"max_length": config.max_length, "device": config.device}
    metrics: dict = {"task": task, "test_size": len(te_x)}
    step = progress or (lambda text: None)
    if task == "embedding":
        step(f"probe: embedding {len(tr_x):,} train + {len(te_x):,} test texts")
        a = embed(loaded, tr_x, batch_size=config.batch_size, **kw)
        b = embed(loaded, te_x, batch_size=config.batch_size, **kw)
        metrics.update(probe_accuracy(a, tr_y, b, te_y, seed=config.seed))
        metrics["train_size"] = len(tr_x)
    elif task == "classification":
        step(f"classifying {len(te_x):,} test texts")
        metrics.update(classifier_metrics(loaded, te_x, te_y, batch_size=config.batch_size, **kw))
    else:
        step(f"perplexity on {len(te_x):,} texts")
        metrics.update(perplexity(loaded, te_x, batch_size=max(1, config.batch_size // 8), **kw))
    if teacher is not None:
        try:
            check_teacher(loaded, teacher)  # fidelity compares like with like: same shape, same tokenizer
        except ConfigError as e:
            metrics["fidelity_skipped"] = str(e)
        else:
            # the first 1,000 test texts: enough for a stable mean, half the cost of all 2,000
            step(f"fidelity to {teacher.name} on {min(len(te_x), 1000):,} texts")
            metrics["fidelity"] = fidelity(loaded, teacher, te_x[:1000], batch_size=config.batch_size, **kw)
    return loaded, StageRecord.build("evaluate", config, before=unique_parameters(loaded.model), metrics=metrics,
                                     started=start)
