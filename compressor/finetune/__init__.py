"""Recovery fine-tuning: distillation from the original model into the compressed one."""

from .config import TRAIN_MODES, FinetuneConfig

_TRAINER = ("check_teacher", "distillation_loss", "finetune", "common_width", "layer_pairs", "same_tokens", "select_trainable", "teacher_ids")


def __getattr__(name):  # stage.py imports torch; load it on first use so `compress --help` stays instant
    if name in _TRAINER:
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)


__all__ = ["TRAIN_MODES", "FinetuneConfig", *_TRAINER]
