"""CKA, angular distance and Block Influence."""

import math

import pytest
import torch

from compressor.analysis.activations import angular_distance, collect_block_outputs, linear_cka
from compressor.models import LoadedModel
from compressor.adapters import get_adapter
from tiny_models import make_model, make_tokenizer


def test_cka_invariances_and_both_paths_agree():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    unrelated = torch.randn(200, 16)
    cka = linear_cka([x, 3.0 * x @ q + 1.0, unrelated])  # rotation, scale and shift: same
    assert cka[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert cka[0, 0] == 1.0
    assert cka[0, 2] < 0.3
    # the token-Gram path (tokens < width) gives the same numbers as the feature path
    wide = [torch.randn(20, 64) for _ in range(3)]
    wide.append(wide[0] @ torch.linalg.qr(torch.randn(64, 64))[0])
    a = linear_cka(wide)  # 20 tokens < 64 features: token-Gram path
    b = linear_cka([torch.cat([w] * 4) for w in wide])  # 80 tokens >= 64: feature path; repeats leave CKA unchanged
    assert a[0, 3] == pytest.approx(1.0, abs=1e-5)
    # compare with the textbook formula on one pair
    xc, yc = wide[0] - wide[0].mean(0), wide[1] - wide[1].mean(0)
    textbook = (xc.t() @ yc).norm() ** 2 / ((xc.t() @ xc).norm() * (yc.t() @ yc).norm())
    assert a[0, 1] == pytest.approx(float(textbook), abs=1e-5)
    assert torch.allclose(a, b)


def test_angular_distance_extremes():
    x = torch.randn(50, 8)
    d = angular_distance([x, x * 2.0, -x])
    assert d[0, 1] == pytest.approx(0.0, abs=1e-6)
    assert d[0, 2] == pytest.approx(1.0, abs=1e-6)
    orth = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert angular_distance(list(orth))[0, 1] == pytest.approx(0.5)
    assert math.isclose(float(angular_distance([x, x])[1, 0]), 0.0, abs_tol=1e-6)


def test_block_influence_of_a_skipped_layer_is_zero():
    """A pre-norm block with zeroed output projections passes its input through: BI = 0."""
    model = make_model("llama")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[2]
    with torch.no_grad():
        adapter.linear(block, "attn_out").weight.zero_()
        adapter.linear(block, "ffn_out").weight.zero_()
    loaded = LoadedModel(model, make_tokenizer(), adapter, "tiny-llama")
    texts = ["the cat sat on the mat", "a longer sentence, padded less", "short"]
    outputs, bi, tokens = collect_block_outputs(loaded, texts, max_tokens=10_000)
    assert bi[2] == pytest.approx(0.0, abs=1e-6)
    assert all(bi[i] > 1e-3 for i in (0, 1, 3))
    # only real tokens are kept: [CLS] + characters + [SEP] per text
    assert tokens == sum(len(t) + 2 for t in texts)
    assert all(o.shape == (tokens, 32) for o in outputs)
    # layer 2 passes layer 1's output on unchanged
    assert torch.allclose(outputs[1], outputs[2], atol=1e-6)
