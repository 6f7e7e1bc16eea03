"""How far a compressed model has moved from the original, on the same text.

* ``embedding_cosine``: cosine of the pooled sentence embeddings (the model's own pooling:
  mean for sentence-transformers encoders), averaged over texts;
* ``next_token_kl``: KL(original || compressed) of next-token distributions, averaged over
  real tokens (models with a language-model head);
* ``hidden_state_error``: per layer, ``||h_compressed - h_original|| / ||h_original||`` over
  real tokens.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from .data.text import batches
from .errors import CompressError, ConfigError, first_line
from .models.pooling import pool
from .progress import Progress


def check_teacher(student, teacher) -> None:
    """The teacher must be the student's original: same architecture, shape and tokenizer
    (fidelity and distillation compare like with like), or a tokenizer whose vocabulary the
    student's is a cut of (after `compress prune --vocab-from`; each then reads the text with its
    own tokenizer).

    Raises:
        ConfigError: the two models do not match, or one has no tokenizer.
    """
    s, t = student.geometry, teacher.geometry
    if student.config.model_type != teacher.config.model_type:
        raise ConfigError(f"the teacher is a {teacher.config.model_type} model, the student a {student.config.model_type}")
    if s.hidden_size != t.hidden_size or s.num_layers > t.num_layers:
        raise ConfigError(
            f"the teacher ({t.num_layers} layers, hidden {t.hidden_size}) does not match the student "
            f"({s.num_layers} layers, hidden {s.hidden_size})"
        )
    if student.tokenizer is None or teacher.tokenizer is None:
        raise ConfigError("both student and teacher need a tokenizer")
    own, theirs = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    if own == theirs:
        return
    missing = [tok for tok in own if tok not in theirs]
    if missing:
        raise ConfigError(f"the student's vocabulary is not a cut of the teacher's: {len(missing):,} of its tokens "
                          f"(e.g. {missing[0]!r}) are not in the teacher's; distil from the model it was made from")


def teacher_ids(student_tokenizer, teacher_tokenizer, device: str = "cpu") -> torch.Tensor | None:
    """The teacher's id of each student token id (``None`` when the two vocabularies are the same)."""
    own, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if own == theirs:
        return None
    table = torch.zeros(max(own.values()) + 1, dtype=torch.long)
    for token, i in own.items():
        table[i] = theirs.get(token, -1)  # -1: no such teacher token (the row then differs)
    return table.to(device)


def same_tokens(ids, mask, t_ids, t_mask, table: torch.Tensor) -> torch.Tensor:
    """Per text: whether the student's tokens, in teacher ids, are the teacher's tokens (whatever
    the padding side)."""
    real, t_real = mask.bool(), t_mask.bool()
    return torch.tensor([bool(real[r].sum() == t_real[r].sum()) and torch.equal(table[ids[r][real[r]]], t_ids[r][t_real[r]])
                         for r in range(len(ids))], device=ids.device)


class Reference:
    """The original model's outputs on ``texts``, batch by batch, taken before a stage changes
    the model in place: what `compare` measures the changed model against, instead of a copy
    of the model (which a 1-8 B model has no memory for).

    Per batch: the original's tokens, its hidden states at real tokens (one per layer, in the
    model's dtype), its pooled embedding and, with a language-model head, its logits at real
    tokens (in the model's dtype). Batches stay in memory up to `MEMORY_BYTES` in all; the
    rest go to a temporary folder, removed by `close` (or leaving a ``with`` block).
    """

    #: Outputs kept in memory before the rest go to disk (a 1.7 B model's logits are 100 KB a token).
    MEMORY_BYTES = 256 * 2**20

    def __init__(self, original, texts: list[str], *, batch_size: int = 16, max_length: int = 128,
                 device: str = "cpu"):
        self.texts, self.batch_size, self.max_length, self.device = texts, batch_size, max_length, device
        self.tokenizer, self.pooling = original.tokenizer, original.pooling
        self.has_lm_head = _has_lm_head(original.model)
        self._batches: list = []  # a dict of tensors, or the path it was saved to
        self._spill: tempfile.TemporaryDirectory | None = None
        size = 0
        home = next(original.model.parameters()).device  # the model goes back there: the stage works on it
        model = original.model.to(device).eval()
        count = -(-len(texts) // batch_size)
        with torch.no_grad(), Progress("the original's outputs", count, "batches") as progress:
            for k, enc in enumerate(batches(self.tokenizer, texts, batch_size, max_length, device)):
                out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
                real = enc["attention_mask"].bool()
                batch = {"input_ids": enc["input_ids"].cpu(), "attention_mask": enc["attention_mask"].cpu(),
                         # per-layer hidden states (index 0 is the embedding output; layers start at 1)
                         "hidden": torch.stack(out.hidden_states[1:])[:, real].cpu(),
                         "embedding": pool(out.hidden_states[-1], enc["attention_mask"], self.pooling).float().cpu()}
                if self.has_lm_head:
                    batch["logits"] = out.logits[real].cpu()
                del out
                size += sum(t.numel() * t.element_size() for t in batch.values())
                if size > self.MEMORY_BYTES:
                    if self._spill is None:
                        self._spill = tempfile.TemporaryDirectory(prefix="compress-reference-")
                    path = f"{self._spill.name}/{k}.pt"
                    try:
                        torch.save(batch, path)
                    except (OSError, RuntimeError) as e:  # a full temporary folder
                        self.close()
                        raise CompressError(f"could not keep the original's outputs for the fidelity check in "
                                            f"{tempfile.gettempdir()}: {first_line(e)}; free space there (or set "
                                            "TMPDIR), or leave the check out (--no-fidelity)") from None
                    batch = path
                self._batches.append(batch)
                progress.update()
        model.to(home)

    def __iter__(self):
        for batch in self._batches:
            yield torch.load(batch) if isinstance(batch, str) else batch

    def close(self) -> None:
        self._batches = []
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _has_lm_head(model) -> bool:
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


@torch.no_grad()
def fidelity(compressed, original, texts: list[str], *, batch_size: int = 16, max_length: int = 128,
             device: str = "cpu") -> dict:
    """Compare ``compressed`` with ``original`` (both `LoadedModel`) on ``texts`` (see `compare`)."""
    with Reference(original, texts, batch_size=batch_size, max_length=max_length, device=device) as reference:
        return compare(compressed, reference)


@torch.no_grad()
def compare(compressed, reference: Reference) -> dict:
    """Compare ``compressed`` (a `LoadedModel`) with the original's outputs in ``reference``.

    Returns:
        ``{"embedding_cosine", "next_token_kl" (LM heads with the same vocabulary only),
        "hidden_state_error": [per layer] (``None`` when the layer counts or tokens differ),
        "num_texts", "num_tokens"}``.
    """
    # Each model reads the text with its own tokenizer (a vocabulary-pruned model has new ids).
    # Token-level comparisons need the same tokens; layer-wise ones the same number of layers.
    device = reference.device
    student_tokenizer = compressed.tokenizer or reference.tokenizer
    table = teacher_ids(student_tokenizer, reference.tokenizer, device)  # None: the same vocabulary
    has_lm_head = reference.has_lm_head and _has_lm_head(compressed.model)
    cos_sum, kl_sum, tokens = 0.0, 0.0, 0
    err_num: torch.Tensor | None = None
    err_den: torch.Tensor | None = None
    token_level = layer_wise = True
    model = compressed.model.to(device).eval()
    stream = batches(student_tokenizer, reference.texts, reference.batch_size, reference.max_length, device)
    progress = Progress("fidelity", -(-len(reference.texts) // reference.batch_size), "batches")
    for ref, enc_s in zip(reference, stream):
        ref = {k: v.to(device) for k, v in ref.items()}
        out = model(input_ids=enc_s["input_ids"], attention_mask=enc_s["attention_mask"], output_hidden_states=True)
        mask = ref["attention_mask"]
        alike = mask.shape == enc_s["attention_mask"].shape and bool((mask == enc_s["attention_mask"]).all())
        if alike and table is not None:  # the same length is not the same tokens (a cut maps words to [UNK])
            alike = bool(same_tokens(enc_s["input_ids"], enc_s["attention_mask"], ref["input_ids"], mask, table).all())
        token_level &= alike
        layer_wise &= alike and len(out.hidden_states) - 1 == len(ref["hidden"])
        real = mask.bool()
        if layer_wise:
            h_t = ref["hidden"]  # (layers, tokens, hidden)
            h_s = torch.stack(out.hidden_states[1:])[:, real]
            num = ((h_s.float() - h_t.float()) ** 2).sum((1, 2))
            den = (h_t.float() ** 2).sum((1, 2))
            err_num = num if err_num is None else err_num + num
            err_den = den if err_den is None else err_den + den
        emb_s = pool(out.hidden_states[-1], enc_s["attention_mask"], reference.pooling)
        cos_sum += float(F.cosine_similarity(emb_s.float(), ref["embedding"], dim=-1).sum())
        if has_lm_head and token_level and table is None and out.logits[real].shape == ref["logits"].shape:
            logp_t = F.log_softmax(ref["logits"].float(), dim=-1)
            logp_s = F.log_softmax(out.logits[real].float(), dim=-1)
            kl_sum += float(F.kl_div(logp_s, logp_t, log_target=True, reduction="sum"))
        else:
            has_lm_head = False
        tokens += int(real.sum())
        progress.update()
    progress.close()
    texts = reference.texts
    result = {
        "num_texts": len(texts),
        "num_tokens": tokens,
        "embedding_cosine": cos_sum / len(texts),
        "hidden_state_error": (err_num / err_den.clamp(min=1e-12)).sqrt().tolist() if layer_wise else None,
    }
    if has_lm_head:
        result["next_token_kl"] = kl_sum / max(tokens, 1)
    return result
