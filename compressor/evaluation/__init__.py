"""Measuring a model: task metrics (`evaluate`), and fidelity to the original (`fidelity.fidelity`)."""

from .evaluate import TASKS, EvaluateConfig, evaluate, load_split, pick_task

__all__ = ["TASKS", "EvaluateConfig", "evaluate", "load_split", "pick_task"]
