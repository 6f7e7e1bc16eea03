"""Tokenizer surgery: rewrite a fast tokenizer to a subset of its tokens, renumbered.

`rebuild_tokenizer` keeps the chosen tokens under new, contiguous ids, so that the domain text
gets exactly the same tokens as before. What must be kept for the tokenizer to reproduce its
segmentation depends on its model (`tokenizer_needs`):

* ``WordLevel``: the tokens used; nothing else.
* ``WordPiece``: the tokens used; the pieces greedy longest-match took in each domain word it
  then gave up on (``[UNK]`` words); and the alphabet of the kept tokens: each character as a
  word start and as a continuation (``a`` and ``##a``). Greedy longest-match can only pick a
  kept piece where it picked it before, since any longer kept piece was in the old vocabulary
  too; in a word that split, every piece it took is kept, and in an ``[UNK]`` word the pieces
  up to where it gave up are kept, so it gives up at the same place. The alphabet then changes
  no domain word, but a word whose pieces were dropped (``min_count > 1``, or text outside
  the domain) still splits, down to its characters, instead of reading as one ``[UNK]``.
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
its vocabulary; with the alphabet kept, only words with characters the domain never used);
BPE falls back to shorter pieces, down to bytes for byte-level BPE and to the
unknown token otherwise; Unigram to the kept pieces, and the unknown token for characters no
kept piece covers.

The tokenizer is worked on as its ``tokenizer.json`` state (a dict), the library's own format.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import UnsupportedModelError

#: Tokenizer models (``tokenizer.json`` ``model.type``) this module knows how to prune.
TOKENIZER_MODELS = ("WordLevel", "WordPiece", "BPE", "Unigram")


# --- checks ------------------------------------------------------------------------------------
def check_tokenizer(loaded):
    """``loaded``'s tokenizer, if it is a fast (``tokenizers``-backed) one.

    Raises:
        UnsupportedModelError: no tokenizer, or a slow (Python) one.
    """
    tok = loaded.tokenizer
    if tok is None:
        raise UnsupportedModelError(f"{loaded.name or 'the model'} has no tokenizer; vocabulary pruning needs one")
    if not getattr(tok, "is_fast", False) or not hasattr(tok, "backend_tokenizer"):
        raise UnsupportedModelError(
            f"vocabulary pruning needs a fast (tokenizers-backed) tokenizer; {type(tok).__name__} is not one"
        )
    return tok


def tokenizer_state(tok) -> dict:
    """``tok``'s ``tokenizer.json`` state, if its tokenizer model is one of `TOKENIZER_MODELS`.

    Raises:
        UnsupportedModelError: another tokenizer model.
    """
    state = json.loads(tok.backend_tokenizer.to_str())
    kind = state["model"]["type"]
    if kind not in TOKENIZER_MODELS:
        raise UnsupportedModelError(
            f"cannot prune the vocabulary of a {kind} tokenizer; supported: {', '.join(TOKENIZER_MODELS)}"
        )
    return state


# --- which tokens to keep ----------------------------------------------------------------------
def special_ids(tok, state: dict, vocab: dict[str, int]) -> set[int]:
    """Special and added tokens, the tokens the post-processor inserts, and the padding token.

    Raises:
        UnsupportedModelError: a post-processor this module does not know.
    """
    ids = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
    ids |= _post_processor_ids(state.get("post_processor"))
    padding = state.get("padding")
    if padding and padding.get("pad_token") in vocab:
        ids.add(vocab[padding["pad_token"]])
    return {i for i in ids if i is not None}


def _post_processor_ids(pp: dict | None) -> set[int]:
    return set(_remap_post_processor(pp, None)[1]) if pp else set()


def tokenizer_needs(tok, state: dict, kept: set[int], special: set[int], unknown_texts: list[str]) -> set[int]:
    """Ids the tokenizer model needs beyond ``kept`` to segment the text as before (module notes).

    Args:
        tok: The fast tokenizer (WordPiece re-reads ``unknown_texts`` with its normalizer and
            pre-tokenizer).
        state: Its ``tokenizer.json`` state (`tokenizer_state`).
        kept: The ids kept for their own sake.
        special: The special and added ids among ``kept`` (WordPiece's alphabet leaves their
            characters out: the pre-tokenizer never hands ``[CLS]``'s ``[`` to the model).
        unknown_texts: The domain texts that hold the unknown token (WordPiece's dead ends).

    Returns:
        Ids to keep, ``kept`` included for BPE, not for the other models.
    """
    model_state = state["model"]
    kind = model_state["type"]
    if kind == "WordLevel":
        return set()
    if kind == "WordPiece":
        return _wordpiece_alphabet(model_state, kept - special) | _wordpiece_dead_ends(tok, model_state, unknown_texts)
    if kind == "Unigram":
        return _unigram_needs(model_state)
    return _bpe_needs(model_state, state.get("pre_tokenizer"), kept)


def _wordpiece_alphabet(model_state: dict, kept: set[int]) -> set[int]:
    """The single-character pieces, word-start and continuation, of every character in ``kept``.

    Without them a word with one dropped piece reads as ``[UNK]``, all of it: WordPiece gives
    up on a word it cannot split to the end. A few hundred rows buy that it never does for the
    domain's characters.
    """
    vocab: dict[str, int] = model_state["vocab"]
    prefix = model_state.get("continuing_subword_prefix", "##")
    id_to_token = {i: t for t, i in vocab.items()}
    chars = set()
    for i in kept:
        token = id_to_token.get(i)
        if token is None or token == model_state.get("unk_token"):
            continue
        chars.update(token[len(prefix):] if prefix and token.startswith(prefix) and token != prefix else token)
    return {vocab[p] for c in chars for p in (c, prefix + c) if p in vocab}


def _wordpiece_dead_ends(tok, model_state: dict, texts: list[str]) -> set[int]:
    """The pieces WordPiece took in each word of ``texts`` before giving up on it (``[UNK]``).

    Kept, they make the pruned tokenizer give up at the same place: without them a shorter
    kept piece (or the alphabet) could split a word the full vocabulary read as ``[UNK]``.
    Greedy longest-match as the tokenizers library runs it, on the words its normalizer and
    pre-tokenizer give.
    """
    backend = tok.backend_tokenizer
    vocab: dict[str, int] = model_state["vocab"]
    prefix = model_state.get("continuing_subword_prefix", "##")
    max_chars = model_state.get("max_input_chars_per_word", 100)
    words = set()
    for text in texts:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        if backend.pre_tokenizer is not None:
            words.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text))
        else:
            words.add(text)
    need: set[int] = set()
    for word in words:
        if len(word) > max_chars:  # read as [UNK] whole, before any piece is tried
            continue
        pieces, start = [], 0
        while start < len(word):
            lead = prefix if start else ""
            end = next((e for e in range(len(word), start, -1) if lead + word[start:e] in vocab), start)
            if end == start:  # a dead end: the word reads as [UNK]
                need.update(vocab[p] for p in pieces)
                break
            pieces.append(lead + word[start:end])
            start = end
    return need


def _unigram_needs(model_state: dict) -> set[int]:
    pieces = [p for p, _ in model_state["vocab"]]
    scores = [s for _, s in model_state["vocab"]]
    need = {min(range(len(scores)), key=scores.__getitem__)}  # the unknown score is min score - 10
    if model_state.get("byte_fallback"):
        need |= {i for i, p in enumerate(pieces) if _is_byte_piece(p)}
    return need


def _bpe_needs(model_state: dict, pre_tokenizer: dict | None, kept: set[int]) -> set[int]:
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
def rebuild_tokenizer(tok, state: dict, old_to_new: dict[int, int]):
    """A tokenizer of ``tok``'s class over the kept tokens, numbered by ``old_to_new``.

    It goes through ``save_pretrained`` and ``from_pretrained``, the path a checkpoint takes,
    so the class's own settings (special tokens, ``add_prefix_space``, chat template...) carry
    over and what the pruned model is used with is what it reloads with.

    Args:
        tok: The fast tokenizer; left unchanged.
        state: Its `tokenizer_state`.
        old_to_new: Old id -> new id of every kept token (new ids contiguous from 0).

    Raises:
        UnsupportedModelError: the rebuilt tokenizer does not number its tokens by ``old_to_new``.
    """
    from tokenizers import Tokenizer

    vocab = tok.get_vocab()  # token -> id, added tokens included
    backend = Tokenizer.from_str(json.dumps(_pruned_state(state, vocab, old_to_new)))  # fails here, not later
    new_tok = _reload(tok, backend, vocab, old_to_new)
    expected = {t: old_to_new[i] for t, i in vocab.items() if i in old_to_new}
    if new_tok.get_vocab() != expected:
        raise UnsupportedModelError(
            f"the pruned {type(tok).__name__} does not number its tokens as planned "
            "(added tokens interleaved with the model vocabulary?); nothing was changed"
        )
    return new_tok


def _pruned_state(state: dict, vocab: dict[str, int], old_to_new: dict[int, int]) -> dict:
    """A copy of the tokenizer state over the kept tokens: model, added tokens, post-processor, padding."""
    state = json.loads(json.dumps(state))  # a copy
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
        pad = vocab.get(state["padding"].get("pad_token"))
        if pad is not None:
            state["padding"]["pad_id"] = old_to_new[pad]
    return state


def _reload(tok, backend, vocab: dict[str, int], old_to_new: dict[int, int]):
    """``tok`` saved with ``backend`` as its ``tokenizer.json``, and loaded back as its class."""
    id_to_token = {i: t for t, i in vocab.items()}
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


# --- the check --------------------------------------------------------------------------------
def retokenized(texts: list[str], before: list[list[int]], new_tok, old_to_new: dict[int, int]) -> list[int]:
    """Indices of the ``texts`` that ``new_tok`` tokenizes other than ``before`` (old ids), renumbered."""
    after = new_tok(texts, add_special_tokens=True, verbose=False)["input_ids"]
    return [n for n, (a, b) in enumerate(zip(before, after)) if [old_to_new.get(i, -1) for i in a] != b]
