"""Measuring a model: task metrics, and fidelity of a compressed model to the original."""

from .evaluate import TASKS, EvaluateConfig, evaluate, load_split, pick_task
from .fidelity import fidelity, pool

__all__ = ["TASKS", "EvaluateConfig", "evaluate", "fidelity", "load_split", "pick_task", "pool"]
