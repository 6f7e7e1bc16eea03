"""What a model's task head is, and how labels map onto its classes."""

from __future__ import annotations


def is_sequence_classifier(model) -> bool:
    """The model carries a sequence-classification head (``*ForSequenceClassification``)."""
    archs = getattr(model.config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs) and hasattr(model, "num_labels")


def is_causal_lm(loaded) -> bool:
    """A decoder with a language-model head (a `LoadedModel`)."""
    return loaded.adapter.is_decoder and loaded.model.get_output_embeddings() is not None


def output_heads(model) -> list:
    """The model's output head as a list (empty without one): what int4 leaves out of its
    projections, as the export stores the head (tied or not) in the tables' blocks."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [head] if head is not None else []


#: The task names of optimum's exporters, by what the model's head computes.
OPTIMUM_TASKS = {"classifier": "text-classification", "lm": "text-generation", "encoder": "feature-extraction"}


def pick_task(loaded, task: str, names: dict[str, str] = OPTIMUM_TASKS) -> str:
    """``task``, or for ``auto`` the one the model's head computes, in a stage's own names.

    Args:
        loaded: The model.
        task: ``auto`` or one of ``names``' values.
        names: The stage's name for a ``classifier``, ``lm`` and ``encoder`` model.

    Raises:
        ConfigError: a forced task the model has no head for.
    """
    from ..errors import ConfigError

    is_classifier = is_sequence_classifier(loaded.model)
    is_lm = is_causal_lm(loaded)
    if task == names["classifier"] and not is_classifier:
        raise ConfigError(f"--task {task} needs a classifier head; {loaded.name} has none")
    if task == names["lm"] and not is_lm:
        raise ConfigError(f"--task {task} needs a causal language model; {loaded.name} is not one")
    if task != "auto":
        return task
    return names["classifier"] if is_classifier else names["lm"] if is_lm else names["encoder"]


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
