"""The architecture adapters: geometry, where the sublayers are, and writing weights back."""

import pytest
import torch
import transformers

from compressor.adapters import SUPPORTED_MODEL_TYPES, get_adapter
from compressor.errors import UnsupportedModelError
from tiny_models import FAMILIES, make_model

EXPECTED_FAMILY = {
    "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert", "distilbert": "distilbert",
    "gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_and_shapes(family):
    model = make_model(family)
    adapter = get_adapter(model)
    assert adapter.family == EXPECTED_FAMILY[family]
    g = adapter.geometry(model.config)
    assert (g.num_layers, g.hidden_size, g.num_heads, g.head_dim, g.intermediate_size) == (4, 32, 4, 8, 64)
    assert g.num_kv_heads == (2 if adapter.family == "llama" else 4)
    blocks = adapter.blocks(model)
    assert len(blocks) == 4
    expected = {
        "query": (g.num_heads * g.head_dim, g.hidden_size),
        "key": (g.num_kv_heads * g.head_dim, g.hidden_size),
        "value": (g.num_kv_heads * g.head_dim, g.hidden_size),
        "attn_out": (g.hidden_size, g.num_heads * g.head_dim),
        "ffn_gate": (g.intermediate_size, g.hidden_size),
        "ffn_in": (g.intermediate_size, g.hidden_size),
        "ffn_out": (g.hidden_size, g.intermediate_size),
    }
    assert set(adapter.roles) == set(expected) - ({"ffn_gate"} if not adapter.gated_ffn else set())
    for role in adapter.roles:
        assert tuple(adapter.weight(blocks[0], role).shape) == expected[role], role
    for path in adapter.norms:
        norm = blocks[0].get_submodule(path)
        assert norm.weight.shape == (g.hidden_size,)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_is_what_the_module_computes(family):
    """adapter.weight/bias, used as nn.Linear, reproduce each sublayer's own output."""
    model = make_model(family)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    for role in adapter.roles:
        module = adapter.linear(block, role)
        spec = adapter.linears[role]
        w, b = adapter.weight(block, role), adapter.bias(block, role)
        inp = torch.randn(5, w.shape[1])
        full = module(inp)
        if spec.fused_index is not None:
            full = full.chunk(3, dim=-1)[spec.fused_index]
        torch.testing.assert_close(torch.nn.functional.linear(inp, w, b), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_block_weights_writes_in_place(family):
    model = make_model(family)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    weights, biases = adapter.block_weights(blocks[0])
    adapter.load_block_weights(blocks[2], weights, biases)
    for role in adapter.roles:
        assert torch.equal(adapter.weight(blocks[2], role), weights[role])
        if biases[role] is not None:
            assert torch.equal(adapter.bias(blocks[2], role), biases[role])
    # the other blocks are untouched
    assert not torch.equal(adapter.weight(blocks[1], "query"), weights["query"])


def test_unsupported_architecture_lists_supported():
    config = transformers.T5Config()
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter(config)
    message = str(e.value)
    assert "'t5'" in message
    for t in ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral"):
        assert t in SUPPORTED_MODEL_TYPES and t in message
