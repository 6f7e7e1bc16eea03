"""Data: calibration and training text from local files, and the built-in default."""

from .text import TEXT_COLUMNS, default_calibration_texts, read_texts

__all__ = ["TEXT_COLUMNS", "default_calibration_texts", "read_texts"]
