"""Options of the analysis stage."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StageConfig, TextOptions, check_choice, check_device, check_int, check_positive, choice
from ..layer_groups import METRICS


@dataclass
class AnalyzeConfig(TextOptions, StageConfig):
    """How to analyze layer similarity.

    Attributes:
        groups: Recommend a sharing plan with this many groups; by default about half
            as many groups as layers (and lists the best score for every count anyway).
        metric: Which similarity drives the grouping: ``cka`` (activations; the literature
            picks layers by what they compute, not by raw weights), ``angular`` (1 - angular
            distance), ``aligned-weight`` or ``raw-weight`` (mean over sublayers). Default:
            ``cka`` when activations are analyzed, else ``aligned-weight``.
        weights: Compute weight similarity (raw and permutation-aligned).
        activations: Compute activation similarity on calibration text.
        max_samples: Use at most this many texts.
        max_length: Truncate texts to this many tokens.
        batch_size: Texts per forward pass.
        max_tokens: Tokens sampled per layer for CKA and angular distance.
        removable: How many of the most removable layers (lowest Block Influence) to list.
        device: Torch device for the forward passes.
        seed: Seed for token sampling.
        validate: Apply the plans of this many group counts nearest the recommended one (and as
            many dropped layers, by Block Influence) and measure the damage on held-out text
            (next-token KL for language models, embedding cosine otherwise): predicted against
            measured, ranked. 0: no validation.
    """

    groups: int | None = None
    metric: str | None = choice(None, METRICS)
    weights: bool = True
    activations: bool = True
    max_samples: int = 256
    max_length: int = 128
    batch_size: int = 16
    max_tokens: int = 4096
    removable: int = 3
    device: str = "cpu"
    seed: int = 0
    validate: int = 0

    def __post_init__(self):
        from ..errors import ConfigError

        check_int("groups", self.groups, 1, allow_none=True)
        if self.metric is None:
            self.metric = "cka" if self.activations else "aligned-weight"
        check_choice("metric", self.metric, METRICS)
        for name in ("max_samples", "max_length", "batch_size", "max_tokens"):
            check_positive(name, getattr(self, name))
        check_device(self.device)
        check_int("validate", self.validate, 0)
        if self.removable < 0:
            raise ConfigError(f"--removable must be >= 0, got {self.removable}")
        if not (self.weights or self.activations):
            raise ConfigError("nothing to analyze: enable weights or activations")
        if self.metric in ("cka", "angular") and not self.activations:
            raise ConfigError(f"metric {self.metric} needs activations; use --metric aligned-weight with --no-activations")
        if self.metric.endswith("weight") and not self.weights:
            raise ConfigError(f"metric {self.metric} needs the weight analysis")
