"""Vocabulary pruning keeps the domain's tokens and leaves the model's outputs on them unchanged.

Every family runs with the character-level tokenizer of `tiny_models`; each tokenizer model
(WordPiece, byte-level BPE, SentencePiece-style BPE with byte fallback, Unigram) runs with a
small tokenizer trained here on the built-in sentences and a tiny model of the family that
ships it. One test prunes the real bundled MiniLM.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import FAMILIES, make_model
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

import compressor
from compressor.adapters import get_adapter
from compressor.data import default_calibration_texts
from compressor.errors import ConfigError, DataError, UnsupportedModelError
from compressor.models import LoadedModel
from compressor.pruning.vocab import prune_vocabulary
from compressor.sharing import ShareConfig, save_checkpoint, share

TEXTS = default_calibration_texts()
DOMAIN = TEXTS[:24]  # what the vocabulary is pruned to
OTHER = TEXTS[24:] + ["Ünïcödé, emoji 😀 and CJK 漢字 are outside the domain."]


# --- tokenizers trained here, one per tokenizer model ------------------------------------------
def _wordpiece() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(
        vocab_size=400, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    ids = {t: tok.token_to_id(t) for t in ("[SEP]", "[CLS]")}
    tok.post_processor = processors.BertProcessing(("[SEP]", ids["[SEP]"]), ("[CLS]", ids["[CLS]"]))
    return transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def _byte_level(cls) -> transformers.PreTrainedTokenizerFast:
    """GPT-2 (no post-processor specials) or RoBERTa (``<s> ... </s>``) byte-level BPE."""
    roberta = cls is transformers.RobertaTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if roberta else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=1000, show_progress=False, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if not roberta:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        end = "<|endoftext|>"
        return cls(tokenizer_object=tok, bos_token=end, eos_token=end, unk_token=end)
    ids = {t: tok.token_to_id(t) for t in ("</s>", "<s>")}
    tok.post_processor = processors.RobertaProcessing(("</s>", ids["</s>"]), ("<s>", ids["<s>"]))
    return cls(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
               unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def _sentencepiece_bpe() -> transformers.PreTrainedTokenizerFast:
    """Llama-2 style: Metaspace, BPE with byte fallback, ``<0x00>``...``<0xFF>`` in the vocabulary."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=1000, show_progress=False, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)]))
    state = json.loads(tok.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in specials]  # bytes: plain pieces
    return transformers.LlamaTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)), legacy=True,
                                           bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _unigram() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.UnigramTrainer(vocab_size=400, show_progress=False, unk_token="<unk>",
                                                           special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return transformers.XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                                pad_token="<pad>", mask_token="<mask>")


#: name -> (family, tokenizer builder, config overrides that point the special ids at its tokens)
TOKENIZER_CASES = {
    "wordpiece-bert": ("bert", _wordpiece, {}),
    "bytelevel-gpt2": ("gpt2", lambda: _byte_level(transformers.GPT2TokenizerFast),
                       {"bos_token_id": 0, "eos_token_id": 0}),
    "bytelevel-roberta": ("roberta", lambda: _byte_level(transformers.RobertaTokenizerFast), {"pad_token_id": 1}),
    "bytefallback-llama": ("llama", _sentencepiece_bpe, {"pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2}),
    "unigram-xlm-roberta": ("xlm-roberta", _unigram, {"pad_token_id": 1}),
}


# --- shared checks -----------------------------------------------------------------------------
def _outputs(loaded, texts: list[str]) -> torch.Tensor:
    """Logits of a causal LM, else the last hidden state; padded batch."""
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _snapshot(loaded) -> dict:
    tok, config = loaded.tokenizer, loaded.model.config
    return {
        "outputs": _outputs(loaded, DOMAIN),
        "ids": tok(DOMAIN)["input_ids"],
        "vocab": tok.get_vocab(),
        "used": {i for ids in tok(DOMAIN, add_special_tokens=False)["input_ids"] for i in ids},
        "specials": set(tok.all_special_ids) | set(tok.added_tokens_decoder),
        "config_tokens": {k: tok.convert_ids_to_tokens(v) for k, v in config.to_dict().items()
                          if k.endswith("_token_id") and isinstance(v, int) and v < len(tok)},
        "tied": loaded.model.get_output_embeddings() is not None
        and loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight,
    }


def _alphabet(vocab: dict[str, int], kept: set[int]) -> set[int]:
    """WordPiece's single-character pieces, word-start and continuation, of the kept tokens' characters."""
    token_of = {i: t for t, i in vocab.items()}
    chars = {c for i in kept for c in token_of[i].removeprefix("##") or "#"}
    return {vocab[p] for c in chars for p in (c, "##" + c) if p in vocab}


def _check_pruned(loaded, before: dict, metrics: dict, tmp_path) -> None:
    tok, model, config = loaded.tokenizer, loaded.model, loaded.model.config
    new_vocab = tok.get_vocab()
    old_of_new = [before["vocab"][t] for t, _ in sorted(new_vocab.items(), key=lambda item: item[1])]
    to_new = {old: new for new, old in enumerate(old_of_new)}

    # the vocabulary: the tokens used, the specials, and what the tokenizer model needs
    kept = before["used"] | before["specials"]
    assert set(old_of_new) >= kept
    assert metrics["kept_from_data"] == metrics["distinct_tokens"] == len(before["used"])
    assert metrics["vocab_after"] == len(new_vocab) == (
        metrics["kept_from_data"] + metrics["kept_special"] + metrics["kept_for_tokenizer"])
    if metrics["tokenizer_model"] == "WordLevel":  # exactly the tokens used + the specials
        assert set(old_of_new) == kept and metrics["kept_for_tokenizer"] == 0
    if metrics["tokenizer_model"] == "WordPiece":  # ... and their characters, as "c" and "##c"
        alphabet = _alphabet(before["vocab"], before["used"] - before["specials"])
        assert set(old_of_new) == kept | alphabet
        assert metrics["kept_for_tokenizer"] == len(alphabet - kept) > 0
    assert metrics["coverage"] == 1.0 and metrics["texts_tokenized_differently"] == 0
    assert metrics["params_removed"] == metrics["embedding_params_before"] - metrics["embedding_params_after"] > 0

    # the same tokens under the new ids
    assert tok(DOMAIN)["input_ids"] == [[to_new[i] for i in ids] for ids in before["ids"]]

    # the model: shapes and config agree, special ids still name the same tokens
    emb = model.get_input_embeddings()
    assert config.vocab_size == emb.num_embeddings == emb.weight.shape[0] == len(new_vocab)
    head = model.get_output_embeddings()
    if head is not None:
        assert head.weight.shape[0] == config.vocab_size
        assert (head.weight is emb.weight) == before["tied"]
    for key, token in before["config_tokens"].items():
        assert tok.convert_ids_to_tokens(getattr(config, key)) == token, key

    # the outputs on the domain text (an LM's logits: the kept columns)
    old = before["outputs"]
    if old.shape[-1] != config.hidden_size:  # logits over the vocabulary
        old = old[..., old_of_new]
    pruned = _outputs(loaded, DOMAIN)
    assert torch.allclose(pruned, old, atol=1e-5, rtol=0)

    # any text still encodes into the new vocabulary
    for ids in tok(OTHER)["input_ids"]:
        assert ids and max(ids) < len(new_vocab)

    # the tokenizer saves and reloads to the same behaviour
    tok.save_pretrained(tmp_path / "tok")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert type(reloaded) is type(tok) and len(reloaded) == len(tok)
    assert reloaded(DOMAIN + OTHER)["input_ids"] == tok(DOMAIN + OTHER)["input_ids"]

    # the model saves as a checkpoint and reloads to the same outputs
    save_checkpoint(loaded, tmp_path / "ckpt")
    back = compressor.load(tmp_path / "ckpt")
    assert back.model.config.vocab_size == config.vocab_size
    assert torch.allclose(_outputs(back, DOMAIN), pruned, atol=1e-6, rtol=0)


def _tokenizer_model_dir(case: str, tmp_path):
    family, build, overrides = TOKENIZER_CASES[case]
    tok = build()
    folder = tmp_path / case
    make_model(family, vocab_size=len(tok), **overrides).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# --- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_keeps_its_outputs(family, tiny_dirs, tmp_path):
    loaded = compressor.load(tiny_dirs[family])
    before = _snapshot(loaded)
    metrics = prune_vocabulary(loaded, DOMAIN)
    # character-level: the characters used plus the five specials
    assert metrics["vocab_after"] == len(before["used"] | before["specials"]) < metrics["vocab_before"] == 128
    _check_pruned(loaded, before, metrics, tmp_path)


@pytest.mark.parametrize("case", list(TOKENIZER_CASES))
def test_every_tokenizer_model_keeps_its_segmentation(case, tmp_path):
    loaded = compressor.load(_tokenizer_model_dir(case, tmp_path))
    before = _snapshot(loaded)
    metrics = prune_vocabulary(loaded, DOMAIN)
    assert metrics["vocab_after"] < 0.85 * metrics["vocab_before"]
    _check_pruned(loaded, before, metrics, tmp_path)
    vocab = loaded.tokenizer.get_vocab()
    if case.startswith("bytelevel"):
        # all 256 bytes stay, so any text still encodes without loss
        assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
        for text in OTHER:
            assert loaded.tokenizer.decode(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    if case.startswith("bytefallback"):
        assert {f"<0x{b:02X}>" for b in range(256)} <= set(vocab)
        ids = loaded.tokenizer("漢字", add_special_tokens=False)["input_ids"]
        assert loaded.tokenizer.decode(ids).strip() == "漢字"


def test_bpe_keeps_the_merges_its_tokens_are_made_by(tmp_path):
    loaded = compressor.load(_tokenizer_model_dir("bytelevel-gpt2", tmp_path))
    prune_vocabulary(loaded, ["unimportant"])
    model_state = json.loads(loaded.tokenizer.backend_tokenizer.to_str())["model"]
    vocab = model_state["vocab"]
    for a, b in model_state["merges"]:
        assert a in vocab and b in vocab and a + b in vocab
    # a word the text used is rebuilt by merges from bytes, so its parts stayed
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer("unimportant")["input_ids"]) == \
        transformers.AutoTokenizer.from_pretrained(tmp_path / "bytelevel-gpt2").tokenize("unimportant")


def test_unigram_keeps_the_piece_its_unknown_score_is_measured_from():
    # "xabc": the best path is xa + bc (-60); without "zz" (-1000, unused) the unknown score
    # would rise from -1010 to -40 and <unk>(x) + abc (-41) would win
    pieces = [("<unk>", 0.0), ("zz", -1000.0), ("xa", -30.0), ("bc", -30.0), ("abc", -1.0),
              ("a", -20.0), ("b", -20.0), ("c", -20.0)]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram(pieces, 0, False)),
                                               unk_token="<unk>")
    model = make_model("bert", vocab_size=len(pieces))
    loaded = LoadedModel(model, tok, get_adapter(model), "tiny")
    assert tok.tokenize("xabc") == ["xa", "bc"]
    metrics = prune_vocabulary(loaded, ["xabc", "abc"])
    assert loaded.tokenizer.tokenize("xabc") == ["xa", "bc"]
    assert sorted(loaded.tokenizer.get_vocab()) == ["<unk>", "abc", "bc", "xa", "zz"]
    assert metrics["kept_for_tokenizer"] == 1


def test_min_count_drops_rare_tokens(tiny_dirs):
    loaded = compressor.load(tiny_dirs["bert"])
    rare = "qqqq zzzz"  # q and z appear only here
    full = prune_vocabulary(compressor.load(tiny_dirs["bert"]), DOMAIN + [rare])
    metrics = prune_vocabulary(loaded, DOMAIN + [rare], min_count=5)
    assert metrics["vocab_after"] < full["vocab_after"]
    assert metrics["coverage"] < 1.0 and metrics["texts_tokenized_differently"] >= 1
    ids = loaded.tokenizer(rare)["input_ids"]
    assert loaded.tokenizer.unk_token_id in ids
    assert _outputs(loaded, [rare]).shape[1] == len(ids)


def test_wordpiece_spells_a_dropped_word_instead_of_reading_unk():
    # min_count drops "unbelievable" (used once); the alphabet of the kept words (a pangram) is
    # kept as word starts and continuations, so the word still reads, letter by letter at worst
    loaded = compressor.load(None)
    word = "unbelievable"
    assert loaded.tokenizer.tokenize(word) == [word]
    metrics = prune_vocabulary(loaded, ["the quick brown fox jumps over a lazy dog"] * 5 + [word], min_count=5)
    assert metrics["texts_tokenized_differently"] == 1
    pieces = loaded.tokenizer.tokenize(word)
    assert "[UNK]" not in pieces and len(pieces) > 1
    assert "".join(p.removeprefix("##") for p in pieces) == word
    assert loaded.tokenizer.tokenize("the lazy fox") == ["the", "lazy", "fox"]  # kept words as before


def test_wordpiece_gives_up_where_it_gave_up_before():
    # "abc" reads as [UNK]: greedy takes "ab", then finds no "##c". Cut to the used tokens plus
    # the alphabet, "a" + "##bc" would split it; keeping "ab", the piece taken before giving up,
    # makes the cut tokenizer give up at the same place
    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "a", "##a", "ab", "##b", "##bc", "x"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    model = make_model("bert", vocab_size=len(vocab))
    loaded = LoadedModel(model, tok, get_adapter(model), "tiny")
    text = "abc xbc xa"
    assert tok.tokenize(text) == ["[UNK]", "x", "##bc", "x", "##a"]
    metrics = prune_vocabulary(loaded, [text])
    assert loaded.tokenizer.tokenize(text) == ["[UNK]", "x", "##bc", "x", "##a"]
    assert "ab" in loaded.tokenizer.get_vocab() and metrics["texts_tokenized_differently"] == 0


def test_sharing_survives_vocabulary_pruning(tiny_dirs, tmp_path):
    loaded = compressor.load(tiny_dirs["bert"])
    loaded, _ = share(loaded, ShareConfig(plan="0-1,2-3", lora_rank=2, fidelity=False))
    manifest = json.dumps(loaded.sharing.to_dict())
    before = _snapshot(loaded)
    metrics = prune_vocabulary(loaded, DOMAIN)
    assert json.dumps(loaded.sharing.to_dict()) == manifest
    blocks = loaded.adapter.blocks(loaded.model)
    query = loaded.adapter.linears["query"]
    assert blocks[0].get_submodule(query).base_layer.weight is blocks[1].get_submodule(query).base_layer.weight
    _check_pruned(loaded, before, metrics, tmp_path)


def test_roberta_padding_id_must_not_move(tiny_dirs, tmp_path):
    # RoBERTa counts position ids from the padding id: pad on a token after an unused one would move
    make_model("roberta", pad_token_id=40).save_pretrained(tmp_path / "m")
    compressor.load(tiny_dirs["roberta"]).tokenizer.save_pretrained(tmp_path / "m")
    loaded = compressor.load(tmp_path / "m")
    rows = loaded.model.get_input_embeddings().weight.shape
    with pytest.raises(UnsupportedModelError, match="padding id 40"):
        prune_vocabulary(loaded, ["zzz"])
    assert loaded.model.get_input_embeddings().weight.shape == rows  # nothing changed


def test_bad_input_fails_in_one_line(tiny_dirs, tmp_path):
    loaded = compressor.load(tiny_dirs["bert"])
    for texts in ([], ["", "  "]):
        with pytest.raises(DataError, match="empty") as err:
            prune_vocabulary(loaded, texts)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="min-count"):
        prune_vocabulary(loaded, DOMAIN, min_count=0)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello"]) + "\n")
    loaded.tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(UnsupportedModelError, match="fast") as err:
        prune_vocabulary(loaded, DOMAIN)
    assert "\n" not in str(err.value)
    loaded.tokenizer = None
    with pytest.raises(UnsupportedModelError, match="no tokenizer"):
        prune_vocabulary(loaded, DOMAIN)
    assert loaded.model.config.vocab_size == 128  # nothing changed


def _real_sentences(n: int) -> list[str]:
    """Movie snippets if the data set is cached (no network in tests), else the built-in sentences."""
    from compressor.data.datasets import CACHE_FORMAT, cache_dir, load_texts

    if (cache_dir() / "datasets" / f"movie-snippets.v{CACHE_FORMAT}.tsv").is_file():
        return load_texts("movie-snippets", limit=n)
    return TEXTS


def test_minilm_embedding_shrinks_by_more_than_half(tmp_path):
    loaded = compressor.load(None)
    texts = _real_sentences(300)
    before = _snapshot(loaded)  # DOMAIN: the built-in sentences
    metrics = prune_vocabulary(loaded, texts + DOMAIN)
    assert metrics["vocab_before"] == 30522 and metrics["tokenizer_model"] == "WordPiece"
    assert metrics["embedding_params_after"] < 0.5 * metrics["embedding_params_before"]
    assert metrics["params_before"] - metrics["params_after"] == metrics["params_removed"] > 0.4 * 11_720_448
    assert metrics["vocab_after"] == metrics["distinct_tokens"] + metrics["kept_special"] + metrics["kept_for_tokenizer"]
    assert 0 < metrics["kept_for_tokenizer"] < 500  # the alphabet: a few hundred rows
    assert torch.equal(_outputs(loaded, DOMAIN), before["outputs"])  # bit for bit
    ids = loaded.tokenizer(texts)["input_ids"]
    assert max(max(i) for i in ids) < metrics["vocab_after"]


def test_stage_measures_fidelity_on_the_domain_text(tiny_dirs, tmp_path):
    # Without --data, the stage calibrates and checks fidelity on the --vocab-from text: the model
    # is cut for that domain, and on it the outputs must not move.
    from compressor.pruning import PruneConfig, prune

    domain = tmp_path / "domain.txt"
    domain.write_text("\n".join(DOMAIN), encoding="utf-8")
    loaded = compressor.load(tiny_dirs["bert"])
    loaded, record = prune(loaded, PruneConfig(vocab_from=str(domain)))
    fidelity = record.metrics["fidelity"]
    assert fidelity["num_texts"] == len(DOMAIN)
    assert fidelity["embedding_cosine"] > 1 - 1e-6
    assert max(fidelity["hidden_state_error"]) < 1e-5
    assert record.params_after < record.params_before


def test_a_min_count_that_keeps_no_data_token_is_refused(tiny_dirs):
    loaded = compressor.load(tiny_dirs["bert"])
    with pytest.raises(ConfigError, match="keeps none of the data's tokens"):
        prune_vocabulary(loaded, DOMAIN, min_count=10**9)
    assert loaded.model.config.vocab_size == 128  # left as it was


def test_vocabulary_from_several_sources_keeps_the_tokens_of_each(tiny_dirs, tmp_path):
    from compressor.pruning import PruneConfig, prune

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n".join(DOMAIN[:12]), encoding="utf-8")
    b.write_text("\n".join(DOMAIN[12:]), encoding="utf-8")
    one = tmp_path / "one.txt"
    one.write_text("\n".join(DOMAIN), encoding="utf-8")
    both, record = prune(compressor.load(tiny_dirs["bert"]), PruneConfig(vocab_from=f"{a},{b}"))
    single, _ = prune(compressor.load(tiny_dirs["bert"]), PruneConfig(vocab_from=str(one)))
    assert both.tokenizer.get_vocab() == single.tokenizer.get_vocab()  # the union, not the first file's
    only_a, _ = prune(compressor.load(tiny_dirs["bert"]), PruneConfig(vocab_from=str(a)))
    assert len(only_a.tokenizer.get_vocab()) < len(both.tokenizer.get_vocab())
    # calibration takes texts from both sources in turn
    assert record.metrics["fidelity"]["num_texts"] == len(DOMAIN)
