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

#: family -> (config class, model class, config kwargs)
FAMILIES = {
    "bert": (transformers.BertConfig, transformers.BertModel, _ENCODER),
    "roberta": (transformers.RobertaConfig, transformers.RobertaModel, _ENCODER),
    "xlm-roberta": (transformers.XLMRobertaConfig, transformers.XLMRobertaModel, _ENCODER),
    "camembert": (transformers.CamembertConfig, transformers.CamembertModel, _ENCODER),
    "distilbert": (transformers.DistilBertConfig, transformers.DistilBertModel,
                   dict(dim=32, n_layers=4, n_heads=4, hidden_dim=64, vocab_size=VOCAB_SIZE,
                        max_position_embeddings=128, pad_token_id=0)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=4, n_head=4, n_inner=64, vocab_size=VOCAB_SIZE, n_positions=128,
                  bos_token_id=2, eos_token_id=3)),
    # grouped-query attention: 4 query heads read 2 key/value heads
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {**_DECODER, "num_key_value_heads": 2}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {**_DECODER, "num_key_value_heads": 2}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {**_DECODER, "num_key_value_heads": 2}),
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
    config_cls, model_cls, kwargs = FAMILIES[family]
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
