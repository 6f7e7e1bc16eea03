"""Measuring a compressed model against the original."""

from .fidelity import fidelity, pool

__all__ = ["fidelity", "pool"]
