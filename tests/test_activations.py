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
    captured = collect_block_outputs(loaded, texts, max_tokens=10_000)
    outputs, bi, tokens = captured.outputs, captured.block_influence, captured.num_tokens
    assert bi[2] == pytest.approx(0.0, abs=1e-6)
    assert all(bi[i] > 1e-3 for i in (0, 1, 3))
    # only real tokens are kept: [CLS] + characters + [SEP] per text
    assert tokens == sum(len(t) + 2 for t in texts)
    assert all(o.shape == (tokens, 32) for o in outputs)
    # layer 2 passes layer 1's output on unchanged
    assert torch.allclose(outputs[1], outputs[2], atol=1e-6)


def _sink(module, args, kwargs, output):
    """Give the first token a massive hidden state, as attention sinks in real decoders have."""
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = hidden.clone()
    hidden[:, 0] *= 1000.0
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def test_a_massive_first_token_is_left_out_and_no_longer_makes_every_layer_alike(monkeypatch):
    from compressor.models import block_outputs  # where the capture and its factor live

    model = make_model("llama")
    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        block.register_forward_hook(_sink, with_kwargs=True)
    loaded = LoadedModel(model, make_tokenizer(), adapter, "tiny-llama")
    texts = ["the cat sat on the mat", "a longer sentence, padded less", "short one here", "and a fourth"]
    captured = collect_block_outputs(loaded, texts, max_tokens=10_000)
    assert captured.left_out["tokens"] == len(texts) and captured.left_out["first_position"] == len(texts)
    assert captured.left_out["max_norm_ratio"] > 100 and captured.left_out["layers"] == [0, 1, 2, 3]
    assert all(o.shape[0] == captured.num_tokens - len(texts) for o in captured.outputs)
    robust = linear_cka(captured.outputs)

    monkeypatch.setattr(block_outputs, "MASSIVE_FACTOR", float("inf"))  # the sinks left in
    naive = linear_cka(collect_block_outputs(loaded, texts, max_tokens=10_000).outputs)
    off = ~torch.eye(4, dtype=torch.bool)
    assert float(naive[off].min()) > 0.9999  # with the sink in, every pair looks the same
    assert float(robust[off].min()) < 0.99  # without it, layers far apart differ


def test_nothing_is_left_out_of_an_encoder_without_massive_activations():
    model = make_model("bert")
    loaded = LoadedModel(model, make_tokenizer(), get_adapter(model), "tiny-bert")
    captured = collect_block_outputs(loaded, ["the cat sat on the mat", "another text"], max_tokens=10_000)
    assert captured.left_out["tokens"] == 0 and captured.left_out["layers"] == []
