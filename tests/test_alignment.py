"""Permutation alignment: the permutation preserves function, and alignment undoes it."""

import pytest
import torch
from tiny_models import FAMILIES, make_model

from compressor.adapters import get_adapter
from compressor.adapters.alignment import BlockPermutation, find_permutation, permute_weights, restrict, unit_features
from compressor.analysis.weights import weight_similarity


def random_permutation(geometry, seed=0) -> BlockPermutation:
    """A random permutation that moves both neurons and heads (never the identity)."""
    g = torch.Generator().manual_seed(seed)

    def moving(n):
        p = torch.randperm(n, generator=g)
        return p.roll(1) if torch.equal(p, torch.arange(n)) else p

    within = None
    if geometry.heads_per_kv > 1:  # grouped-query attention: shuffle query heads inside groups too
        within = torch.stack([moving(geometry.heads_per_kv) for _ in range(geometry.num_kv_heads)])
    return BlockPermutation(neurons=moving(geometry.intermediate_size), kv_groups=moving(geometry.num_kv_heads),
                            query_within=within)


def allowed(perm, adapter, geometry) -> BlockPermutation:
    """``perm`` limited to the units the family lets move (MPNet keeps its heads in place)."""
    return restrict(perm, geometry, heads=adapter.refusal("permute_heads") is None,
                    neurons=adapter.refusal("permute_neurons") is None)


def model_output(model, ids):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES)
def test_permutation_preserves_function(family):
    model = make_model(family)
    adapter = get_adapter(model)
    geometry = adapter.geometry(model.config)
    ids = torch.randint(5, 60, (2, 11))
    with torch.no_grad():
        before = model_output(model, ids)
        for i, block in enumerate(adapter.blocks(model)):
            w, b = adapter.block_weights(block, geometry)
            perm = allowed(random_permutation(geometry, i), adapter, geometry)
            adapter.load_block_weights(block, *permute_weights(w, b, perm, geometry), geometry)
        after = model_output(model, ids)
    fresh = make_model(family)
    assert not torch.equal(adapter.weight(adapter.blocks(model)[0], "ffn_in", geometry),
                           adapter.weight(adapter.blocks(fresh)[0], "ffn_in", geometry))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_permuted_copy_scores_one_aligned_and_less_raw(family):
    model = make_model(family)
    adapter = get_adapter(model)
    geometry = adapter.geometry(model.config)
    blocks = adapter.blocks(model)
    w, b = adapter.block_weights(blocks[0], geometry)
    perm = allowed(random_permutation(geometry, 7), adapter, geometry)
    adapter.load_block_weights(blocks[1], *permute_weights(w, b, perm, geometry), geometry)

    sim = weight_similarity(model, adapter)
    for role in adapter.roles:
        assert sim["aligned"][role][0][1] == pytest.approx(1.0, abs=1e-5), role
        assert sim["aligned"][role][1][0] == pytest.approx(1.0, abs=1e-5), role
    # Every role moved by the permutation has a raw cosine below 1.
    moved = adapter.roles if adapter.refusal("permute_heads") is None else ("ffn_in", "ffn_out")
    for role in moved:
        assert sim["raw"][role][0][1] < 0.9, role
    # Unrelated random layers stay far apart even after alignment.
    assert sim["aligned_mean"][0][2] < 0.5


def test_find_permutation_recovers_the_inverse():
    model = make_model("llama")
    adapter = get_adapter(model)
    geometry = adapter.geometry(model.config)
    w, b = adapter.block_weights(adapter.blocks(model)[0], geometry)
    perm = random_permutation(geometry, 3)
    permuted, _ = permute_weights(w, b, perm, geometry)
    found = find_permutation(unit_features(w, geometry), unit_features(permuted, geometry))
    # permuted[found] == original  =>  perm[found] == identity
    assert torch.equal(perm.neurons[found.neurons], torch.arange(geometry.intermediate_size))
    assert torch.equal(perm.kv_groups[found.kv_groups], torch.arange(geometry.num_kv_heads))
    assert torch.equal(perm.query_heads(geometry)[found.query_heads(geometry)], torch.arange(geometry.num_heads))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_layer_against_an_exact_copy_scores_one(family):
    """Layer 1 := layer 0 unpermuted: raw and aligned are 1 (the pair, not the diagonal)."""
    model = make_model(family)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    geometry = adapter.geometry(model.config)
    adapter.load_block_weights(blocks[1], *adapter.block_weights(blocks[0], geometry), geometry)
    sim = weight_similarity(model, adapter)
    for role in adapter.roles:
        assert sim["raw"][role][0][1] == pytest.approx(1.0, abs=1e-6)
        assert sim["aligned"][role][0][1] == pytest.approx(1.0, abs=1e-6)


def test_mpnet_heads_really_are_not_permutable():
    """The refusal is not a guess: MPNet's shared per-head bias makes a head permutation change
    the output (the load-time self-check finds the same), while its neurons permute freely."""
    from compressor.adapters.checks import check_permutation

    model = make_model("mpnet")
    with torch.no_grad():  # a trained model's bias is far from zero; random init leaves it small
        model.encoder.relative_attention_bias.weight.normal_(0, 1.0)
    adapter = get_adapter(model)
    g = adapter.geometry(model.config)
    assert adapter.refusal("permute_heads")
    assert check_permutation(model, adapter, g, "heads").passed is False
    assert check_permutation(model, adapter, g, "neurons").passed is True


def permuted_copy(model, adapter, source: int, target: int, seed: int) -> None:
    """Make layer ``target`` a randomly permuted copy of layer ``source``: the same function."""
    geometry = adapter.geometry(model.config)
    blocks = adapter.blocks(model)
    w, b = adapter.block_weights(blocks[source], geometry)
    adapter.load_block_weights(blocks[target], *permute_weights(w, b, random_permutation(geometry, seed), geometry),
                               geometry)


def test_far_pairs_of_a_deep_model_align_a_sample_and_still_find_a_permuted_copy():
    """Past 12 layers, pairs more than 3 apart align a sample of FFN neurons: a permuted copy
    14 layers away still scores 1, unrelated layers stay low, and the result says which is which."""
    from compressor.analysis import weights as W

    model = make_model("llama", num_hidden_layers=16, intermediate_size=W.SAMPLED_NEURONS * 2)
    adapter = get_adapter(model)
    permuted_copy(model, adapter, 0, 14, seed=5)

    sim = weight_similarity(model, adapter)
    assert sim["alignment"] == {"exact_within": 3, "exact_pairs": 15 + 14 + 13, "sampled_pairs": 120 - 42,
                                "sampled_neurons": W.SAMPLED_NEURONS, "near_sampled_neurons": 0}
    for role in adapter.roles:
        assert sim["aligned"][role][0][14] == pytest.approx(1.0, abs=1e-5), role
    assert sim["aligned_mean"][0][10] < 0.5 and sim["aligned_mean"][1][2] < 0.5
    exact = weight_similarity(model, adapter, exact_within=15)
    assert exact["alignment"]["sampled_pairs"] == 0
    # the estimate is close to the exact solve on unrelated layers too
    assert abs(sim["aligned_mean"][2][12] - exact["aligned_mean"][2][12]) < 0.05


def test_a_wide_ffn_samples_near_pairs_too_and_a_permuted_neighbour_still_scores_1(monkeypatch):
    """An FFN wider than EXACT_NEURONS aligns a sample on near pairs as well (the 8,192-wide
    solves of a 1.7 B model are 7 s each): a permuted copy next door still scores 1, and the
    result says the near pairs were sampled."""
    from compressor.analysis import weights as W

    monkeypatch.setattr(W, "EXACT_NEURONS", 64)
    monkeypatch.setattr(W, "NEAR_SAMPLED_NEURONS", 32)
    model = make_model("llama", num_hidden_layers=4, intermediate_size=128)
    adapter = get_adapter(model)
    permuted_copy(model, adapter, 1, 2, seed=3)
    sim = weight_similarity(model, adapter)
    assert sim["alignment"] == {"exact_within": 3, "exact_pairs": 0, "sampled_pairs": 6, "sampled_neurons": 0,
                                "near_sampled_neurons": 32}
    for role in adapter.roles:
        assert sim["aligned"][role][1][2] == pytest.approx(1.0, abs=1e-5), role
    assert sim["aligned_mean"][0][3] < 0.5


def test_a_large_model_pair_by_pair_gives_what_the_cached_path_gives_and_bf16_is_close(monkeypatch):
    """The path for models too large to cache (two layers' float32 copies at a time, one pair
    at a time) computes the same numbers as the cached one; a bf16 copy of the model reads
    within bf16's rounding of the float32 numbers."""
    from compressor.analysis import weights as W

    model = make_model("llama", num_hidden_layers=5)
    adapter = get_adapter(model)
    cached = weight_similarity(model, adapter)
    with monkeypatch.context() as m:
        m.setattr(W, "FEATURE_CACHE_NUMBERS", 0)
        assert weight_similarity(model, adapter) == cached
    # sampled near and far pairs too (a wide FFN on a deep model), streamed as cached
    deep = make_model("llama", num_hidden_layers=14, intermediate_size=128)
    with monkeypatch.context() as m:
        m.setattr(W, "EXACT_NEURONS", 64)
        m.setattr(W, "NEAR_SAMPLED_NEURONS", 48)
        m.setattr(W, "SAMPLED_NEURONS", 16)
        whole = weight_similarity(deep, get_adapter(deep))
        m.setattr(W, "FEATURE_CACHE_NUMBERS", 0)
        streamed = weight_similarity(deep, get_adapter(deep))
    assert streamed["alignment"] == whole["alignment"] and whole["alignment"]["sampled_neurons"] == 16
    for key in ("raw", "aligned"):
        for role in adapter.roles:
            assert torch.allclose(torch.tensor(streamed[key][role]), torch.tensor(whole[key][role]), atol=1e-6), role
    half = weight_similarity(model.to(torch.bfloat16), adapter)
    for key in ("raw_mean", "aligned_mean"):
        assert torch.allclose(torch.tensor(half[key]), torch.tensor(cached[key]), atol=2e-2), key
