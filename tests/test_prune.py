"""Structured pruning on tiny models of every family: shapes, config, sharing, invariants."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from tiny_models import FAMILIES, by_family

import compressor
from cli.main import cli
from compressor.errors import ConfigError, UnsupportedModelError
from compressor.models.shared import SharedLinear
from compressor.pruning import PruneConfig, prune
from compressor.sharing import ShareConfig, save_checkpoint, share

TEXTS = ["the quick brown fox jumps over the lazy dog.", "pruning keeps what matters; 42 is the answer!"] * 4


def outputs(loaded, texts=TEXTS):
    enc = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def check_config_matches_shapes(loaded):
    """Every linear has the shape the config says, and a model built from the config loads the weights."""
    g = loaded.geometry
    adapter = loaded.adapter
    for block in adapter.blocks(loaded.model):
        assert adapter.weight(block, "query", g).shape == (g.num_heads * g.head_dim, g.hidden_size)
        assert adapter.weight(block, "key", g).shape == (g.num_kv_heads * g.head_dim, g.hidden_size)
        assert adapter.weight(block, "attn_out", g).shape == (g.hidden_size, g.num_heads * g.head_dim)
        assert adapter.weight(block, "ffn_in", g).shape == (g.intermediate_size, g.hidden_size)
        assert adapter.weight(block, "ffn_out", g).shape == (g.hidden_size, g.intermediate_size)
    assert len(adapter.blocks(loaded.model)) == loaded.config.num_hidden_layers == g.num_layers


@pytest.mark.parametrize("family", by_family(sorted(FAMILIES)))
@pytest.mark.parametrize("shared", [False, True], ids=["dense", "shared"])
def test_pruned_config_matches_shapes_and_reloads(family, shared, tiny_dirs, tmp_path):
    loaded = compressor.load(str(tiny_dirs[family]))
    if shared:
        loaded, _ = share(loaded, ShareConfig(plan="0-1,2-3", lora_rank=4, fidelity=False))
    before = loaded.geometry
    # what a family cannot prune is refused in one line before anything changes
    heads = 0.0 if loaded.adapter.refusal("prune_heads") else 0.5
    layers = 0 if loaded.adapter.refusal("drop_layers") else 1
    if not heads:
        with pytest.raises(UnsupportedModelError, match=f"{loaded.adapter.family} models cannot prune attention heads: "):
            prune(loaded, PruneConfig(heads=0.5, data=None))
    if not layers:
        with pytest.raises(UnsupportedModelError, match=f"{loaded.adapter.family} models cannot drop layers: "):
            prune(loaded, PruneConfig(drop_layers=1, data=None))
    assert loaded.geometry == before
    loaded, record = prune(loaded, PruneConfig(heads=heads, ffn=0.5, drop_layers=layers, data=None))
    g = loaded.geometry
    assert g.num_layers == before.num_layers - layers
    if heads:
        assert g.num_kv_heads == before.num_kv_heads // 2 and g.num_heads == before.num_heads // 2
    assert g.head_dim == before.head_dim and g.intermediate_size == before.intermediate_size // 2
    check_config_matches_shapes(loaded)
    assert record.params_after < record.params_before
    # save -> reload rebuilds the same shapes from the config and gives the same outputs
    save_checkpoint(loaded, tmp_path / "pruned")
    back = compressor.load(str(tmp_path / "pruned"))
    check_config_matches_shapes(back)
    torch.testing.assert_close(outputs(back), outputs(loaded), atol=1e-5, rtol=1e-5)


def test_shared_group_is_pruned_once(tiny_dirs):
    loaded = compressor.load(str(tiny_dirs["bert"]))
    loaded, _ = share(loaded, ShareConfig(plan="0-1,2-3", lora_rank=4, fidelity=False))
    loaded, record = prune(loaded, PruneConfig(heads=0.5, ffn=0.25, fidelity=False))
    blocks = loaded.adapter.blocks(loaded.model)
    for a, b in ((0, 1), (2, 3)):
        q_a = loaded.adapter.linear(blocks[a], "query")
        q_b = loaded.adapter.linear(blocks[b], "query")
        assert isinstance(q_a, SharedLinear) and q_a.base_layer.weight is q_b.base_layer.weight
        assert q_a.base_layer.weight.shape == (16, 32)  # 2 of 4 heads of size 8
        assert record.metrics["kept_heads"][str(a)] == record.metrics["kept_heads"][str(b)]
        assert q_a.lora_B.weight.shape == (16, 4) and q_a.bias.shape == (16,)
    assert loaded.config.pruned_heads[0] == loaded.config.pruned_heads[1]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("score", ["taylor", "magnitude"])
def test_dead_units_go_first_and_removing_them_changes_nothing(family, score, tiny_dirs):
    """A head whose output columns are zero and FFN neurons whose down-projection columns are
    zero contribute nothing; both scores rank them last and cutting them is exact."""
    loaded = compressor.load(str(tiny_dirs[family]))
    adapter, g = loaded.adapter, loaded.geometry
    unit = g.heads_per_kv * g.head_dim  # query-space columns of one attention unit
    with torch.no_grad():
        for block in adapter.blocks(loaded.model):
            adapter.weight(block, "attn_out", g)[:, unit : 2 * unit] = 0  # unit 1 is dead
            adapter.weight(block, "ffn_out", g)[:, :16] = 0  # neurons 0..15 are dead
    before = outputs(loaded)
    kv = g.num_kv_heads
    loaded, record = prune(loaded, PruneConfig(heads=1 / kv, ffn=0.25, score=score, fidelity=False))
    for kept in record.metrics["kept_heads"].values():
        assert 1 not in kept
    assert loaded.geometry.intermediate_size == 48
    for block in adapter.blocks(loaded.model):  # the dead neurons are the ones that went
        assert bool((adapter.weight(block, "ffn_out", g).abs().sum(0) > 0).all())
    torch.testing.assert_close(outputs(loaded), before, atol=1e-5, rtol=1e-5)


def test_drop_layers_removes_lowest_block_influence_and_renumbers_sharing(tiny_dirs):
    loaded = compressor.load(str(tiny_dirs["llama"]))
    loaded, _ = share(loaded, ShareConfig(plan="0-1,2-3", lora_rank=2, fidelity=False))
    loaded, record = prune(loaded, PruneConfig(drop_layers=1))
    influence = record.metrics["block_influence"]
    dropped = record.metrics["dropped_layers"]
    assert dropped == [min(range(4), key=influence.__getitem__)]
    plan = loaded.sharing.plan
    assert sorted(i for g in plan for i in g) == [0, 1, 2]
    lone = [g for g in plan if len(g) == 1][0][0]
    # the member left alone has dense weights again (shared weight + its delta)
    assert not isinstance(loaded.adapter.linear(loaded.adapter.blocks(loaded.model)[lone], "query"), SharedLinear)
    assert [b.self_attn.layer_idx for b in loaded.adapter.blocks(loaded.model)] == [0, 1, 2]
    assert record.metrics["fidelity"]["hidden_state_error"] is None  # layer counts differ


def test_lora_rank_above_pruned_width_is_recapped_exactly(tiny_dirs, tmp_path):
    loaded = compressor.load(str(tiny_dirs["bert"]))
    loaded, _ = share(loaded, ShareConfig(plan="0-1,2-3", lora_rank=24, fidelity=False))
    before = outputs(loaded)
    # only heads are cut: FFN untouched, and the query's rank 24 > 16 rows must shrink to 16
    loaded, _ = prune(loaded, PruneConfig(heads=0.5, fidelity=False))
    q = loaded.adapter.linear(loaded.adapter.blocks(loaded.model)[0], "query")
    assert q.lora_rank == 16
    save_checkpoint(loaded, tmp_path / "p")
    back = compressor.load(str(tmp_path / "p"))
    torch.testing.assert_close(outputs(back), outputs(loaded), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outputs(loaded), before)


@pytest.mark.parametrize("bad", [{"heads": 1.0}, {"ffn": -0.1}, {"heads": 1.5}, {"drop_layers": -1}, {}])
def test_bad_ratios_are_config_errors(bad):
    with pytest.raises(ConfigError):
        PruneConfig(**bad)


def test_drop_all_layers_is_an_error(tiny_dirs):
    with pytest.raises(ConfigError, match="no layer"):
        prune(compressor.load(str(tiny_dirs["bert"])), PruneConfig(drop_layers=4))


def test_cli_prune_writes_checkpoint_and_refuses_bad_input(tiny_dirs, tmp_path):
    runner = CliRunner()
    out = tmp_path / "pruned"
    res = runner.invoke(cli, ["prune", str(tiny_dirs["bert"]), "--ffn", "0.5", "--heads", "0.25", "-o", str(out),
                              "--json", "-"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["metrics"]["geometry_after"]["ffn"] == 32
    assert (out / "prune_report.md").is_file() and (out / "compress.json").is_file()
    assert compressor.load(str(out)).geometry.num_heads == 3
    # exists without --overwrite; ratio out of range: one line, exit 2, nothing written
    for args in (["-o", str(out), "--ffn", "0.5"], ["-o", str(tmp_path / "new"), "--ffn", "1.2"]):
        res = runner.invoke(cli, ["prune", str(tiny_dirs["bert"]), *args])
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "new").exists()


def test_mpnet_heads_go_from_every_layer_and_the_shared_bias_is_sliced_once(tiny_dirs, tmp_path):
    """MPNet's one (buckets, heads) relative bias is read by every layer, so a head goes from
    every layer at once, chosen by its importance summed over the layers; the pruned model
    computes what the original computes with those heads' output columns zeroed, and a reload
    rebuilds the sliced bias from config.pruned_heads."""
    loaded = compressor.load(str(tiny_dirs["mpnet"]))
    adapter, g = loaded.adapter, loaded.geometry
    bias = loaded.model.encoder.relative_attention_bias
    with torch.no_grad():
        bias.weight.copy_(2.0 * torch.randn_like(bias.weight))  # each head its own position bias
        blocks = adapter.blocks(loaded.model)
        # head 2 writes nothing in layers 0-2, head 1 nothing in layer 3: summed over the
        # layers, head 2 matters least although layer 3 alone would cut head 1
        for layer, head in ((0, 2), (1, 2), (2, 2), (3, 1)):
            adapter.weight(blocks[layer], "attn_out", g)[:, head * g.head_dim:(head + 1) * g.head_dim] = 0
    expected = copy.deepcopy(loaded.model)
    with torch.no_grad():  # what the pruned model must compute: head 2 silent everywhere
        for block in adapter.blocks(expected):
            adapter.weight(block, "attn_out", g)[:, 2 * g.head_dim:3 * g.head_dim] = 0
    texts_out = outputs(loaded)
    loaded, record = prune(loaded, PruneConfig(heads=0.25, fidelity=False))
    assert record.metrics["kept_heads"] == {str(i): [0, 1, 3] for i in range(4)}
    assert loaded.config.pruned_heads == {i: [2] for i in range(4)}
    assert tuple(loaded.model.encoder.relative_attention_bias.weight.shape) == (32, 3)
    check_config_matches_shapes(loaded)
    pruned_out = outputs(loaded)
    with torch.no_grad():
        enc = loaded.tokenizer(TEXTS, padding=True, return_tensors="pt")
        want = expected(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(pruned_out, want, atol=1e-5, rtol=1e-5)
    assert (pruned_out - texts_out).abs().max() > 1e-3  # head 2 of layer 3 did matter
    save_checkpoint(loaded, tmp_path / "pruned")
    back = compressor.load(str(tmp_path / "pruned"))
    assert tuple(back.model.encoder.relative_attention_bias.weight.shape) == (32, 3)
    torch.testing.assert_close(outputs(back), pruned_out, atol=1e-6, rtol=1e-6)
    # pruned again from the reload: the numbering of config.pruned_heads stays the original's
    again, _ = prune(back, PruneConfig(heads=0.34, fidelity=False))
    assert again.geometry.num_heads == 2 and again.model.encoder.relative_attention_bias.weight.shape[1] == 2
    assert len({tuple(v) for v in again.config.pruned_heads.values()}) == 1 and 2 in again.config.pruned_heads[0]
    save_checkpoint(again, tmp_path / "again")
    torch.testing.assert_close(outputs(compressor.load(str(tmp_path / "again"))), outputs(again), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("option", "share", "what"), [("heads", 0.9, "4 attention heads"),
                                                     ("ffn", 0.995, "64 FFN neurons")])
def test_removing_every_unit_of_a_layer_is_refused_up_front(option, share, what, tiny_dirs):
    loaded = compressor.load(str(tiny_dirs["bert"]))
    with pytest.raises(ConfigError, match=f"--{option} {share} would remove all {what} of every layer; at most"):
        prune(loaded, PruneConfig(**{option: share}, fidelity=False))
    assert loaded.geometry.num_heads == 4 and loaded.geometry.intermediate_size == 64
