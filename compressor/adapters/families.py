"""The supported model families. Adding a family means adding one adapter here."""

from __future__ import annotations

from .base import ArchitectureAdapter, LinearSpec

_HF_KEYS = {"intermediate_size": "intermediate_size"}

BERT = ArchitectureAdapter(
    family="bert",
    model_types=("bert", "roberta", "xlm-roberta", "camembert"),
    blocks_path="encoder.layer",
    linears={
        "query": LinearSpec("attention.self.query"),
        "key": LinearSpec("attention.self.key"),
        "value": LinearSpec("attention.self.value"),
        "attn_out": LinearSpec("attention.output.dense"),
        "ffn_in": LinearSpec("intermediate.dense"),
        "ffn_out": LinearSpec("output.dense"),
    },
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    config_keys=_HF_KEYS,
    head_attrs=(
        ("attention.self", "num_attention_heads", "heads"),
        ("attention.self", "all_head_size", "width"),
        ("attention", "pruned_heads", "pruned"),
    ),
    pruned_heads_in_config=True,
)

DISTILBERT = ArchitectureAdapter(
    family="distilbert",
    model_types=("distilbert",),
    blocks_path="transformer.layer",
    linears={
        "query": LinearSpec("attention.q_lin"),
        "key": LinearSpec("attention.k_lin"),
        "value": LinearSpec("attention.v_lin"),
        "attn_out": LinearSpec("attention.out_lin"),
        "ffn_in": LinearSpec("ffn.lin1"),
        "ffn_out": LinearSpec("ffn.lin2"),
    },
    norms=("sa_layer_norm", "output_layer_norm"),
    config_keys={"intermediate_size": "hidden_dim"},
    head_attrs=(("attention", "n_heads", "heads"), ("attention", "dim", "width"), ("attention", "pruned_heads", "pruned")),
    pruned_heads_in_config=True,
)

GPT2 = ArchitectureAdapter(
    family="gpt2",
    model_types=("gpt2",),
    blocks_path="h",
    linears={
        # Q, K and V are the three thirds of one fused Conv1D.
        "query": LinearSpec("attn.c_attn", fused_index=0),
        "key": LinearSpec("attn.c_attn", fused_index=1),
        "value": LinearSpec("attn.c_attn", fused_index=2),
        "attn_out": LinearSpec("attn.c_proj"),
        "ffn_in": LinearSpec("mlp.c_fc"),
        "ffn_out": LinearSpec("mlp.c_proj"),
    },
    norms=("ln_1", "ln_2"),
    config_keys={"intermediate_size": "n_inner"},
    is_decoder=True,
    head_attrs=(("attn", "num_heads", "heads"), ("attn", "split_size", "width"), ("attn", "pruned_heads", "pruned")),
    pruned_heads_in_config=True,
    conv1d=True,
)

LLAMA = ArchitectureAdapter(
    family="llama",
    model_types=("llama", "qwen2", "mistral"),
    blocks_path="layers",
    linears={
        "query": LinearSpec("self_attn.q_proj"),
        "key": LinearSpec("self_attn.k_proj"),
        "value": LinearSpec("self_attn.v_proj"),
        "attn_out": LinearSpec("self_attn.o_proj"),
        "ffn_gate": LinearSpec("mlp.gate_proj"),
        "ffn_in": LinearSpec("mlp.up_proj"),
        "ffn_out": LinearSpec("mlp.down_proj"),
    },
    norms=("input_layernorm", "post_attention_layernorm"),
    config_keys={**_HF_KEYS, "num_kv_heads": "num_key_value_heads"},
    is_decoder=True,
    gated_ffn=True,
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (BERT, DISTILBERT, GPT2, LLAMA)
