"""Data: calibration and training text from local files, and the built-in default."""

from .text import LABEL_COLUMNS, TEXT_COLUMNS, calibration_texts, default_calibration_texts, read_labelled, read_texts

__all__ = ["LABEL_COLUMNS", "TEXT_COLUMNS", "calibration_texts", "default_calibration_texts", "read_labelled", "read_texts"]
