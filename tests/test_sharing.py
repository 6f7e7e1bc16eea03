"""Layer sharing: invariants on tiny models of every family, the checkpoint, and bad plans."""

import json

import pytest
import torch
from tiny_models import FAMILIES

from compressor.errors import ConfigError
from compressor.models import load_model, unique_parameters
from compressor.models.shared import SharedLinear
from compressor.sharing import ShareConfig, load_checkpoint, parse_plan, save_checkpoint, share

IDS = torch.randint(5, 60, (3, 13), generator=torch.Generator().manual_seed(0))


def outputs(loaded):
    with torch.no_grad():
        out = loaded.model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def shared_config(**kw):
    return ShareConfig(**{"fidelity": False, **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_equal_layers_is_the_identity(tiny_dirs, family):
    loaded = load_model(tiny_dirs[family])
    before = outputs(loaded)
    loaded, record = share(loaded, shared_config(plan="0,1,2,3", lora_rank=4))
    assert torch.equal(outputs(loaded), before)
    assert record.params_after == record.params_before
    assert not any(isinstance(m, SharedLinear) for m in loaded.model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_svd_lora_reproduces_the_original(tiny_dirs, family):
    loaded = load_model(tiny_dirs[family])
    before = outputs(loaded)
    # full rank for every matrix; smaller ones (grouped-query K/V) are capped at their size
    g = loaded.geometry
    rank = min(g.hidden_size, g.intermediate_size)
    loaded, record = share(loaded, shared_config(plan="0-1,2-3", lora_rank=rank))
    torch.testing.assert_close(outputs(loaded), before, rtol=1e-5, atol=1e-5)
    kept = [v for layer in record.metrics["lora_energy_kept"].values() for v in layer.values()]
    assert min(kept) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("init", ["aligned-mean", "mean", "first"])
def test_sharing_is_real(tiny_dirs, family, init):
    loaded = load_model(tiny_dirs[family])
    adapter = loaded.adapter
    loaded, record = share(loaded, shared_config(plan="0-2,3", init=init))
    blocks = adapter.blocks(loaded.model)
    for path in record.metrics["shared_modules"]:
        a, b, c, d = (blk.get_submodule(path) for blk in blocks)
        assert isinstance(a, SharedLinear) and a.weight is b.weight is c.weight
        assert a.bias is None or not torch.equal(a.bias, b.bias)  # biases stay per layer, with their own values
        assert not isinstance(d, SharedLinear)  # singleton group stays dense
    for norm in adapter.norms:  # norms stay per layer (ModernBERT's first block has none before attention)
        a, b = (getattr(blocks[i].get_submodule(norm), "weight", None) for i in (1, 2))
        assert a is not None and a is not b
    # two of three copies of every shared matrix are gone
    per_layer = sum(adapter.weight(blocks[3], r, loaded.geometry).numel() for r in adapter.roles)
    assert record.params_before - record.params_after == 2 * per_layer
    assert unique_parameters(loaded.model)[0] == record.params_after


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_aligned_mean_of_a_permuted_copy_is_exact(tiny_dirs, family):
    """Layer 1 := permuted layer 0. Aligned mean recovers layer 0 exactly; plain mean does not."""
    from test_alignment import random_permutation

    from compressor.adapters.alignment import permute_weights

    results = {}
    for init in ("aligned-mean", "mean"):
        loaded = load_model(tiny_dirs[family])
        adapter, g = loaded.adapter, loaded.geometry
        blocks = adapter.blocks(loaded.model)
        w, b = adapter.block_weights(blocks[0], g)
        adapter.load_block_weights(blocks[1], *permute_weights(w, b, random_permutation(g, 5), g), g)
        # biases and norms too, so that layer 1 computes exactly what layer 0 does
        for name, p in blocks[0].named_parameters():
            if p.dim() == 1 and name.split(".")[-2] in {n.split(".")[-1] for n in adapter.norms}:
                blocks[1].get_parameter(name).data.copy_(p)
        dense = outputs(loaded)
        loaded, _ = share(loaded, shared_config(plan="0-1,2,3", init=init))
        results[init] = (outputs(loaded) - dense).abs().max().item()
    assert results["aligned-mean"] < 1e-5
    assert results["mean"] > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical_and_bytes_on_disk(tiny_dirs, family, tmp_path):
    loaded = load_model(tiny_dirs[family])
    loaded, record = share(loaded, shared_config(plan="0-1,2-3", lora_rank=3))
    folder = save_checkpoint(loaded, tmp_path / "ckpt")
    manifest = json.loads((folder / "compress.json").read_text())
    assert manifest["sharing"]["plan"] == [[0, 1], [2, 3]] and manifest["format_version"] == 1
    reloaded = load_model(folder)
    assert torch.equal(outputs(reloaded), outputs(loaded))
    blocks = reloaded.adapter.blocks(reloaded.model)
    path = manifest["sharing"]["modules"][0]
    assert blocks[0].get_submodule(path).weight is blocks[1].get_submodule(path).weight
    params, _ = unique_parameters(reloaded.model)
    assert params == record.params_after
    # every tensor once: the data after the safetensors header is exactly 4 bytes a parameter
    # (on tiny models the header is a large share of the file; on MiniLM see test_real_minilm)
    raw = (folder / "model.safetensors").read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert len(raw) - header == 4 * params
    # the same folder through the public loader
    import compressor

    assert compressor.load(folder).sharing == loaded.sharing
    assert load_checkpoint(folder).pooling == loaded.pooling


def test_share_rejects_a_shared_model(tiny_dirs):
    loaded = load_model(tiny_dirs["bert"])
    loaded, _ = share(loaded, shared_config(plan="0-1,2-3"))
    with pytest.raises(ConfigError, match="already shared"):
        share(loaded, shared_config(plan="0-3"))


def test_share_only_ffn_leaves_attention_dense(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])
    before = outputs(loaded)
    loaded, record = share(loaded, shared_config(plan="0-1,2-3", share="ffn", lora_rank=32))
    assert record.metrics["shared_modules"] == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    torch.testing.assert_close(outputs(loaded), before, rtol=1e-5, atol=1e-5)


def test_fidelity_is_reported(tiny_dirs):
    loaded = load_model(tiny_dirs["gpt2"])
    _, record = share(loaded, ShareConfig(plan="0-3", max_samples=6))
    f = record.metrics["fidelity"]
    assert f["num_texts"] == 6 and len(f["hidden_state_error"]) == 4
    assert 0 < f["next_token_kl"] and -1 <= f["embedding_cosine"] < 1
    assert record.metrics["note"].startswith("Sharing without recovery training")
    identity = load_model(tiny_dirs["gpt2"])
    _, rec = share(identity, ShareConfig(plan="0,1,2,3", max_samples=6))
    assert rec.metrics["fidelity"]["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rec.metrics["fidelity"]["next_token_kl"] == pytest.approx(0.0, abs=1e-7)


def test_plan_from_analysis(tiny_dirs):
    from compressor.pipeline.compose import share as share_after_analysis  # the analysis runs above sharing

    loaded = load_model(tiny_dirs["bert"])
    _, record = share_after_analysis(loaded, ShareConfig(groups=2, max_samples=8, fidelity=False))
    assert len(record.metrics["plan"]) == 2
    assert record.metrics["plan_source"].startswith("best contiguous 2 groups")


def test_groups_from_an_analysis_file_is_the_plan_the_analysis_gives(tiny_dirs, tmp_path):
    from compressor.analysis import AnalyzeConfig, analyze
    from compressor.pipeline.compose import share as share_after_analysis

    _, analysis = analyze(load_model(tiny_dirs["bert"]), AnalyzeConfig(max_samples=8))
    file = tmp_path / "analysis.json"
    file.write_text(json.dumps(analysis.to_dict()))
    _, from_file = share(load_model(tiny_dirs["bert"]), ShareConfig(groups=3, analysis=str(file), fidelity=False))
    _, analyzed = share_after_analysis(load_model(tiny_dirs["bert"]), ShareConfig(groups=3, max_samples=8, fidelity=False))
    assert from_file.metrics["plan"] == analyzed.metrics["plan"] == analysis.metrics["grouping"]["by_groups"]["3"]["groups"]
    assert from_file.metrics["plan_source"] == f"best contiguous 3 groups by cka in {file}"
    with pytest.raises(ConfigError, match="give --analysis"):  # the sharing stage alone runs no analysis
        share(load_model(tiny_dirs["bert"]), ShareConfig(groups=3, fidelity=False))
    with pytest.raises(ConfigError, match="add --groups"):
        ShareConfig(plan="0-3", analysis=str(file))


@pytest.mark.parametrize(
    "plan,message",
    [
        ("0-1,3", "skips layer 2"),
        ("0-2,2-3", "repeats layer 2"),
        ("0-5", "the model has layers 0-3"),
        ("0-1;2-3", "cannot read"),
        ("3-1,0", "cannot read"),
    ],
)
def test_bad_plans(plan, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan(plan, 4)


def test_plan_files(tmp_path):
    f = tmp_path / "plan.json"
    f.write_text("[[0, 1], [3, 2]]")
    assert parse_plan(str(f), 4) == [[0, 1], [2, 3]]
    analysis = tmp_path / "analysis.json"
    analysis.write_text(json.dumps({"metrics": {"grouping": {"recommended": {"groups": [[0], [1, 2, 3]]}}}}))
    assert parse_plan(str(analysis), 4) == [[0], [1, 2, 3]]
    broken = tmp_path / "broken.json"
    broken.write_text("[[0, 1],")
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_plan(str(broken), 4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "give --groups K or --plan"),
        ({"groups": 2, "plan": "0-3"}, "not both"),
        ({"groups": 0}, "at least 1"),
        ({"plan": "0-3", "lora_rank": -1}, "--lora-rank"),
        ({"plan": "0-3", "share": "attention,mlp"}, "unknown sublayer 'mlp'"),
        ({"plan": "0-3", "init": "median"}, "--init"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ShareConfig(**kwargs)


def test_rank_above_matrix_size_and_split_fused_module(tiny_dirs):
    with pytest.raises(ConfigError, match="--lora-rank 33 is above the size of every shared matrix"):
        share(load_model(tiny_dirs["bert"]), shared_config(plan="0-3", lora_rank=33))
    with pytest.raises(ConfigError, match="fuses query, key, value"):
        share(load_model(tiny_dirs["gpt2"]), shared_config(plan="0-3", share="query"))
    with pytest.raises(ConfigError, match="more than the model's 4 layers"):
        share(load_model(tiny_dirs["gpt2"]), shared_config(groups=5))


def test_shared_linear_svd_delta_is_the_best_low_rank_fit():
    from torch import nn

    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=False)
    residual = torch.randn(40, 24)
    layer = SharedLinear(base, torch.randn(40), lora_rank=5, lora_alpha=10.0)
    kept = layer.init_lora_from_residual(residual)
    delta = layer.delta_weight().detach()
    # Eckart-Young: what is not kept is exactly the error of the rank-5 fit
    err = float(((residual - delta) ** 2).sum() / (residual**2).sum())
    assert kept == pytest.approx(1 - err, abs=1e-6)
    assert torch.linalg.matrix_rank(delta) == 5
    s = torch.linalg.svdvals(residual)
    assert kept == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), abs=1e-6)
    x = torch.randn(3, 24)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, base.weight + delta, layer.bias))
    layer.reset_lora()  # plain LoRA: B = 0, the delta starts at zero
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert torch.count_nonzero(layer.lora_A.weight) > 0


def test_a_checkpoint_whose_sharing_manifest_is_corrupt_fails_in_one_line(tiny_dirs, tmp_path):
    import json as json_module

    from compressor.errors import ModelLoadError

    loaded, _ = share(load_model(str(tiny_dirs["bert"])), ShareConfig(plan="0-1,2-3", fidelity=False))
    folder = save_checkpoint(loaded, tmp_path / "ck")
    manifest = json_module.loads((folder / "compress.json").read_text())
    for bad in ({"plan": "0-1"}, ["not", "an", "object"], {"modules": ["attention.self.query"]}):
        manifest["sharing"] = bad
        (folder / "compress.json").write_text(json_module.dumps(manifest))
        with pytest.raises(ModelLoadError, match="names no plan"):
            load_model(str(folder))
