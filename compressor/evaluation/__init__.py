"""Measuring a model: task metrics (`evaluate`), fidelity to the original (`fidelity.fidelity`), and
the quality suite (`suite`: several tasks and neighbour agreement, on any embedding function)."""

from .config import TASKS, EvaluateConfig
from .stage import evaluate, load_split, pick_task
from .suite import (
           SUITE_TASKS,
           SuiteConfig,
           SuiteData,
           SuiteScores,
           compare,
           load_suite,
           suite_scores,
)

__all__ = ["SUITE_TASKS", "TASKS", "EvaluateConfig", "SuiteConfig", "SuiteData", "SuiteScores", "compare", "evaluate",
           "load_split", "load_suite", "pick_task", "suite_scores"]
