"""The quality suite's data: its options (`SuiteConfig`), and the seeded splits and neighbour pool
every model is scored on (`load_suite`). The scoring is `compressor.evaluation.suite`'s; fine-tuning
trains on the same texts the suite holds out, so both read them from here.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import StageConfig, check_int, check_positive
from ..errors import ConfigError, DataError

#: The packaged data sets the suite scores by default (`compressor.data.datasets.DATASETS`).
SUITE_TASKS = ("movie-snippets", "sms-spam", "trec", "bbc-news")

@dataclass
class SuiteConfig(StageConfig):
    """The quality suite of `compress evaluate --suite`.

    Attributes:
        suite_tasks: The suite's tasks: packaged data sets (movie-snippets, sms-spam, trec,
            bbc-news) or labelled csv/tsv/jsonl files.
        suite_train_size: Examples the probe of each task is fitted on (a task with fewer than
            ``suite_train_size`` + ``suite_test_size`` examples is split in the same proportion).
        suite_test_size: Examples each task's accuracy is measured on.
        pool_size: Texts, drawn evenly from the tasks' test splits, that neighbour agreement is
            measured on.
        neighbours: Nearest neighbours (by cosine) compared per text for neighbour agreement.
        seed: Seed of the splits, the pool and the probes.
    """

    suite_tasks: list[str] = field(default_factory=lambda: list(SUITE_TASKS))
    suite_train_size: int = 2000
    suite_test_size: int = 1000
    pool_size: int = 1000
    neighbours: int = 10
    seed: int = 0

    def __post_init__(self):
        from .datasets import DATASETS
        from .text import SUFFIXES

        if isinstance(self.suite_tasks, str):
            self.suite_tasks = [t.strip() for t in self.suite_tasks.split(",") if t.strip()]
        if not self.suite_tasks:
            raise ConfigError("--suite-tasks names no task", option="suite_tasks")
        if len(set(self.suite_tasks)) != len(self.suite_tasks):
            raise ConfigError(f"--suite-tasks names a task twice: {','.join(self.suite_tasks)}", option="suite_tasks")
        for task in self.suite_tasks:
            if task not in DATASETS and Path(task).suffix.lower() not in SUFFIXES and not Path(task).exists():
                raise ConfigError(f"unknown suite task {task!r}; known: {', '.join(DATASETS)} (or a labelled "
                                  "csv/tsv/jsonl file)", option="suite_tasks")
        for name in ("suite_train_size", "suite_test_size", "pool_size"):
            check_positive(name, getattr(self, name))
        check_int("neighbours", self.neighbours, 1)
        if self.neighbours >= self.pool_size:
            raise ConfigError(f"--neighbours {self.neighbours} needs a --pool-size larger than that, "
                              f"got {self.pool_size}", option="neighbours")


@dataclass
class SuiteTask:
    """One task's seeded split (the same texts for every model)."""

    name: str
    train_texts: list[str]
    train_labels: list[str]
    test_texts: list[str]
    test_labels: list[str]


@dataclass
class SuiteData:
    """The texts the suite scores every model on: computed once by `load_suite`, reused.

    Attributes:
        tasks: Each task's split.
        pool: The neighbour-agreement pool as ``(task index, index into its test texts)``.
        fingerprint: A hash of every text, label and the pool: scores to compare must share it.
    """

    tasks: list[SuiteTask]
    pool: list[tuple[int, int]]
    fingerprint: str = ""

    def __post_init__(self):
        if not self.fingerprint:
            digest = hashlib.sha256()
            for t in self.tasks:
                for part in (t.name, *t.train_texts, *t.train_labels, "\x01", *t.test_texts, *t.test_labels, "\x02"):
                    digest.update(part.encode("utf-8") + b"\x00")
            digest.update(repr(self.pool).encode())
            self.fingerprint = digest.hexdigest()[:16]

    @property
    def pool_texts(self) -> list[str]:
        return [self.tasks[t].test_texts[i] for t, i in self.pool]


def split_sizes(n: int, train_size: int, test_size: int) -> tuple[int, int]:
    """``(train, test)``: as asked where ``n`` examples hold both, else ``n`` split in their proportion."""
    if train_size + test_size <= n:
        return train_size, test_size
    test = min(n - 1, max(1, round(n * test_size / (train_size + test_size))))
    return n - test, test


def load_suite(config: SuiteConfig) -> SuiteData:
    """Fetch and read every task, split each (seeded), and draw the pool: the texts every model
    is scored on. Runs before any model does, so bad data stops the command before the work.

    Raises:
        DataError: a task that cannot be fetched or read, or whose labels are not classes.
        ConfigError: a task too small to split, or a pool too small for the neighbours.
    """
    from .datasets import load_labelled, train_test_split

    tasks = []
    for name in config.suite_tasks:
        texts, labels = load_labelled(name, classes=True)
        if len(texts) < 2 or len(set(labels)) < 2:
            raise DataError(f"suite task {name}: a probe needs two classes and two examples; "
                            f"it has {len(set(labels))} class(es) in {len(texts)} example(s)")
        n_train, n_test = split_sizes(len(texts), config.suite_train_size, config.suite_test_size)
        tr_x, tr_y, te_x, te_y = train_test_split(texts, labels, n_train, n_test, config.seed)
        if len(set(tr_y)) < 2:
            raise ConfigError(f"suite task {name}: the train split of {n_train} holds one class only; "
                              "use a larger --suite-train-size", option="suite_train_size")
        tasks.append(SuiteTask(name, tr_x, tr_y, te_x, te_y))
    # an even share of the pool from each task's test split (all of a split smaller than its share)
    rng = random.Random(config.seed)
    pool = []
    for t, task in enumerate(tasks):
        share = config.pool_size // len(tasks) + (t < config.pool_size % len(tasks))
        pool += [(t, i) for i in sorted(rng.sample(range(len(task.test_texts)), min(share, len(task.test_texts))))]
    if len(pool) <= config.neighbours:
        raise ConfigError(f"the neighbour pool holds {len(pool)} texts, too few for --neighbours {config.neighbours}; "
                          "use larger test splits or fewer neighbours", option="pool_size")
    return SuiteData(tasks, pool)
