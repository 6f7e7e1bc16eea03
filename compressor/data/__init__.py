"""Data: calibration and training text from local files, and the built-in default."""

from .datasets import calibration_texts
from .text import (
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    check_classes,
    default_calibration_texts,
    read_labelled,
    read_texts,
)

__all__ = ["LABEL_COLUMNS", "TEXT_COLUMNS", "calibration_texts", "check_classes", "default_calibration_texts", "read_labelled", "read_texts"]
