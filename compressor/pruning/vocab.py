"""Vocabulary pruning: keep only the tokens a domain's text uses.

A small encoder spends much of its size on the word embeddings (all-MiniLM-L6-v2: 30522 x 384,
about half of its 22.7M parameters), and a domain deployment reads only a fraction of those
tokens. `prune_vocabulary` tokenizes the domain text, keeps the tokens it uses plus every
special and added token, gathers those rows of the embedding (and of an untied LM head and its
bias; a tied head follows the embedding), and rewrites the fast tokenizer so that it gives the
domain text exactly the same tokens as before, under new, contiguous ids. The model's outputs
on that text are unchanged: the same vectors enter the same layers.

What must be kept for the tokenizer to reproduce its segmentation depends on its model:

* ``WordLevel``: the tokens used; nothing else.
* ``WordPiece``: the tokens used. Greedy longest-match can only pick a kept piece where it
  picked it before, since any longer kept piece was in the old vocabulary too.
* ``BPE``: the tokens used, every token a merge producing a kept token starts from (closed
  recursively down to the characters), and the merges whose two parts and result are all
  kept, in their old order. A word then merges exactly as before: every merge it made is
  still there and at the same relative rank, and no new merge can win. Byte-level BPE
  (GPT-2, Llama 3, Qwen2) always keeps its 256 byte tokens, and BPE or Unigram with byte
  fallback (Llama 2, Mistral) its 256 ``<0xNN>`` tokens, so any text still encodes.
* ``Unigram`` (SentencePiece: XLM-R, CamemBERT, T5): the pieces used and the lowest-scoring
  piece, from which the library measures the unknown-character score (lowest score - 10).
  Every path of the new lattice was a path of the old one, or one with an unknown-character
  node where a dropped single-character piece scored higher, so the old best path still
  wins; with the lowest piece gone the unknown score would rise and could win instead.

Text outside the domain still tokenizes, with what is kept: WordPiece splits a word into the
kept pieces and maps a word it cannot split to ``[UNK]`` (as it did before for words outside
its vocabulary); BPE falls back to shorter pieces, down to bytes for byte-level BPE and to the
unknown token otherwise; Unigram to the kept pieces, and the unknown token for characters no
kept piece covers. So the model still runs on any text, but reads new words less well than
the full model did.

With ``min_count > 1`` tokens the data uses fewer times are dropped too, and the texts that
held them tokenize differently (the result counts them); with the default ``min_count=1``
the tokenization of the domain text is checked to be identical, and a tokenizer for which it
would not be raises before anything is changed.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import check_int
from ..errors import ConfigError, DataError, UnsupportedModelError

if TYPE_CHECKING:
    from ..models import LoadedModel

#: Tokenizer models (``tokenizer.json`` ``model.type``) this module knows how to prune.
TOKENIZER_MODELS = ("WordLevel", "WordPiece", "BPE", "Unigram")


def prune_vocabulary(loaded: LoadedModel, texts: list[str], *, min_count: int = 1) -> dict[str, Any]:
    """Shrink the model's vocabulary, in place, to the tokens ``texts`` use plus all special tokens.

    The input embedding keeps the rows of the kept tokens (in their old order, so the new ids
    are the ranks of the old ones); an untied LM head and its bias keep the same rows, a tied
    head stays tied; ``config.vocab_size`` and every ``*_token_id`` in the config and the
    generation config are updated. ``loaded.tokenizer`` is replaced by a tokenizer of the same
    class that encodes ``texts`` to the same tokens under the new ids (see the module notes
    for what each tokenizer model keeps beyond the tokens used). Layers, and any sharing
    between them, are untouched. The result saves with `compressor.sharing.save_checkpoint`.

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
        use), ``kept_for_tokenizer`` (tokens kept only so the tokenizer works: BPE merge
        parts, bytes, Unigram's lowest-scoring piece); ``texts_tokenized_differently`` (0 with
        ``min_count=1``); ``config_ids_dropped`` (config token ids that name no token).

    Raises:
        DataError: ``texts`` is empty or holds no text.
        UnsupportedModelError: no tokenizer, a slow (Python) tokenizer, a tokenizer model or
            post-processor this module does not know, or one whose pruned form would tokenize
            ``texts`` differently.
        ConfigError: ``min_count`` is not an integer of at least 1.
    """
    import torch

    from ..models import unique_parameters

    check_int("min_count", min_count, 1)
    texts = _check_texts(texts)
    tok = _check_tokenizer(loaded)
    model = loaded.model
    emb = model.get_input_embeddings()
    rows_before = emb.num_embeddings
    params_before, _ = unique_parameters(model)

    # --- what the text uses -------------------------------------------------------------------
    # transformers turns off any truncation/padding stored in tokenizer.json for these calls
    plain = tok(texts, add_special_tokens=False, verbose=False)
    counts = Counter(i for ids in plain["input_ids"] for i in ids)
    before = tok(texts, add_special_tokens=True, verbose=False)["input_ids"]
    state = json.loads(tok.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if kind not in TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"cannot prune the vocabulary of a {kind} tokenizer; supported: {', '.join(TOKENIZER_MODELS)}"
        )

    vocab = tok.get_vocab()  # token -> id, added tokens included
    token_ids = set(vocab.values())
    from_data = {i for i, c in counts.items() if c >= min_count}
    if not from_data:  # only the special tokens would be left: every word would read as [UNK]
        raise ConfigError(f"--vocab-min-count {min_count} keeps none of the data's tokens (the most used one "
                          f"appears {max(counts.values(), default=0)} times)", option="vocab_min_count")
    special = _special_ids(tok, state, vocab)
    config_ids = {i for i in _config_token_ids(model) if i in token_ids}
    if emb.padding_idx is not None and emb.padding_idx in token_ids:
        config_ids.add(emb.padding_idx)
    special |= config_ids
    for_tokenizer = _tokenizer_needs(state["model"], state.get("pre_tokenizer"), from_data | special)
    keep = sorted(from_data | special | for_tokenizer)
    old_to_new = {old: new for new, old in enumerate(keep)}

    # --- the tokenizer: rebuilt and checked before the model is touched ---------------------
    new_tok = _rebuild_tokenizer(tok, state, old_to_new)
    expected = {t: old_to_new[i] for t, i in vocab.items() if i in old_to_new}
    if new_tok.get_vocab() != expected:
        raise UnsupportedModelError(
            f"the pruned {type(tok).__name__} does not number its tokens as planned "
            "(added tokens interleaved with the model vocabulary?); nothing was changed"
        )
    after = new_tok(texts, add_special_tokens=True, verbose=False)["input_ids"]
    changed = [n for n, (a, b) in enumerate(zip(before, after)) if [old_to_new.get(i, -1) for i in a] != b]
    if changed and min_count == 1:  # a bug or a tokenizer this module misjudges: fail, do not degrade
        raise UnsupportedModelError(
            f"the pruned {kind} tokenizer would tokenize {len(changed)} of the texts differently "
            f"(first: text {changed[0]}); nothing was changed"
        )

    # --- the model ----------------------------------------------------------------------------
    _check_position_padding(model, old_to_new)
    rows = [i for i in keep if i < rows_before]  # tokens past the embedding (if any) stay rowless
    emb_params_before = sum(p.numel() for p in _vocab_parameters(model))
    _shrink_embeddings(model, torch.tensor(rows, dtype=torch.long), old_to_new)
    dropped = _remap_config_ids(model, old_to_new)
    loaded.tokenizer = new_tok

    params_after, _ = unique_parameters(model)
    total = sum(counts.values())
    return {
        "tokenizer_model": kind,
        "vocab_before": rows_before,
        "vocab_after": len(rows),
        "tokenizer_size_before": len(tok),
        "tokenizer_size_after": len(new_tok),
        "params_before": params_before,
        "params_after": params_after,
        "params_removed": params_before - params_after,
        "embedding_params_before": emb_params_before,
        "embedding_params_after": sum(p.numel() for p in _vocab_parameters(model)),
        "kept_fraction": len(rows) / rows_before,
        "coverage": sum(c for i, c in counts.items() if i in old_to_new) / total if total else 1.0,
        "texts": len(texts),
        "data_tokens": total,
        "distinct_tokens": len(counts),
        "kept_from_data": len(from_data),
        "kept_special": len(special - from_data),
        "kept_for_tokenizer": len(for_tokenizer - from_data - special),
        "min_count": min_count,
        "texts_tokenized_differently": len(changed),
        "config_ids_dropped": dropped,
    }


# --- checks ------------------------------------------------------------------------------------
def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise DataError("texts must be a list of strings, not one string")
    texts = list(texts or [])
    if not all(isinstance(t, str) for t in texts):
        raise DataError("texts must be strings")
    if not any(t.strip() for t in texts):
        raise DataError("no text to prune the vocabulary on: the texts are empty")
    return texts


def _check_tokenizer(loaded):
    tok = loaded.tokenizer
    if tok is None:
        raise UnsupportedModelError(f"{loaded.name or 'the model'} has no tokenizer; vocabulary pruning needs one")
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise UnsupportedModelError(
            f"vocabulary pruning needs a fast (tokenizers-backed) tokenizer; {type(tok).__name__} is not one"
        )
    return tok


# --- which tokens to keep ----------------------------------------------------------------------
def _special_ids(tok, state: dict, vocab: dict[str, int]) -> set[int]:
    """Special and added tokens, the tokens the post-processor inserts, and the padding token."""
    ids = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    ids |= _post_processor_ids(state.get("post_processor"))
    padding = state.get("padding")
    if padding and padding.get("pad_token") in vocab:
        ids.add(vocab[padding["pad_token"]])
    return {i for i in ids if i is not None}


def _post_processor_ids(pp: dict | None) -> set[int]:
    return set(_remap_post_processor(pp, None)[1]) if pp else set()


def _config_token_ids(model) -> set[int]:
    ids: set[int] = set()
    for cfg in _configs(model):
        for key, value in cfg.to_dict().items():
            if key.endswith("_token_id"):
                ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return ids


def _configs(model, *, generation: bool = True) -> list:
    """The model's config, its text config (if another object) and its generation config."""
    cfgs = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text is not model.config:
        cfgs.append(text)
    if generation and getattr(model, "generation_config", None) is not None:
        cfgs.append(model.generation_config)
    return cfgs


def _tokenizer_needs(model_state: dict, pre_tokenizer: dict | None, kept: set[int]) -> set[int]:
    """Ids the tokenizer model needs beyond ``kept`` to segment the text as before (module notes)."""
    kind = model_state["type"]
    if kind in ("WordLevel", "WordPiece"):
        return set()
    if kind == "Unigram":
        pieces = [p for p, _ in model_state["vocab"]]
        scores = [s for _, s in model_state["vocab"]]
        need = {min(range(len(scores)), key=scores.__getitem__)}  # the unknown score is min score - 10
        if model_state.get("byte_fallback"):
            need |= {i for i, p in enumerate(pieces) if _is_byte_piece(p)}
        return need
    # BPE
    vocab: dict[str, int] = model_state["vocab"]
    if _is_byte_level(pre_tokenizer):
        from tokenizers.pre_tokenizers import ByteLevel

        kept = kept | {vocab[c] for c in ByteLevel.alphabet() if c in vocab}
    if model_state.get("byte_fallback"):
        kept = kept | {i for p, i in vocab.items() if _is_byte_piece(p)}
    # close downward: the parts of every merge producing a kept token are kept too
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in _merges(model_state):
        producers.setdefault(_merged(a, b, model_state), []).append((a, b))
    id_to_token = {i: t for t, i in vocab.items()}
    todo = [id_to_token[i] for i in kept if i in id_to_token]
    closed = set(todo)
    while todo:
        for pair in producers.get(todo.pop(), ()):
            for part in pair:
                if part not in closed:
                    closed.add(part)
                    todo.append(part)
    return {vocab[t] for t in closed} | kept


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _is_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return True
    return any(_is_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []) or [])


def _merges(model_state: dict) -> list[tuple[str, str]]:
    """BPE merges as pairs (tokenizer.json holds ``[a, b]`` lists, or ``"a b"`` strings before 0.20)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model_state.get("merges", [])]


def _merged(a: str, b: str, model_state: dict) -> str:
    """The token a merge makes; as the tokenizers library builds it, the right part's prefix goes."""
    prefix = model_state.get("continuing_subword_prefix") or ""
    return a + b[len(prefix):]


# --- the tokenizer -----------------------------------------------------------------------------
def _rebuild_tokenizer(tok, state: dict, old_to_new: dict[int, int]):
    """A tokenizer of ``tok``'s class over the kept tokens, numbered by ``old_to_new``.

    It goes through ``save_pretrained`` and ``from_pretrained``, the path a checkpoint takes,
    so the class's own settings (special tokens, ``add_prefix_space``, chat template...) carry
    over and what the pruned model is used with is what it reloads with.
    """
    from tokenizers import Tokenizer

    state = json.loads(json.dumps(state))  # a copy
    id_to_token = {i: t for t, i in tok.get_vocab().items()}
    model_state = state["model"]
    if model_state["type"] == "Unigram":
        model_state["vocab"] = [v for i, v in enumerate(model_state["vocab"]) if i in old_to_new]
        if model_state.get("unk_id") is not None:
            model_state["unk_id"] = old_to_new[model_state["unk_id"]]
    else:
        model_state["vocab"] = {t: old_to_new[i] for t, i in model_state["vocab"].items() if i in old_to_new}
    if model_state["type"] == "BPE":
        kept = model_state["vocab"]
        strings = any(isinstance(m, str) for m in model_state.get("merges", []))
        merges = [(a, b) for a, b in _merges(model_state)
                  if a in kept and b in kept and _merged(a, b, model_state) in kept]
        model_state["merges"] = [f"{a} {b}" for a, b in merges] if strings else [[a, b] for a, b in merges]
    # the library renumbers added tokens missing from the model vocabulary after it, in order
    state["added_tokens"] = [dict(t, id=old_to_new[t["id"]]) for t in state.get("added_tokens", [])]
    state["post_processor"] = _remap_post_processor(state.get("post_processor"), old_to_new)[0]
    if state.get("padding"):
        pad = tok.get_vocab().get(state["padding"].get("pad_token"))
        if pad is not None:
            state["padding"]["pad_id"] = old_to_new[pad]
    backend = Tokenizer.from_str(json.dumps(state))  # fails here on a broken state, not later

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tok.save_pretrained(folder)
        for name, filename in tok.vocab_files_names.items():  # the slow tokenizer's files are stale
            if name != "tokenizer_file":
                (folder / filename).unlink(missing_ok=True)
        backend.save(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {
                str(old_to_new[int(i)]): entry for i, entry in config["added_tokens_decoder"].items()
                if int(i) in old_to_new and id_to_token.get(int(i)) == entry.get("content")
            }
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        new_tok = type(tok).from_pretrained(folder)
    new_tok.name_or_path = new_tok.init_kwargs["name_or_path"] = tok.name_or_path  # not the temporary folder
    return new_tok


def _remap_post_processor(pp: dict | None, old_to_new: dict[int, int] | None) -> tuple[dict | None, list[int]]:
    """``(post-processor with its token ids remapped, the old ids it holds)``.

    With ``old_to_new=None`` only collects the ids.
    """
    if pp is None:
        return None, []
    kind = pp.get("type")
    new = (lambda i: i) if old_to_new is None else old_to_new.__getitem__
    pp = dict(pp)
    if kind == "TemplateProcessing":
        found = []
        specials = {}
        for name, entry in pp.get("special_tokens", {}).items():
            found += entry["ids"]
            specials[name] = dict(entry, ids=[new(i) for i in entry["ids"]])
        pp["special_tokens"] = specials
        return pp, found
    if kind in ("BertProcessing", "RobertaProcessing"):
        found = [pp["sep"][1], pp["cls"][1]]
        pp["sep"] = [pp["sep"][0], new(pp["sep"][1])]
        pp["cls"] = [pp["cls"][0], new(pp["cls"][1])]
        return pp, found
    if kind == "Sequence":
        found = []
        processors = []
        for sub in pp.get("processors", []):
            remapped, ids = _remap_post_processor(sub, old_to_new)
            processors.append(remapped)
            found += ids
        pp["processors"] = processors
        return pp, found
    if kind == "ByteLevel":
        return pp, []
    raise UnsupportedModelError(f"cannot prune a tokenizer with a {kind} post-processor")


# --- the model ---------------------------------------------------------------------------------
def _vocab_parameters(model) -> list:
    """The input embedding's weight and, if not tied to it, the LM head's weight and bias."""
    emb = model.get_input_embeddings()
    params = [emb.weight]
    out = model.get_output_embeddings()
    if out is not None:
        if out.weight is not emb.weight:
            params.append(out.weight)
        if getattr(out, "bias", None) is not None:
            params.append(out.bias)
    return params


def _check_position_padding(model, old_to_new: dict[int, int]) -> None:
    """RoBERTa-style models count position ids from the padding id; it must not move."""
    emb = model.get_input_embeddings()
    pad = emb.padding_idx
    if pad is None or old_to_new.get(pad) == pad:
        return
    for name, module in model.named_modules():
        if module is not emb and getattr(module, "padding_idx", None) == pad:
            raise UnsupportedModelError(
                f"{name} counts positions from the padding id {pad}, which pruning would renumber "
                f"to {old_to_new.get(pad)}; not pruned"
            )


def _shrink_embeddings(model, rows, old_to_new: dict[int, int]) -> None:
    """Keep ``rows`` of the input embedding and the LM head, in place.

    Parameters are changed through ``.data``, so every alias (a tied head, a bias the head
    shares with its parent module) keeps pointing at the same, now smaller, tensor.
    """
    import torch

    emb = model.get_input_embeddings()
    old_rows = emb.num_embeddings
    out = model.get_output_embeddings()
    if out is not None and out.weight.shape[0] != old_rows:
        raise UnsupportedModelError(
            f"the LM head has {out.weight.shape[0]} rows and the embedding {old_rows}; cannot prune them together"
        )
    k = len(rows)
    with torch.no_grad():
        emb.weight.data = emb.weight.data.index_select(0, rows)
        emb.num_embeddings = k
        if emb.padding_idx is not None:
            emb.padding_idx = old_to_new.get(emb.padding_idx)
        if out is not None:
            if out.weight is not emb.weight:
                out.weight.data = out.weight.data.index_select(0, rows)
            if getattr(out, "bias", None) is not None:
                out.bias.data = out.bias.data.index_select(0, rows)
            if hasattr(out, "out_features"):
                out.out_features = k
    for cfg in _configs(model, generation=False):
        cfg.vocab_size = k
    for module in {id(m): m for m in (model, getattr(model, "base_model", model))}.values():
        if isinstance(getattr(module, "vocab_size", None), int):  # Llama keeps a copy of it
            module.vocab_size = k


def _remap_config_ids(model, old_to_new: dict[int, int]) -> list[str]:
    """Renumber every ``*_token_id`` of the configs; ids that name no kept token become ``None``.

    Returns the ``key=id`` entries that were dropped.
    """
    dropped = []
    for cfg in _configs(model):
        for key, value in cfg.to_dict().items():
            if not key.endswith("_token_id") or value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) for v in values):
                continue
            mapped = [old_to_new.get(v) for v in values]
            dropped += [f"{key}={v}" for v, m in zip(values, mapped) if m is None]
            mapped = [m for m in mapped if m is not None]
            if isinstance(value, list):
                setattr(cfg, key, mapped)
            else:
                setattr(cfg, key, mapped[0] if mapped else None)
    return sorted(set(dropped))
