"""What a model's task head is, and how labels map onto its classes."""

from __future__ import annotations


def is_sequence_classifier(model) -> bool:
    """The model carries a sequence-classification head (``*ForSequenceClassification``)."""
    archs = getattr(model.config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and hasattr(model, "num_labels")


def is_causal_lm(loaded) -> bool:
    """A decoder with a language-model head (a `LoadedModel`)."""
    return loaded.adapter.is_decoder and loaded.model.get_output_embeddings() is not None


def class_indices(model, labels: list[str]):
    """Labels as the head's class indices, matched by ``id2label`` name (any case) or given as an
    index in range; ``None`` if any label fits neither."""
    import torch

    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    by_name = {v.lower(): k for k, v in id2label.items()}
    ids = []
    for label in labels:
        if label.lower() in by_name:
            ids.append(by_name[label.lower()])
        elif label.isdigit() and int(label) in id2label:
            ids.append(int(label))
        else:
            return None
    return torch.tensor(ids)
