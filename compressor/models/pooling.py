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


class SentenceEmbedding(torch.nn.Module):
    """An encoder whose output also holds its sentence embedding (pooled, then normalized when
    ``normalize``), so that an exported graph needs no pooling code around it.

    Returns a dict with ``last_hidden_state`` (what optimum's ``ORTModelForFeatureExtraction`` and
    sentence-transformers read) and ``sentence_embedding`` ``(batch, hidden)``.
    """

    def __init__(self, model: torch.nn.Module, mode: str, normalize: bool):
        super().__init__()
        self.model, self.mode, self.normalize = model, mode, normalize
        self.config = model.config  # the exporter reads the model's config
        self._token_types = "token_type_ids" in model.forward.__code__.co_varnames

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._token_types:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.model(**kwargs).last_hidden_state
        embedding = pool(hidden, attention_mask, self.mode)
        if self.normalize:
            embedding = torch.nn.functional.normalize(embedding, dim=-1)
        return {"last_hidden_state": hidden, "sentence_embedding": embedding}
