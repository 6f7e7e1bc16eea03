"""The quality suite: several real classification tasks and neighbour agreement, per model.

One binary-sentiment probe says little (a shared model before any recovery training keeps most of
its accuracy, reports/bench_recovery.md). The suite scores a sentence-embedding model on:

* **tasks**: for each labelled data set (by default the four packaged ones: movie snippets,
  SMS spam, TREC question types, BBC News), the accuracy of a logistic-regression probe on the
  frozen, L2-normalized sentence embeddings (`probe.probe_accuracy`), fitted on a seeded train
  split and scored on a seeded test split, with its binomial standard error sqrt(p(1-p)/n);
* **neighbour agreement**: on a pool of texts drawn from the tasks' test splits, the mean overlap
  ``|A & B| / k`` of each text's k nearest neighbours (cosine, itself excluded) under the model's
  embeddings (A) and the original's (B), with its standard error (the per-text overlaps' sample
  standard deviation over sqrt(n)): what retrieval users lose first;
* **retained**: the mean over tasks of the model's accuracy over the original's.

The core works on an embedding function ``texts -> (n, d) tensor``, so anything that embeds (a
PyTorch model, an ONNX session) is scored on the same texts::

    data = load_suite(config)                                   # splits and pool, once
    original = suite_scores(embed_original, data, config)
    compressed = suite_scores(embed_compressed, data, config, reference=original)
    compressed.retained, compressed.neighbour_agreement

`compare` fills in the comparison of two scores already computed (the original against itself
gives 1.0 for both, which the CLI shows as the original's column).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..data.suite import SUITE_TASKS, SuiteConfig, SuiteData, SuiteTask, load_suite, split_sizes

# the data definitions live in the core (fine-tuning reads them too); importable from here as before
__all__ = ["SUITE_TASKS", "Embed", "SuiteConfig", "SuiteData", "SuiteScores", "SuiteTask", "TaskScore", "compare",
           "load_suite", "model_embedder", "neighbour_agreement", "split_sizes", "suite_scores"]

if TYPE_CHECKING:
    import torch

#: ``texts -> (len(texts), dim)`` float tensor of sentence embeddings.
Embed = Callable[[list[str]], "torch.Tensor"]


@dataclass
class TaskScore:
    """A probe's accuracy on one task, with its binomial standard error.

    Attributes:
        accuracy: Share of the test split the probe labels right.
        stderr: ``sqrt(accuracy * (1 - accuracy) / n_test)``.
        macro_f1: Macro-averaged F1 on the test split.
        n_train: Examples the probe was fitted on.
        n_test: Examples it was scored on.
        classes: Classes in the train split.
        retained: ``accuracy`` over the original's (with a reference; ``None`` where the
            original's is 0).
    """

    accuracy: float
    stderr: float
    macro_f1: float
    n_train: int
    n_test: int
    classes: int
    retained: float | None = None


@dataclass
class SuiteScores:
    """One model's suite result.

    Attributes:
        tasks: Per task (in the suite's order), its `TaskScore`.
        neighbours: k of the neighbour agreement.
        pool_size: Texts in the pool.
        pool_embeddings: The model's L2-normalized embeddings of the pool ``(pool_size, dim)``,
            what another model's agreement is measured against (not in `to_dict`).
        fingerprint: `SuiteData.fingerprint` of the texts scored.
        neighbour_agreement: Mean overlap of the k nearest neighbours with the reference's
            (``None`` without a reference).
        neighbour_stderr: Its standard error.
        retained: Mean over tasks of accuracy over the reference's (``None`` without one).
        seconds: Time the scoring took.
    """

    tasks: dict[str, TaskScore]
    neighbours: int
    pool_size: int
    pool_embeddings: Any = field(repr=False)
    fingerprint: str
    neighbour_agreement: float | None = None
    neighbour_stderr: float | None = None
    retained: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without the pool embeddings."""
        return {"tasks": {name: dataclasses.asdict(s) for name, s in self.tasks.items()},
                "neighbour_agreement": self.neighbour_agreement, "neighbour_stderr": self.neighbour_stderr,
                "neighbours": self.neighbours, "pool_size": self.pool_size, "retained": self.retained,
                "fingerprint": self.fingerprint, "seconds": self.seconds}


def binomial_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` examples: ``sqrt(p (1 - p) / n)``."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else float("nan")


def nearest_neighbours(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``(n, k)`` of each row's k nearest other rows of L2-normalized ``x`` by cosine."""
    import torch

    sims = x.float() @ x.float().T  # (n, n) cosine
    sims.fill_diagonal_(-torch.inf)  # a text is not its own neighbour
    return sims.topk(k, dim=1).indices


def neighbour_overlap(x: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Per text ``(n,)``: ``|A & B| / k`` of its k nearest neighbours under ``x`` (A) and under
    ``reference`` (B), two embeddings of the same texts in the same order."""
    if x.shape[0] != reference.shape[0]:
        raise ValueError(f"{x.shape[0]} and {reference.shape[0]} embeddings: not the same texts")
    a, b = nearest_neighbours(x, k), nearest_neighbours(reference, k)
    return (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).float() / k  # (n, k, k) -> (n,)


def neighbour_agreement(x: torch.Tensor, reference: torch.Tensor, k: int) -> tuple[float, float]:
    """``(mean, standard error)`` of `neighbour_overlap` over the texts; the standard error is the
    overlaps' sample standard deviation over sqrt(n)."""
    overlap = neighbour_overlap(x, reference, k)
    n = overlap.numel()
    return float(overlap.mean()), float(overlap.std(correction=1)) / math.sqrt(n) if n > 1 else float("nan")


def embedded(embed: Embed, texts: list[str]) -> torch.Tensor:
    """``embed(texts)`` as a float ``(len(texts), dim)`` tensor on the CPU, L2-normalized (cosine
    is then a dot product, whatever the embedding function returns)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(embed(texts)).float().cpu()
    if x.dim() != 2 or x.shape[0] != len(texts):
        raise ValueError(f"the embedding function returned shape {tuple(x.shape)} for {len(texts)} texts")
    return F.normalize(x, dim=-1)


def suite_scores(embed: Embed, data: SuiteData, config: SuiteConfig, *, reference: SuiteScores | None = None,
                 progress: Callable[[str], None] | None = None) -> SuiteScores:
    """Score one model (as its embedding function) on the suite.

    Args:
        embed: ``texts -> (n, d)`` sentence embeddings (normalized here if they are not).
        data: The suite's texts, from `load_suite` (the same for every model).
        config: The suite's settings (``neighbours``, ``seed`` of the probes).
        reference: The original's scores on the same ``data``: fills in neighbour agreement
            and retained (`compare`).
        progress: Called with ``"<task> (i/n)"`` as each task starts.

    Returns:
        The model's `SuiteScores`.
    """
    import torch

    from .probe import probe_accuracy

    start = time.perf_counter()
    tasks, test_embeddings = {}, []
    for i, task in enumerate(data.tasks, 1):
        if progress is not None:
            progress(f"{task.name} ({i}/{len(data.tasks)})")
        x = embedded(embed, task.train_texts + task.test_texts)
        train_x, test_x = x[: len(task.train_texts)], x[len(task.train_texts):]
        probe = probe_accuracy(train_x, task.train_labels, test_x, task.test_labels, seed=config.seed)
        tasks[task.name] = TaskScore(accuracy=probe["accuracy"], macro_f1=probe["macro_f1"],
                                     stderr=binomial_stderr(probe["accuracy"], len(task.test_texts)),
                                     n_train=len(task.train_texts), n_test=len(task.test_texts),
                                     classes=len(probe["classes"]))
        test_embeddings.append(test_x)
    pool = torch.stack([test_embeddings[t][i] for t, i in data.pool])  # (pool, dim)
    scores = SuiteScores(tasks=tasks, neighbours=config.neighbours, pool_size=len(data.pool), pool_embeddings=pool,
                         fingerprint=data.fingerprint, seconds=time.perf_counter() - start)
    return compare(scores, reference) if reference is not None else scores


def compare(scores: SuiteScores, reference: SuiteScores) -> SuiteScores:
    """``scores`` with neighbour agreement and retained measured against ``reference``.

    Raises:
        ValueError: the two were scored on different texts.
    """
    if scores.fingerprint != reference.fingerprint or scores.neighbours != reference.neighbours:
        raise ValueError("the scores and the reference were measured on different suites")
    mean, stderr = neighbour_agreement(scores.pool_embeddings, reference.pool_embeddings, scores.neighbours)
    tasks = {}
    for name, s in scores.tasks.items():
        base = reference.tasks[name].accuracy
        tasks[name] = dataclasses.replace(s, retained=s.accuracy / base if base > 0 else None)
    kept = [s.retained for s in tasks.values() if s.retained is not None]
    return dataclasses.replace(scores, tasks=tasks, neighbour_agreement=mean, neighbour_stderr=stderr,
                               retained=sum(kept) / len(kept) if kept else None)


def model_embedder(loaded, *, max_length: int = 64, batch_size: int = 64, device: str = "cpu") -> Embed:
    """A `LoadedModel`'s embedding function: its own pooling, normalized, texts truncated to
    ``max_length`` tokens."""
    from .probe import embed

    return lambda texts: embed(loaded, texts, batch_size=batch_size, max_length=max_length, device=device)
