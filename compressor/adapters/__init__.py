"""Architecture adapters: what differs between model families lives here and nowhere else."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import HEAD_ROW_ROLES, NEURON_ROW_ROLES, ROLES, ArchitectureAdapter, Geometry, LinearSpec
from .families import ADAPTERS

_BY_MODEL_TYPE = {t: a for a in ADAPTERS for t in a.model_types}

#: The ``model_type`` values `compress` supports, for messages and docs.
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The adapter for a model (or its config).

    Raises:
        UnsupportedModelError: no adapter serves ``config.model_type``.
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "Geometry",
    "HEAD_ROW_ROLES",
    "LinearSpec",
    "NEURON_ROW_ROLES",
    "ROLES",
    "SUPPORTED_MODEL_TYPES",
    "get_adapter",
]
