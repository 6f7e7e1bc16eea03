"""The analysis on the real bundled all-MiniLM-L6-v2 shows what FACTS.md measured."""

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
        # FFN neurons matched by the Hungarian algorithm: about 0.2-0.3 (FACTS.md)
        assert 0.12 < w["aligned"]["ffn_in"][i][i + 1] < 0.4
        assert 0.12 < w["aligned"]["ffn_out"][i][i + 1] < 0.4
        assert w["aligned_mean"][i][i + 1] > w["raw_mean"][i][i + 1] + 0.03


def test_activations_are_similar_and_last_layer_stands_out(minilm_analysis):
    a = minilm_analysis["activations"]
    cka_adjacent = [a["cka"][i][i + 1] for i in range(5)]
    assert all(c > 0.85 for c in cka_adjacent[:4])
    assert cka_adjacent[4] < min(cka_adjacent[:4])  # the last layer changes its input most
    assert a["block_influence"][5] == max(a["block_influence"])
    assert minilm_analysis["removable_layers"][0]["layer"] != 5
    grouping = minilm_analysis["grouping"]
    assert len(grouping["recommended"]["groups"]) == 3
    assert 0.8 < grouping["recommended"]["score"] < 1.0
