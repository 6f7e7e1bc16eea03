"""Recovery fine-tuning: distillation from the original model into the compressed one."""

from .config import TRAIN_MODES, FinetuneConfig
from .trainer import check_teacher, distillation_loss, finetune, select_trainable

__all__ = ["TRAIN_MODES", "FinetuneConfig", "check_teacher", "distillation_loss", "finetune", "select_trainable"]
