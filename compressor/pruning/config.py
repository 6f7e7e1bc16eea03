"""Options of the pruning stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StageConfig, TextOptions, check_choice, check_device, check_int, check_positive, choice
from ..errors import ConfigError

#: How units are ranked.
SCORES = ("taylor", "magnitude")


@dataclass
class PruneConfig(TextOptions, StageConfig):
    """What to prune and how to rank what is kept.

    Attributes:
        heads: Share of attention heads to remove in every layer, in ``[0, 1)``. Under
            grouped-query attention a unit is a key/value head with its query heads.
        ffn: Share of FFN neurons to remove in every layer, in ``[0, 1)``.
        drop_layers: Remove this many whole layers, those with the lowest Block Influence on
            the calibration text (ShortGPT).
        score: ``taylor``: first-order Taylor estimate of how much removing a unit changes its
            sublayer's output, ``E ||dy/dm||`` for a unit mask ``m`` (Michel et al., 2019, with the
            sublayer output in place of a task loss, so it needs no labels): the norm of the
            unit's contribution, averaged over calibration tokens. ``magnitude``: weight norms
            only, no data.
        vocab_from: Keep only the tokens this data uses (a file, a packaged data set name or a
            hub dataset id; several, comma-separated), plus the special tokens; the tokenizer is
            rewritten to match.
        vocab_min_count: Keep a token only if ``vocab_from`` uses it at least this often. 1 keeps
            the data's outputs unchanged to the bit; above it, rare words are spelled with the
            pieces that are kept (smaller embeddings, slightly different tokens).
        data: Calibration text for ``taylor``, ``drop_layers`` and the fidelity check (default: the
            first ``max_samples`` texts of ``vocab_from`` when given, else built-in sentences).
        max_samples: Calibration texts to use.
        max_length: Truncate calibration texts to this many tokens.
        batch_size: Calibration texts per forward pass.
        fidelity: Compare the pruned model with the original on the calibration text.
        device: Torch device for the calibration passes.
    """

    heads: float = 0.0
    ffn: float = 0.0
    drop_layers: int = 0
    score: str = choice("taylor", SCORES)
    vocab_from: str | None = None
    vocab_min_count: int = 1
    max_samples: int = 64
    max_length: int = 128
    batch_size: int = 16
    fidelity: bool = True
    device: str = "cpu"

    def __post_init__(self):
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"--{name} is the share of units to remove and must be in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        check_int("drop_layers", self.drop_layers, 0)
        check_int("vocab_min_count", self.vocab_min_count, 1)
        check_choice("score", self.score, SCORES)
        for name in ("max_samples", "max_length", "batch_size"):
            check_positive(name, getattr(self, name))
        check_device(self.device)
        if not (self.heads or self.ffn or self.drop_layers or self.vocab_from):
            raise ConfigError("nothing to prune: give --heads, --ffn, --drop-layers or --vocab-from")
