"""Layer sharing: groups of layers on one set of weights, with per-layer LoRA deltas."""

from ..models.checkpoint import MANIFEST, is_checkpoint, load_checkpoint, save_checkpoint
from .config import INITS, LORA_INITS, SHARE_GROUPS, ShareConfig, parse_plan


def __getattr__(name):  # stage.py imports torch; load it on first use so `compress --help` stays instant
    if name in ("share", "NO_RECOVERY_NOTE"):
        from . import stage

        return getattr(stage, name)
    raise AttributeError(name)


__all__ = [
    "INITS",
    "LORA_INITS",
    "MANIFEST",
    "NO_RECOVERY_NOTE",
    "SHARE_GROUPS",
    "ShareConfig",
    "is_checkpoint",
    "load_checkpoint",
    "parse_plan",
    "save_checkpoint",
    "share",
]
