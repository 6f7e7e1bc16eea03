"""Options of the evaluation stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StageConfig, TextOptions, check_choice, check_device, check_positive, choice

TASKS = ("auto", "embedding", "classification", "lm")


@dataclass
class EvaluateConfig(TextOptions, StageConfig):
    """What to evaluate on.

    Attributes:
        data: A file (csv/tsv/jsonl with labels; txt for perplexity), a packaged data set name
            (``movie-snippets``) or a Hugging Face dataset id.
        label_column: Column or key of the labels.
        task: ``auto`` picks by the model: classifier head -> classification, causal LM -> lm,
            otherwise embedding (probe).
        train_size: Examples the probe is fitted on.
        test_size: Examples every metric is measured on.
        seed: Seed of the split (with ``--suite``: of the suite's splits, pool and probes).
        max_length: Tokens per text.
        batch_size: Texts per forward pass.
        device: Torch device.
    """

    data: str = "movie-snippets"
    label_column: str | None = None
    task: str = choice("auto", TASKS)
    train_size: int = 4000
    test_size: int = 2000
    seed: int = 0
    max_length: int = 64
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        for name in ("train_size", "test_size", "max_length", "batch_size"):
            check_positive(name, getattr(self, name))
        check_device(self.device)
