"""Task metrics: a linear probe on frozen sentence embeddings, a classifier's own head, perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.text import batches, embed_by_length
from ..models.pooling import pool


@torch.no_grad()
def embed(loaded, texts: list[str], *, batch_size: int = 64, max_length: int = 128, device: str = "cpu",
          normalize: bool = True) -> torch.Tensor:
    """Sentence embeddings ``(len(texts), hidden)`` with the model's own pooling, in the order of ``texts``.

    Texts are batched shortest first (`embed_by_length`).
    """
    base = loaded.adapter.base(loaded.model).to(device).eval()

    def one_batch(enc):
        hidden = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        e = pool(hidden, enc["attention_mask"], loaded.pooling).float()
        return (F.normalize(e, dim=-1) if normalize else e).cpu()

    rows = embed_by_length(one_batch, loaded.tokenizer, texts, batch_size, max_length, device)
    return torch.stack(rows) if rows else torch.zeros(0, 0)


def probe_accuracy(train_x: torch.Tensor, train_y: list[str], test_x: torch.Tensor, test_y: list[str],
                   *, seed: int = 0) -> dict:
    """Fit a logistic-regression probe on frozen embeddings; score it on the test split.

    Returns:
        ``{"accuracy", "macro_f1", "classes"}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(train_x.numpy(), train_y)
    pred = clf.predict(test_x.numpy())
    return {
        "accuracy": float(accuracy_score(test_y, pred)),
        "macro_f1": float(f1_score(test_y, pred, average="macro")),
        "classes": sorted(set(train_y)),
    }


@torch.no_grad()
def classifier_metrics(loaded, texts: list[str], labels: list[str], *, batch_size: int = 64, max_length: int = 128,
                       device: str = "cpu") -> dict:
    """Accuracy and macro-F1 of a sequence classifier with its own head.

    Labels are matched to the head's ``id2label`` names (or to class indices given as text).
    """
    from sklearn.metrics import accuracy_score, f1_score

    from ..errors import DataError
    from ..models.heads import class_indices

    gold = class_indices(loaded.model, labels)
    if gold is None:
        classes = sorted(str(v) for v in loaded.model.config.id2label.values())
        raise DataError(f"labels {sorted(set(labels))[:5]} do not match the classifier's classes {classes}")
    gold = gold.tolist()
    model = loaded.model.to(device).eval()
    pred = []
    for enc in batches(loaded.tokenizer, texts, batch_size, max_length, device):
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        pred += logits.argmax(-1).tolist()
    return {"accuracy": float(accuracy_score(gold, pred)), "macro_f1": float(f1_score(gold, pred, average="macro"))}


@torch.no_grad()
def perplexity(loaded, texts: list[str], *, batch_size: int = 8, max_length: int = 256, device: str = "cpu") -> dict:
    """Perplexity of a causal LM: exp(mean next-token negative log-likelihood over real tokens)."""
    model = loaded.model.to(device).eval()
    nll, count = 0.0, 0
    for enc in batches(loaded.tokenizer, texts, batch_size, max_length, device):
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target, keep = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()
        loss = F.cross_entropy(logits[keep].float(), target[keep], reduction="sum")
        nll += float(loss)
        count += int(keep.sum())
    return {"perplexity": math.exp(nll / max(count, 1)), "tokens": count}
