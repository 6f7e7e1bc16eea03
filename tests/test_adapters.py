"""The architecture adapters: geometry, row maps of fused modules, writing weights back, the
self-checks, and inference for families nobody declared."""

import pytest
import torch
import transformers
from tiny_models import FAMILIES, make_model

from compressor.adapters import SUPPORTED_MODEL_TYPES, FusedLayout, Geometry, adapter_for, get_adapter
from compressor.adapters.checks import check_mapping, prove
from compressor.errors import UnsupportedModelError
from compressor.pruning.checks import check_pruning, prove_units

EXPECTED_FAMILY = {
    "bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta", "distilbert": "distilbert",
    "gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama", "mpnet": "mpnet",
    "deberta-v2": "deberta-v2", "electra": "electra", "modernbert": "modernbert", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "gpt_neox": "gpt_neox", "opt": "opt",
}
GQA = {"llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}


def test_every_tiny_family_is_declared():
    assert set(FAMILIES) <= set(SUPPORTED_MODEL_TYPES)
    assert set(EXPECTED_FAMILY) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_geometry_and_shapes(family):
    model = make_model(family)
    adapter = get_adapter(model)
    assert adapter.family == EXPECTED_FAMILY[family]
    g = adapter.geometry(model.config)
    assert (g.num_layers, g.hidden_size, g.num_heads, g.head_dim, g.intermediate_size) == (4, 32, 4, 8, 64)
    assert g.num_kv_heads == (2 if family in GQA else 4)
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
        assert tuple(adapter.weight(blocks[0], role, g).shape) == expected[role], role
    norms = adapter.norm_modules(model)
    assert len(norms) >= 4 and all(n.weight.dim() == 1 for n in norms)


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_is_what_the_module_computes(family):
    """adapter.weight/bias, used as nn.Linear, reproduce each role's rows of its module's output."""
    model = make_model(family)
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    block = adapter.blocks(model)[1]
    for role in adapter.roles:
        module = adapter.linear(block, role)
        w, b = adapter.weight(block, role, g), adapter.bias(block, role, g)
        inp = torch.randn(5, w.shape[1])
        full = module(inp)
        rows = adapter.role_rows(role, g)
        if rows is not None:
            full = full[:, rows]
        torch.testing.assert_close(torch.nn.functional.linear(inp, w, b), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_block_weights_writes_in_place(family):
    model = make_model(family)
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    blocks = adapter.blocks(model)
    weights, biases = adapter.block_weights(blocks[0], g)
    adapter.load_block_weights(blocks[2], weights, biases, g)
    for role in adapter.roles:
        assert torch.equal(adapter.weight(blocks[2], role, g), weights[role])
        if biases[role] is not None:
            assert torch.equal(adapter.bias(blocks[2], role, g), biases[role])
    # the other blocks are untouched
    assert not torch.equal(adapter.weight(blocks[1], "query", g), weights["query"])


def test_fused_layouts_are_explicit_row_maps():
    g = Geometry(num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64)
    rows = FusedLayout(("query", "key", "value")).rows(g)  # Phi-3: unequal widths under GQA
    assert rows["query"].tolist() == list(range(32)) and rows["key"].tolist() == list(range(32, 48))
    assert rows["value"].tolist() == list(range(48, 64))
    mha = Geometry(1, 32, 4, 4, 8, 64)
    neox = FusedLayout(("query", "key", "value"), per_head=True).rows(mha)  # q0 k0 v0 q1 k1 v1 ...
    assert neox["query"][:8].tolist() == list(range(8)) and neox["query"][8:16].tolist() == list(range(24, 32))
    assert neox["key"][:8].tolist() == list(range(8, 16)) and neox["value"][:8].tolist() == list(range(16, 24))
    with pytest.raises(UnsupportedModelError):
        FusedLayout(("query", "key", "value"), per_head=True).rows(g)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_checks_pass_on_every_declared_family(family):
    """mapping, permutation and pruning checks on the tiny model; what a family cannot do is
    declared (not run), never failed."""
    model = make_model(family)
    adapter, checks = prove_units(model, get_adapter(model))
    by_name = {c.name: c for c in checks.checks}
    assert by_name["mapping"].passed is True
    assert by_name["permute neurons"].passed is True
    for name in ("permute heads", "prune heads", "prune ffn"):
        assert by_name[name].passed is not False, (name, by_name[name].detail)
    assert (by_name["prune heads"].passed is None) == bool(adapter.refusal("prune_heads"))


def _comparable(adapter, model):
    """What an adapter means for a model, once proven: where everything is and what it may do."""
    from compressor.adapters import CAPABILITIES

    adapter, _ = prove_units(model, adapter)
    g = adapter.geometry(model.config)
    return {
        "blocks": adapter.blocks_path,
        "linears": adapter.linears,
        "fused": adapter.fused,
        "norms": {id(m) for m in adapter.norm_modules(model)},
        "head_norms": adapter.head_norms,
        "head_state": adapter.head_state,
        "is_decoder": adapter.is_decoder,
        "conv1d": adapter.conv1d,
        "max_positions": adapter.max_positions(model.config),
        "geometry": g,
        "can": {c: adapter.refusal(c) is None for c in CAPABILITIES if c != "drop_layers"},
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_inferred_adapter_reproduces_the_declared_one(family):
    model = make_model(family)
    declared, inferred = get_adapter(model), adapter_for(model, infer=True)
    assert inferred.inferred and not declared.inferred
    # the same modules, rows, norms and state, and after the self-checks the same capabilities
    # (where the declared adapter says why up front, the inferred one finds out by its checks)
    got, want = _comparable(inferred, model), _comparable(declared, model)
    if declared.head_state:
        # but for one, by design: heads pruned through state outside the blocks (MPNet's bias)
        # only where that state is declared, not guessed by shape
        assert want["can"]["prune_heads"] and not got["can"]["prune_heads"]
        got["can"]["prune_heads"] = True
    assert got == want


def test_mapping_check_catches_a_wrong_adapter():
    """An adapter that puts a role in the wrong module is refused at load, naming the sublayer."""
    import dataclasses

    model = make_model("bert")
    adapter = get_adapter(model)
    wrong = dataclasses.replace(adapter, linears={**adapter.linears, "ffn_in": "output.dense", "ffn_out": "intermediate.dense"})
    check = check_mapping(model, wrong, wrong.geometry(model.config))
    assert check.passed is False and check.sublayer == "0.output.dense"
    with pytest.raises(UnsupportedModelError, match="self-check 'mapping' failed at 0.output.dense"):
        prove(model, wrong)


def test_wrong_row_maps_are_caught_where_the_mapping_check_cannot_see():
    """GPT-2's stacked Q/K/V claimed as interleaved per head: the mapping check (shapes,
    orientation, consistent rows) passes; the head permutation and the value rows do not, and
    the model is refused rather than compressed on a wrong map."""
    import dataclasses

    from compressor.adapters.checks import check_permutation, check_value_rows

    model = make_model("gpt2")
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    wrong = dataclasses.replace(adapter, fused={"attn.c_attn": FusedLayout(("query", "key", "value"), per_head=True)})
    assert check_mapping(model, wrong, g).passed is True
    assert check_permutation(model, wrong, g, "heads").passed is False
    assert check_value_rows(model, wrong, g).passed is False
    with pytest.raises(UnsupportedModelError, match="self-check 'value rows' failed at 0.attn.c_attn"):
        prove(model, wrong)
    # keys and values swapped: permutations cannot tell, the value rows can
    swapped = dataclasses.replace(adapter, fused={"attn.c_attn": FusedLayout(("query", "value", "key"))})
    assert check_permutation(model, swapped, g, "heads").passed is True
    assert check_value_rows(model, swapped, g).passed is False
    assert check_value_rows(model, adapter, g).passed is True


def test_unsupported_architecture_is_named():
    config = transformers.T5Config()
    with pytest.raises(UnsupportedModelError) as e:
        get_adapter(config)
    assert "'t5'" in str(e.value)
    for t in ("bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral", "mpnet", "phi3", "opt"):
        assert t in SUPPORTED_MODEL_TYPES and t in str(e.value)


# --- inference on models nobody declared, and deliberately broken ones ----------------------
def test_inferred_adapter_on_an_undeclared_family():
    """A family with no declared adapter (here: BioGPT, a decoder with BERT-like names) gets an
    inferred adapter that passes every check."""
    config = transformers.BioGptConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                       vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BioGptForCausalLM(config).eval()
    assert "biogpt" not in SUPPORTED_MODEL_TYPES
    adapter, checks = prove_units(model, adapter_for(model))
    assert adapter.inferred and adapter.is_decoder
    assert adapter.linears["query"] == "self_attn.q_proj" and adapter.linears["ffn_in"] == "fc1"
    assert all(checks.get(n).passed for n in ("mapping", "permute neurons", "permute heads", "prune ffn"))
    # BioGPT's head size is hidden / heads: the pruning check finds that a config with fewer
    # heads does not rebuild, and head pruning is refused with what it found
    assert checks.get("prune heads").passed is False
    with pytest.raises(UnsupportedModelError, match="cannot prune attention heads: self-check 'prune heads' failed"):
        adapter.require("prune_heads")


def test_a_block_with_an_unmatched_linear_is_refused():
    model = make_model("bert")
    for block in model.encoder.layer:
        block.attention.self.extra = torch.nn.Linear(32, 48)  # a projection no role explains
    with pytest.raises(UnsupportedModelError, match=r"self-check 'label linears' failed: attention\.self\.extra \(48 x 32\)"):
        adapter_for(model, infer=True)


def test_a_per_head_parameter_outside_the_blocks_keeps_heads_in_place():
    """MPNet with inference forced: the (buckets, heads) bias outside the blocks is found and heads
    stay in place for alignment; head pruning, which slices that state, is the declared adapter's
    only (an inferred head state is a guess by shape: a token-type table as wide as the head
    count would be cut by head), so the inferred one refuses it with the reason."""
    model = make_model("mpnet")
    adapter, checks = prove_units(model, adapter_for(model, infer=True))
    assert adapter.head_state == ("encoder.relative_attention_bias.weight",)
    assert "relative_attention_bias" in adapter.refusal("permute_heads")
    assert not adapter.prunes_head_state
    with pytest.raises(UnsupportedModelError, match="cannot prune attention heads: every layer reads the per-head parameter"):
        adapter.require("prune_heads")
    declared, _ = prove_units(model, adapter_for(model))
    assert declared.prunes_head_state and declared.refusal("prune_heads") is None


class _ShuffledRows(torch.nn.Module):
    """Hands the attention a fused projection's rows in a fixed scrambled order."""

    def __init__(self, order):
        super().__init__()
        self.register_buffer("order", order)

    def forward(self, x):
        return x[..., self.order]


def test_a_fused_projection_with_an_unknown_split_is_refused():
    """A GPT-NeoX whose fused QKV rows reach the attention scrambled: neither stacked nor
    per-head rows are the heads, and the inferred adapter says it cannot tell."""
    model = make_model("gpt_neox")
    order = torch.randperm(96, generator=torch.Generator().manual_seed(0))
    for block in model.gpt_neox.layers:
        block.attention.query_key_value = torch.nn.Sequential(block.attention.query_key_value, _ShuffledRows(order))
    with pytest.raises(UnsupportedModelError,
                       match=r"self-check 'fused split' failed: attention\.query_key_value\.0 \(96 x 32\): none of 12 readings"):
        adapter_for(model, infer=True)


def test_pruning_check_refuses_what_does_not_reload():
    """OPT's head size is hidden / heads: pruning a head through an adapter that claims it can
    yields a config that rebuilds other shapes, and the check says so."""
    import dataclasses

    model = make_model("opt")
    adapter = dataclasses.replace(get_adapter(model), refusals={})
    check = check_pruning(model, adapter, "heads")
    assert check.passed is False



# --- what a review of the checks found ------------------------------------------------------
def test_a_nan_never_passes():
    model = make_model("bert")
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[3, 5] = float("nan")
    with pytest.raises(UnsupportedModelError, match="self-check 'mapping' failed at 1.intermediate.dense"):
        prove(model, get_adapter(model))


def test_multi_query_heads_are_checked():
    """One key/value head (multi-query attention): the heads still move inside the group."""
    model = make_model("llama", num_key_value_heads=1)
    _, checks = prove(model, get_adapter(model))
    assert checks.get("permute heads").passed is True


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "qwen3", "phi3", "llama"])
def test_half_precision_models_pass_their_checks(family, dtype):
    model = make_model(family).to(dtype)
    _, checks = prove_units(model, get_adapter(model))
    assert all(c.passed is not False for c in checks.checks), [(c.name, c.detail) for c in checks.checks]


def test_falcon_adds_into_a_sublayer_output_in_place_and_still_checks():
    """Falcon's parallel attention adds the attention output into the MLP's output in place;
    the checks copy what they record, so the inferred adapter passes."""
    config = transformers.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                       parallel_attn=True, new_decoder_architecture=False, multi_query=True, alibi=False)
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).eval()
    adapter, checks = prove(model, adapter_for(model))
    assert adapter.inferred and checks.get("mapping").passed and checks.get("permute heads").passed


def test_pruning_check_compares_with_the_unit_zeroed():
    """Rows cut through a wrong map still give shapes that rebuild; the function does not match."""
    import dataclasses

    model = make_model("gpt2")
    wrong = dataclasses.replace(get_adapter(model), fused={"attn.c_attn": FusedLayout(("query", "key", "value"), per_head=True)})
    check = check_pruning(model, wrong, "heads")
    assert check.passed is False and "rows cut are not that unit's" in check.detail
    assert check_pruning(model, get_adapter(model), "heads").passed is True


def test_an_all_shared_checkpoint_keeps_what_the_dense_checks_found(tmp_path):
    """Every block shared: the reload cannot re-run the permutation checks, so the checkpoint
    carries what they found on the dense model (MPNet-like inferred: heads stay in place)."""
    from tiny_models import save_model

    from compressor.models import load_model
    from compressor.sharing import ShareConfig, save_checkpoint, share

    folder = save_model("mpnet", tmp_path / "mpnet")
    loaded = load_model(folder, infer_adapter=True)
    assert loaded.adapter.inferred and loaded.adapter.refusal("permute_heads")
    shared, _ = share(loaded, ShareConfig(plan="0-3", lora_rank=2, fidelity=False))
    save_checkpoint(shared, tmp_path / "shared")
    back = load_model(tmp_path / "shared")
    assert back.checks.get("permute heads").passed is None
    assert back.adapter.refusal("permute_heads") == loaded.adapter.refusal("permute_heads")


def test_codegen_reads_query_value_key_and_inference_finds_it():
    """CodeGen's fused qkv_proj holds, per chunk, query, *value*, key. Permutations cannot tell
    keys from values; the value-rows check can, and inference settles on the reading it allows."""
    config = transformers.CodeGenConfig(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128, rotary_dim=4)
    torch.manual_seed(0)
    model = transformers.CodeGenForCausalLM(config).eval()
    adapter, checks = prove(model, adapter_for(model))
    layout = adapter.fused[adapter.linears["value"]]
    assert layout.per_head and layout.roles.index("value") == 1  # q v k per head
    assert checks.get("value rows").passed and checks.get("permute heads").passed
