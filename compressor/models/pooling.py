"""Sentence embeddings from token states: the pooling a model's own head (or its
sentence-transformers folder) does."""

from __future__ import annotations

import torch


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Sentence embeddings from token states.

    Args:
        hidden: ``(batch, seq, hidden)``.
        mask: ``(batch, seq)`` attention mask.
        mode: ``mean`` (over real tokens), ``cls`` (first token) or ``last`` (last real token).
    """
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(1) - 1  # right padding: index of the last real token
        if bool((mask[:, -1] == 1).all()):
            last = torch.full_like(last, mask.shape[1] - 1)  # left padding or none
        return hidden[torch.arange(hidden.shape[0]), last]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
