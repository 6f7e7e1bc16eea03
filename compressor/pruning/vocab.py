"""Vocabulary pruning: keep only the tokens a domain's text uses.

A small encoder spends much of its size on the word embeddings (all-MiniLM-L6-v2: 30522 x 384,
about half of its 22.7M parameters), and a domain deployment reads only a fraction of those
tokens. `prune_vocabulary` tokenizes the domain text, keeps the tokens it uses plus every
special and added token, gathers those rows of the embedding (and of an untied LM head and its
bias; a tied head follows the embedding), and rewrites the fast tokenizer so that it gives the
domain text exactly the same tokens as before, under new, contiguous ids. The model's outputs
on that text are unchanged: the same vectors enter the same layers.

The two surgeries live beside this module: `compressor.pruning.tokenizer_surgery` (what each
tokenizer model must keep to segment as before, and the rewritten tokenizer) and
`compressor.pruning.embedding_surgery` (the embedding and LM head rows, and the config).

Text outside the domain still tokenizes, with the kept tokens (down to bytes or the unknown
token), so the model still runs on any text, but reads new words less well than the full
model did.

With ``min_count > 1`` tokens the data uses fewer times are dropped too, and the texts that
held them tokenize differently (the result counts them); with the default ``min_count=1``
the tokenization of the domain text is checked to be identical, and a tokenizer for which it
would not be raises before anything is changed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import check_int
from ..errors import ConfigError, DataError, UnsupportedModelError
from .embedding_surgery import model_token_ids, remap_config_ids, shrink_embeddings, vocab_parameter_count
from .tokenizer_surgery import (
    TOKENIZER_MODELS,
    check_tokenizer,
    rebuild_tokenizer,
    retokenized,
    special_ids,
    tokenizer_needs,
    tokenizer_state,
)

if TYPE_CHECKING:
    from ..models import LoadedModel

__all__ = ["TOKENIZER_MODELS", "VocabularyPlan", "prune_vocabulary"]


def prune_vocabulary(loaded: LoadedModel, texts: list[str], *, min_count: int = 1) -> dict[str, Any]:
    """Shrink the model's vocabulary, in place, to the tokens ``texts`` use plus all special tokens.

    The input embedding keeps the rows of the kept tokens (in their old order, so the new ids
    are the ranks of the old ones); an untied LM head and its bias keep the same rows, a tied
    head stays tied; ``config.vocab_size`` and every ``*_token_id`` in the config and the
    generation config are updated. ``loaded.tokenizer`` is replaced by a tokenizer of the same
    class that encodes ``texts`` to the same tokens under the new ids (see
    `compressor.pruning.tokenizer_surgery` for what each tokenizer model keeps beyond the
    tokens used). Layers, and any sharing between them, are untouched. The result saves with
    `compressor.models.checkpoint.save_checkpoint`.

    Args:
        loaded: A model with a fast (``tokenizers``-backed) tokenizer.
        texts: The domain text.
        min_count: Keep a token only if the text uses it at least this often (special tokens
            are always kept). Above 1, texts holding a dropped token tokenize differently.

    Returns:
        Metrics: ``tokenizer_model``; ``vocab_before``/``vocab_after`` (embedding rows);
        ``tokenizer_size_before``/``_after``; ``params_before``/``params_after``/
        ``params_removed`` (unique parameters) and ``embedding_params_before``/``_after``;
        ``kept_fraction`` (rows after / rows before); ``coverage`` (share of the text's token
        occurrences whose token is kept; 1.0 with ``min_count=1``); ``texts``,
        ``data_tokens`` (occurrences), ``distinct_tokens`` (distinct ids the text uses),
        ``kept_from_data``, ``kept_special`` (special/added/config tokens the text does not
        use), ``kept_for_tokenizer`` (tokens kept only so the tokenizer works: WordPiece's
        alphabet, BPE merge parts, bytes, Unigram's lowest-scoring piece);
        ``texts_tokenized_differently`` (0 with ``min_count=1``); ``config_ids_dropped``
        (config token ids that name no token).

    Raises:
        DataError: ``texts`` is empty or holds no text.
        UnsupportedModelError: no tokenizer, a slow (Python) tokenizer, a tokenizer model or
            post-processor this module does not know, or one whose pruned form would tokenize
            ``texts`` differently.
        ConfigError: ``min_count`` is not an integer of at least 1.
    """
    check_int("min_count", min_count, 1)
    texts = _check_texts(texts)
    tok = check_tokenizer(loaded)
    before = _ModelSize.of(loaded.model)
    plan = _plan(tok, loaded.model, texts, min_count)

    # the tokenizer: rebuilt and checked before the model is touched
    new_tok = rebuild_tokenizer(tok, plan.state, plan.old_to_new)
    changed = retokenized(texts, plan.encoded, new_tok, plan.old_to_new)
    if changed and min_count == 1:  # a bug or a tokenizer this module misjudges: fail, do not degrade
        raise UnsupportedModelError(
            f"the pruned {plan.kind} tokenizer would tokenize {len(changed)} of the texts differently "
            f"(first: text {changed[0]}); nothing was changed"
        )

    # the model
    shrink_embeddings(loaded.model, plan.ids, plan.old_to_new)
    dropped = remap_config_ids(loaded.model, plan.old_to_new)
    loaded.tokenizer = new_tok
    return _metrics(plan, texts, changed, dropped, tok=tok, new_tok=new_tok, before=before,
                    after=_ModelSize.of(loaded.model))


@dataclass
class VocabularyPlan:
    """What vocabulary pruning keeps, and why, worked out before anything changes (old ids)."""

    #: The tokenizer's ``tokenizer.json`` state (read after the text was tokenized).
    state: dict
    #: Occurrences of each id in the text, without special tokens.
    counts: Counter
    #: Each text's ids with special tokens, as the old tokenizer gives them.
    encoded: list[list[int]]
    min_count: int
    #: Tokens the text uses at least ``min_count`` times.
    from_data: set[int]
    #: Special and added tokens, the post-processor's and padding tokens, and the model's config ids.
    special: set[int]
    #: Tokens the tokenizer model needs to segment as before (`tokenizer_needs`).
    for_tokenizer: set[int]
    #: All kept ids, ascending: new id ``n`` is old id ``ids[n]``.
    ids: list[int] = field(init=False)
    #: Old id -> new id.
    old_to_new: dict[int, int] = field(init=False)

    def __post_init__(self):
        self.ids = sorted(self.from_data | self.special | self.for_tokenizer)
        self.old_to_new = {old: new for new, old in enumerate(self.ids)}

    @property
    def kind(self) -> str:
        """The tokenizer model (``WordPiece``, ``BPE``...)."""
        return self.state["model"]["type"]


def _plan(tok, model, texts: list[str], min_count: int) -> VocabularyPlan:
    """The tokens to keep: those the text uses, the special ones, and what the tokenizer needs."""
    # transformers turns off any truncation/padding stored in tokenizer.json for these calls
    # (and leaves it off), so the state is read after them
    plain = tok(texts, add_special_tokens=False, verbose=False)
    counts = Counter(i for ids in plain["input_ids"] for i in ids)
    encoded = tok(texts, add_special_tokens=True, verbose=False)["input_ids"]
    state = tokenizer_state(tok)
    vocab = tok.get_vocab()  # token -> id, added tokens included
    from_data = {i for i, c in counts.items() if c >= min_count}
    if not from_data:  # only the special tokens would be left: every word would read as [UNK]
        raise ConfigError(f"--vocab-min-count {min_count} keeps none of the data's tokens (the most used one "
                          f"appears {max(counts.values(), default=0)} times)", option="vocab_min_count")
    special = special_ids(tok, state, vocab)
    token_ids = set(vocab.values())
    special |= {i for i in model_token_ids(model) if i in token_ids}
    unknown_texts = [t for t, ids in zip(texts, plain["input_ids"]) if tok.unk_token_id in ids]
    for_tokenizer = tokenizer_needs(tok, state, from_data | special, special, unknown_texts)
    return VocabularyPlan(state, counts, encoded, min_count, from_data, special, for_tokenizer)


@dataclass(frozen=True)
class _ModelSize:
    rows: int  # of the input embedding
    params: int  # unique parameters
    embedding_params: int  # of the embedding and an untied LM head

    @classmethod
    def of(cls, model) -> _ModelSize:
        from ..models import unique_parameters

        return cls(model.get_input_embeddings().num_embeddings, unique_parameters(model)[0],
                   vocab_parameter_count(model))


def _metrics(plan: VocabularyPlan, texts: list[str], changed: list[int], dropped: list[str], *, tok, new_tok,
             before: _ModelSize, after: _ModelSize) -> dict[str, Any]:
    """The result `prune_vocabulary` documents."""
    total = sum(plan.counts.values())
    return {
        "tokenizer_model": plan.kind,
        "vocab_before": before.rows,
        "vocab_after": after.rows,
        "tokenizer_size_before": len(tok),
        "tokenizer_size_after": len(new_tok),
        "params_before": before.params,
        "params_after": after.params,
        "params_removed": before.params - after.params,
        "embedding_params_before": before.embedding_params,
        "embedding_params_after": after.embedding_params,
        "kept_fraction": after.rows / before.rows,
        "coverage": sum(c for i, c in plan.counts.items() if i in plan.old_to_new) / total if total else 1.0,
        "texts": len(texts),
        "data_tokens": total,
        "distinct_tokens": len(plan.counts),
        "kept_from_data": len(plan.from_data),
        "kept_special": len(plan.special - plan.from_data),
        "kept_for_tokenizer": len(plan.for_tokenizer - plan.from_data - plan.special),
        "min_count": plan.min_count,
        "texts_tokenized_differently": len(changed),
        "config_ids_dropped": dropped,
    }


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise DataError("texts must be a list of strings, not one string")
    texts = list(texts or [])
    if not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be strings")
    if not any(t.strip() for t in texts):
        raise DataError("no text to prune the vocabulary on: the texts are empty")
    return texts
