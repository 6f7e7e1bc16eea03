"""The analysis on the real bundled all-MiniLM-L6-v2 shows what was measured on it before (README, reports/)."""

import pytest

from compressor.analysis import AnalyzeConfig, analyze
from compressor.models import load_model


@pytest.fixture(scope="module")
def minilm_analysis():
    loaded = load_model(None)
    _, record = analyze(loaded, AnalyzeConfig(groups=3, max_samples=32))
    return record.metrics


def test_raw_weight_cosine_is_near_zero_and_alignment_raises_it(minilm_analysis):
    w = minilm_analysis["weights"]
    for i in range(5):
        for role in w["sublayers"]:
            assert abs(w["raw"][role][i][i + 1]) < 0.05, (role, i)
        # FFN neurons matched by the Hungarian algorithm: about 0.2-0.3, as measured
        assert 0.12 < w["aligned"]["ffn_in"][i][i + 1] < 0.4
        assert 0.12 < w["aligned"]["ffn_out"][i][i + 1] < 0.4
        assert w["aligned_mean"][i][i + 1] > w["raw_mean"][i][i + 1] + 0.03


def test_activations_are_similar_and_last_layer_stands_out(minilm_analysis):
    assert minilm_analysis["activations"]["left_out"]["tokens"] == 0  # no massive activations: nothing changes
    a = minilm_analysis["activations"]
    cka_adjacent = [a["cka"][i][i + 1] for i in range(5)]
    assert all(c > 0.85 for c in cka_adjacent[:4])
    assert cka_adjacent[4] < min(cka_adjacent[:4])  # the last layer changes its input most
    assert a["block_influence"][5] == max(a["block_influence"])
    assert minilm_analysis["removable_layers"][0]["layer"] != 5
    grouping = minilm_analysis["grouping"]
    assert len(grouping["recommended"]["groups"]) == 3
    assert 0.8 < grouping["recommended"]["score"] < 1.0


@pytest.mark.slow  # shares and reloads the real MiniLM
def test_share_minilm_three_groups_checkpoint(tmp_path):
    import torch

    from compressor.models import unique_parameters
    from compressor.sharing import ShareConfig, save_checkpoint, share

    loaded, record = share(load_model(None), ShareConfig(plan="0-1,2-3,4-5", lora_rank=8, max_samples=16))
    assert record.params_before == 22_713_216
    # 3 of 6 copies of every attention and FFN matrix are gone, the LoRA factors are added
    per_layer = 4 * 384 * 384 + 2 * 384 * 1536
    assert record.params_after == record.params_before - 3 * per_layer + record.metrics["lora_params"]
    # without recovery training the quality drop is large (README: recovery), and the record says so
    assert record.metrics["fidelity"]["embedding_cosine"] < 0.8
    assert "compress finetune" in record.metrics["note"]
    folder = save_checkpoint(loaded, tmp_path / "minilm-shared")
    weights = (folder / "model.safetensors").stat().st_size
    params, _ = unique_parameters(loaded.model)
    assert 4 * params <= weights <= 1.02 * 4 * params
    others = sum(p.stat().st_size for p in folder.iterdir() if p.name != "model.safetensors")
    total = weights + others
    assert total <= 1.02 * (4 * params + others)
    reloaded = load_model(folder)
    enc = loaded.tokenizer(["sharing keeps one copy", "of each weight"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = loaded.model(**enc).last_hidden_state
        b = reloaded.model(**enc).last_hidden_state
    assert torch.equal(a, b)
