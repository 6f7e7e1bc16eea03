"""The training texts of a fine-tuning run, with class labels for classifiers, and its batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data.text import fit_length
from ..errors import ConfigError, DataError
from ..models import LoadedModel
from ..models.heads import class_indices, is_sequence_classifier
from .config import FinetuneConfig


@dataclass
class TrainingData:
    """The texts a run trains on.

    Attributes:
        texts: The training texts, at most ``config.max_samples``.
        label_ids: Class index per text (``(n,)``), when a classifier learns from labels its head knows.
        held_out: Texts of ``config.data`` left out because ``config.holdout`` holds them.
        lengths: Tokens per text (the student's tokenizer, at most ``config.max_length``), when
            batches are grouped by length.
    """

    texts: list[str]
    label_ids: torch.Tensor | None = None
    held_out: int = 0
    lengths: list[int] | None = None
    _epochs: dict = field(default_factory=dict, repr=False)  # epoch -> its batches, when grouped

    def batch(self, step: int, config: FinetuneConfig, tokenizer, device: str):
        """The tokenized texts of ``step`` on ``device`` and their class indices (or ``None``)."""
        if self.lengths is None:
            idx = batch_indices(len(self.texts), config.batch_size, step, config.seed)
        else:
            epoch, k = divmod(step, max(1, len(self.texts) // config.batch_size))
            if epoch not in self._epochs:
                self._epochs = {epoch: grouped_batches(self.lengths, config.batch_size, epoch, config.seed)}
            idx = self._epochs[epoch][k]
        enc = tokenizer([self.texts[i] for i in idx], padding=True, truncation=True,
                        max_length=fit_length(tokenizer, config.max_length), return_tensors="pt").to(device)
        labels = self.label_ids[idx].to(device) if self.label_ids is not None else None
        return enc, labels


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The texts of a step: a fresh seeded shuffle every epoch, so any step can be recomputed."""
    epoch, k = divmod(step, max(1, n // batch_size))
    order, _ = epoch_shuffle(n, batch_size, epoch, seed)
    return order[k * batch_size : (k + 1) * batch_size]


def epoch_shuffle(n: int, batch_size: int, epoch: int, seed: int) -> tuple[list[int], torch.Generator]:
    """An epoch's seeded shuffle of ``n`` texts, its first ``n // batch_size`` batches' worth
    (the rest wait for another epoch), and the generator that drew it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)[: max(1, n // batch_size) * batch_size].tolist(), generator


#: Batches a length-grouped epoch sorts together (Hugging Face Trainer's ``group_by_length``
#: sorts megabatches of 50 batches too): enough that each batch holds texts of about one length,
#: few enough that a batch still mixes the data sets and the texts of its length.
MEGABATCH = 50


def grouped_batches(lengths: list[int], batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    """One epoch's batches with texts of about one length in each: the epoch's shuffle (that of
    `batch_indices`) cut into megabatches of ``MEGABATCH`` batches, each sorted by length and cut
    into batches, then the batches shuffled (so long and short batches alternate through the
    epoch). Every text of the shuffle's first ``n // batch_size`` batches appears once, as in an
    ungrouped epoch; padding, which costs as much as text, shrinks to each batch's spread of
    lengths."""
    order, generator = epoch_shuffle(len(lengths), batch_size, epoch, seed)
    batches = []
    for start in range(0, len(order), MEGABATCH * batch_size):
        mega = sorted(order[start : start + MEGABATCH * batch_size], key=lambda i: -lengths[i])
        batches += [mega[j : j + batch_size] for j in range(0, len(mega), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def load_training_data(student: LoadedModel, config: FinetuneConfig) -> TrainingData:
    """Read ``config.data``, with labels when the student is a classifier that can use them.

    Raises:
        DataError: unreadable data, or a named ``label_column`` that is missing or not classes.
        ConfigError: labels for a student without a classifier head, labels the head does not know
            (when asked for by name), or no text at all.
    """
    is_classifier = is_sequence_classifier(student.model)
    texts, labels, held_out = _read_texts(config, want_labels=config.label_column is not None
                                          or (is_classifier and config.label_weight))
    if config.label_column is not None and not is_classifier:
        raise ConfigError("--label-column trains a classifier head, and the student has none; drop --label-column")
    label_ids = None
    if labels is not None and is_classifier:
        label_ids = class_indices(student.model, labels)
        if label_ids is None and config.label_column is not None:
            raise ConfigError(f"labels {sorted(set(labels))[:5]} do not match the classifier's classes "
                              f"{sorted(str(v) for v in student.model.config.id2label.values())}")
        # labels the head does not know (and were not asked for by name): distil with KL only
    if len(texts) < 1:
        raise ConfigError("the training data is empty" + (f" once the {held_out} texts of --holdout are left out"
                                                          if held_out else ""))
    lengths = None
    if config.group_by_length:
        lengths = [len(ids) for ids in student.tokenizer(texts, truncation=True, add_special_tokens=True,
                                                         max_length=fit_length(student.tokenizer, config.max_length))["input_ids"]]
    return TrainingData(texts, label_ids, held_out, lengths)


def holdout_texts(config: FinetuneConfig) -> set[str]:
    """The texts ``config.holdout`` names: the quality suite's test splits, or the texts of its data sets."""
    from ..data.datasets import load_texts_from

    if config.holdout == "suite":
        from ..data.suite import load_suite

        return {t for task in load_suite(config.holdout_suite()).tasks for t in task.test_texts}
    return set(load_texts_from(config.holdout, text_column=config.text_column, encoding=config.encoding))


def _read_texts(config: FinetuneConfig, *, want_labels: bool) -> tuple[list[str], list | None, int]:
    """The first ``max_samples`` texts of ``config.data`` that ``holdout`` does not hold, their
    labels when wanted and present, and how many texts ``holdout`` left out."""
    from ..data.datasets import load_labelled, load_texts_from

    texts = labels = None
    if want_labels and "," not in config.data:  # labels come from one data set (`FinetuneConfig`)
        try:
            texts, labels = load_labelled(config.data, text_column=config.text_column, label_column=config.label_column,
                                          encoding=config.encoding, classes=True)
        except DataError:
            if config.label_column is not None:
                raise  # labels were asked for by name (and must be classes)
            # otherwise a classifier distils from unlabelled text too (KL on its logits), as it
            # does when a guessed label column holds ratings or ids rather than classes
    if texts is None:
        texts = load_texts_from(config.data, text_column=config.text_column, encoding=config.encoding)
    held_out = 0
    if config.holdout:
        banned = holdout_texts(config)
        keep = [i for i, t in enumerate(texts) if t not in banned]
        held_out = len(texts) - len(keep)
        texts = [texts[i] for i in keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    if config.max_samples:
        texts = texts[: config.max_samples]
        labels = labels[: config.max_samples] if labels is not None else None
    return texts, labels, held_out
