"""The declared model families. Adding a family means adding one adapter here.

A model whose ``model_type`` is not declared gets an adapter inferred from its structure
(`compressor.adapters.infer`); declared or inferred, `compressor.adapters.checks` proves it on
the loaded model before any stage uses it.
"""

from __future__ import annotations

import dataclasses

from .base import ArchitectureAdapter, FusedLayout

_HF_KEYS = {"intermediate_size": "intermediate_size"}
_GQA_KEYS = {**_HF_KEYS, "num_kv_heads": "num_key_value_heads"}
_QKV = ("query", "key", "value")
#: Why families whose head size is ``hidden / heads`` and whose config cannot record pruned
#: heads refuse head pruning: a config with fewer heads would rebuild wider heads on load.
_HEAD_SIZE_FROM_HIDDEN = "its head size is hidden_size / num_attention_heads and its config cannot record pruned heads"

BERT = ArchitectureAdapter(
    family="bert",
    model_types=("bert",),
    blocks_path="encoder.layer",
    linears={
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    outer_norms=("embeddings.LayerNorm",),
    config_keys=_HF_KEYS,
    head_attrs=(
        ("attention.self", "num_attention_heads", "heads"),
        ("attention.self", "all_head_size", "width"),
        ("attention", "pruned_heads", "pruned"),
    ),
    pruned_heads_in_config=True,
)

# RoBERTa counts positions from padding_idx + 1 (pad_token_id 1: from 2).
ROBERTA = dataclasses.replace(BERT, family="roberta", model_types=("roberta", "xlm-roberta", "camembert"),
                              positions_after_padding=True)

ELECTRA = dataclasses.replace(BERT, family="electra", model_types=("electra",))

DISTILBERT = ArchitectureAdapter(
    family="distilbert",
    model_types=("distilbert",),
    blocks_path="transformer.layer",
    linears={
        "query": "attention.q_lin",
        "key": "attention.k_lin",
        "value": "attention.v_lin",
        "attn_out": "attention.out_lin",
        "ffn_in": "ffn.lin1",
        "ffn_out": "ffn.lin2",
    },
    norms=("sa_layer_norm", "output_layer_norm"),
    outer_norms=("embeddings.LayerNorm",),
    config_keys={"intermediate_size": "hidden_dim"},
    head_attrs=(("attention", "n_heads", "heads"), ("attention", "dim", "width"), ("attention", "pruned_heads", "pruned")),
    pruned_heads_in_config=True,
)

MPNET = ArchitectureAdapter(
    family="mpnet",
    model_types=("mpnet",),
    blocks_path="encoder.layer",
    linears={
        "query": "attention.attn.q",
        "key": "attention.attn.k",
        "value": "attention.attn.v",
        "attn_out": "attention.attn.o",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
    norms=("attention.LayerNorm", "output.LayerNorm"),
    outer_norms=("embeddings.LayerNorm",),
    # one (buckets, heads) bias added to every layer's attention scores: heads stay in place, and
    # pruning removes the same heads from every layer and slices the bias once (the head size is
    # hidden / num_attention_heads, so the cut is recorded in config.pruned_heads, and a model
    # rebuilt from the config has its bias sliced again by `fit_head_state`)
    head_state=("encoder.relative_attention_bias.weight",),
    config_keys=_HF_KEYS,
    head_attrs=(("attention.attn", "num_attention_heads", "heads"), ("attention.attn", "all_head_size", "width"),
                ("attention", "pruned_heads", "pruned")),
    pruned_heads_in_config=True,
    reserved_positions=2,  # positions count from its fixed padding_idx 1 + 1
)

DEBERTA_V2 = ArchitectureAdapter(
    family="deberta-v2",
    model_types=("deberta-v2",),
    blocks_path="encoder.layer",
    linears={
        "query": "attention.self.query_proj",
        "key": "attention.self.key_proj",
        "value": "attention.self.value_proj",
        "attn_out": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
    },
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    # The relative position embeddings are hidden-sized and pass through each layer's own key
    # and query projections (share_att_key), so they follow a head permutation; with separate
    # pos_key_proj / pos_query_proj the load-time permutation check finds that they do not.
    outer_norms=("embeddings.LayerNorm", "encoder.LayerNorm"),
    config_keys=_HF_KEYS,
    refusals={"prune_heads": "its attention output projection is hidden_size wide whatever the head count, so a "
                             "model with fewer heads does not reload"},
)

GPT2 = ArchitectureAdapter(
    family="gpt2",
    model_types=("gpt2",),
    blocks_path="h",
    linears={
        "attn_out": "attn.c_proj",
        "ffn_in": "mlp.c_fc",
        "ffn_out": "mlp.c_proj",
    },
    fused={"attn.c_attn": FusedLayout(_QKV)},  # Q, K and V stacked: the three thirds
    norms=("ln_1", "ln_2"),
    outer_norms=("ln_f",),
    config_keys={"intermediate_size": "n_inner"},
    is_decoder=True,
    head_attrs=(("attn", "num_heads", "heads"), ("attn", "split_size", "width"), ("attn", "pruned_heads", "pruned")),
    pruned_heads_in_config=True,
    conv1d=True,
)

GPT_NEOX = ArchitectureAdapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    blocks_path="layers",
    linears={
        "attn_out": "attention.dense",
        "ffn_in": "mlp.dense_h_to_4h",
        "ffn_out": "mlp.dense_4h_to_h",
    },
    fused={"attention.query_key_value": FusedLayout(_QKV, per_head=True)},  # q0 k0 v0 q1 k1 v1 ...
    norms=("input_layernorm", "post_attention_layernorm"),
    outer_norms=("final_layer_norm",),
    config_keys=_HF_KEYS,
    is_decoder=True,
    refusals={"prune_heads": _HEAD_SIZE_FROM_HIDDEN},
)

OPT = ArchitectureAdapter(
    family="opt",
    model_types=("opt",),
    blocks_path="decoder.layers",
    linears={
        "query": "self_attn.q_proj",
        "key": "self_attn.k_proj",
        "value": "self_attn.v_proj",
        "attn_out": "self_attn.out_proj",
        "ffn_in": "fc1",
        "ffn_out": "fc2",
    },
    norms=("self_attn_layer_norm", "final_layer_norm"),
    outer_norms=("decoder.final_layer_norm",),
    config_keys={"intermediate_size": "ffn_dim"},
    is_decoder=True,
    refusals={"prune_heads": _HEAD_SIZE_FROM_HIDDEN},
)

LLAMA = ArchitectureAdapter(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    blocks_path="layers",
    linears={
        "query": "self_attn.q_proj",
        "key": "self_attn.k_proj",
        "value": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_in": "mlp.up_proj",
        "ffn_out": "mlp.down_proj",
    },
    norms=("input_layernorm", "post_attention_layernorm"),
    outer_norms=("norm",),
    config_keys=_GQA_KEYS,
    is_decoder=True,
)

GEMMA = dataclasses.replace(LLAMA, family="gemma", model_types=("gemma",))

# Qwen3: one RMSNorm over head_dim on every query head and one on every key head.
QWEN3 = dataclasses.replace(LLAMA, family="qwen3", model_types=("qwen3",),
                            head_norms=("self_attn.q_norm", "self_attn.k_norm"))

# Gemma 2: norms before and after each sublayer.
GEMMA2 = dataclasses.replace(LLAMA, family="gemma2", model_types=("gemma2",), norms=(
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"))

GEMMA3 = dataclasses.replace(GEMMA2, family="gemma3", model_types=("gemma3_text",),
                             head_norms=("self_attn.q_norm", "self_attn.k_norm"))

PHI3 = ArchitectureAdapter(
    family="phi3",
    model_types=("phi3",),
    blocks_path="layers",
    linears={
        "attn_out": "self_attn.o_proj",
        "ffn_out": "mlp.down_proj",
    },
    fused={
        # queries (heads x head_dim), then keys and values (kv heads x head_dim each)
        "self_attn.qkv_proj": FusedLayout(_QKV),
        # the activated half first: gate, up = gate_up_proj(x).chunk(2)
        "mlp.gate_up_proj": FusedLayout(("ffn_gate", "ffn_in")),
    },
    norms=("input_layernorm", "post_attention_layernorm"),
    outer_norms=("norm",),
    config_keys=_GQA_KEYS,
    is_decoder=True,
    head_attrs=(("self_attn", "num_key_value_heads", "kv_heads"),),
)

MODERNBERT = ArchitectureAdapter(
    family="modernbert",
    model_types=("modernbert",),
    blocks_path="layers",
    linears={
        "attn_out": "attn.Wo",
        "ffn_out": "mlp.Wo",
    },
    fused={
        "attn.Wqkv": FusedLayout(_QKV),
        # input, gate = Wi(x).chunk(2); Wo(act(input) * gate): the activated half first
        "mlp.Wi": FusedLayout(("ffn_gate", "ffn_in")),
    },
    norms=("attn_norm", "mlp_norm"),  # the first block's attn_norm is an Identity
    outer_norms=("embeddings.norm", "final_norm"),
    config_keys=_HF_KEYS,
    refusals={
        "prune_heads": _HEAD_SIZE_FROM_HIDDEN,
        "drop_layers": "it chooses global or local attention by layer index (global_attn_every_n_layers), so "
                       "removing a layer changes the attention of the layers after it",
    },
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    BERT, ROBERTA, ELECTRA, DISTILBERT, MPNET, DEBERTA_V2, MODERNBERT,
    GPT2, GPT_NEOX, OPT, LLAMA, GEMMA, QWEN3, GEMMA2, GEMMA3, PHI3,
)
