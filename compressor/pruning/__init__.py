"""Structured pruning: attention heads, FFN neurons, whole layers and the vocabulary.

``model, record = prune(model, PruneConfig(heads=0.25, ffn=0.5, drop_layers=2))``. Shapes
shrink for real (fewer rows and columns, fewer blocks), so the pruned model is faster, not
only sparser; ``model.config`` is updated to match, so the model saves, reloads and exports.
"""

from .config import PruneConfig

__all__ = ["PruneConfig", "prune"]


def __getattr__(name):
    # `prune` pulls in torch; keep `import compressor.pruning` cheap for the CLI.
    if name == "prune":
        from .stage import prune

        return prune
    raise AttributeError(name)
