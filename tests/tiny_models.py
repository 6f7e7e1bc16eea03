"""Tiny seeded models of every supported family, built from configs, with a real tokenizer.

Each model is saved as an ordinary Hugging Face folder (config.json, model.safetensors and a
character-level fast tokenizer), so tests go through the same loading path as users.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

VOCAB_SIZE = 128
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_ENCODER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                vocab_size=VOCAB_SIZE, max_position_embeddings=128, pad_token_id=0)
_DECODER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                vocab_size=VOCAB_SIZE, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3)

#: family -> (config class name, model class name, config kwargs); the classes are looked up in
#: `transformers` when a model is built, so importing this module imports no modeling module.
FAMILIES = {
    "bert": ("BertConfig", "BertModel", _ENCODER),
    "roberta": ("RobertaConfig", "RobertaModel", _ENCODER),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", _ENCODER),
    "camembert": ("CamembertConfig", "CamembertModel", _ENCODER),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(dim=32, n_layers=4, n_heads=4, hidden_dim=64, vocab_size=VOCAB_SIZE,
                        max_position_embeddings=128, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=32, n_layer=4, n_head=4, n_inner=64, vocab_size=VOCAB_SIZE, n_positions=128,
                  bos_token_id=2, eos_token_id=3)),
    # grouped-query attention: 4 query heads read 2 key/value heads
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    # MPNet: one per-head relative attention bias outside the blocks, read by every layer
    "mpnet": ("MPNetConfig", "MPNetModel", _ENCODER),
    # DeBERTa-v3 style: disentangled attention through the layers' own key/query projections
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model",
                   {**_ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
                    "max_relative_positions": -1, "position_biased_input": False, "norm_rel_ebd": "layer_norm",
                    "share_att_key": True}),
    # ELECTRA: embeddings narrower than the blocks, projected up
    "electra": ("ElectraConfig", "ElectraModel", {**_ENCODER, "embedding_size": 16}),
    # ModernBERT: fused Wqkv, GLU Wi, global attention every 2nd layer, local window elsewhere
    "modernbert": ("ModernBertConfig", "ModernBertModel",
                   {**_ENCODER, "global_attn_every_n_layers": 2, "local_attention": 8, "bos_token_id": 2,
                    "eos_token_id": 3, "cls_token_id": 2, "sep_token_id": 3}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_DECODER, "num_key_value_heads": 2, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {**_DECODER, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {**_DECODER, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8}),
    # Phi-3: fused qkv_proj with unequal query and key/value widths, fused gate_up_proj
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_DECODER, "num_key_value_heads": 2}),
    # GPT-NeoX: query_key_value interleaved per head
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", _DECODER),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB_SIZE,
                 max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3, word_embed_proj_dim=32)),
}


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: every character is a token, so any text encodes."""
    chars = string.ascii_lowercase + string.digits + " .,;:!?'\"-()/&%$#@+=*"
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(chars)))}
    assert len(vocab) <= VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", bos_token="[CLS]", eos_token="[SEP]",
    )


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny randomly initialised model of ``family`` (about 0.1 s)."""
    config_name, model_name, kwargs = FAMILIES[family]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}))
    # Random init gives norms weight 1 / bias 0 and linear biases 0; perturb every vector so tests
    # see real per-layer norms and biases, as in a trained model.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_model(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny model and its tokenizer as a Hugging Face folder; returns the folder."""
    folder = Path(folder)
    make_model(family, seed, **overrides).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


class TinyModelDirs(dict):
    """family -> folder of a tiny seeded model with its tokenizer, each saved the first time a
    test asks for it, so a test run builds only the families its tests use."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)

    def __missing__(self, family: str) -> Path:
        if family not in FAMILIES:
            raise KeyError(family)
        folder = self[family] = save_model(family, self.root / family)
        return folder


#: Families every default test run covers: a BERT encoder, GPT-2's Conv1D, Llama's grouped-query
#: attention and DeBERTa-v2's refusals. Tests over every family run the others with ``-m slow``
#: (``make test-all``).
CORE_FAMILIES = ("bert", "gpt2", "llama", "deberta-v2")


def by_family(families, slow=()) -> list:
    """``families`` as test parameters, those outside `CORE_FAMILIES` or in ``slow`` marked slow."""
    import pytest

    return [f if f in CORE_FAMILIES and f not in slow else pytest.param(f, marks=pytest.mark.slow) for f in families]


def save_sentence_mpnet(folder: Path, vocab_file: Path, seed: int = 0) -> Path:
    """A small seeded MPNet as a sentence-transformers folder, laid out as all-mpnet-base-v2 is
    (MPNet's WordPiece tokenizer with ``<s>``/``</s>`` specials, mean pooling, Normalize), its
    vocabulary BERT's WordPiece vocabulary read from ``vocab_file`` (all-mpnet-base-v2's is the
    same words), so that tokenizer surgery meets a real vocabulary."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True)
    words = [w for w in Path(vocab_file).read_text(encoding="utf-8").splitlines() if w]
    vocab = ["<s>", "<pad>", "</s>", "<unk>", *words, "<mask>"]  # 30,527 from BERT's, as all-mpnet-base-v2's
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = transformers.MPNetTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = transformers.MPNetConfig(vocab_size=len(vocab), hidden_size=96, num_hidden_layers=4, num_attention_heads=6,
                                      intermediate_size=192, max_position_embeddings=130, pad_token_id=1,
                                      bos_token_id=0, eos_token_id=2)
    model = transformers.MPNetModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.encoder.relative_attention_bias.weight.normal_(0.0, 1.0)  # a trained bias is several units
    model.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 96,
                                                                 "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return folder
