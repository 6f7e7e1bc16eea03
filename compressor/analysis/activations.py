"""Activation similarity on calibration text: CKA, angular distance and Block Influence.

The hidden state a block writes to the residual stream is captured with forward hooks (not
``output_hidden_states``, whose last entry already has the final norm applied in decoders).
Only real tokens count: padding is dropped with the attention mask.

* Linear CKA (Kornblith et al., 2019) between the outputs of layers i and j, over tokens.
* Mean angular distance ``arccos(cos(h_i, h_j)) / pi`` between the outputs of layers i and j,
  token by token (Gromov et al., 2024).
* Block Influence of layer i: ``1 - mean cos(input_i, output_i)`` (ShortGPT, Men et al., 2024);
  low means the layer barely changes its input, so it is a candidate for removal.

Massive activations (Sun et al., 2024): in many decoders the first token (an attention sink)
carries a hidden state whose norm is hundreds of times the median (about 25,000 against 150 in
SmolLM2-135M). One such token dominates every centred Gram matrix, so linear CKA between any two
layers that carry it reads 1.0000 whatever else they compute. Tokens whose norm exceeds
`MASSIVE_FACTOR` times the layer's median, at any layer, are left out of all three measures and
counted in `BlockOutputs.left_out`; where there are none (encoders such as MiniLM), nothing changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models.block_outputs import MASSIVE_FACTOR, BlockOutputs, collect_block_outputs, massive_tokens

__all__ = ["MASSIVE_FACTOR", "BlockOutputs", "angular_distance", "collect_block_outputs", "linear_cka", "massive_tokens"]


#: Below this many multiply-adds (layer pairs x width^2 x tokens) CKA's products are taken in
#: float64 (MiniLM: 2e10, a few seconds). Above it (a 24-layer, 2048-wide model on 4,096 tokens:
#: 5e12, minutes in float64) the products are float32, summed in float64: CKA moves by about
#: 1e-6, under the sampling error of the tokens.
FLOAT64_WORK = 2e11


def _centered(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x = x.float()
    return (x - x.mean(0, keepdim=True)).to(dtype)


def linear_cka(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of representations (same tokens, rows), one pair of layers
    at a time (two layers' float copies beside the captured outputs, not all of them)."""
    n = len(outputs)
    tokens, width = outputs[0].shape
    work = n * (n - 1) / 2 * min(width, tokens) ** 2 * max(width, tokens)
    dtype = torch.float64 if work <= FLOAT64_WORK else torch.float32
    cka = torch.eye(n, dtype=torch.float64)

    def norm(m: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(m.double())

    if width <= tokens:
        # ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F), in feature space (cheap when width <= tokens)
        self_norm = []
        for x in outputs:
            c = _centered(x, dtype)
            self_norm.append(norm(c.t() @ c))
        for i in range(n):
            ci = _centered(outputs[i], dtype)
            for j in range(i + 1, n):
                hsic = norm(ci.t() @ _centered(outputs[j], dtype)) ** 2
                cka[i, j] = cka[j, i] = hsic / (self_norm[i] * self_norm[j])
    else:
        # Same quantity through the token Gram matrices <XX^T, YY^T>_F (cheap when tokens < width;
        # tokens x tokens each).
        grams = []
        for x in outputs:
            c = _centered(x, dtype)
            grams.append(c @ c.t())
        self_norm = [norm(g) for g in grams]
        for i in range(n):
            for j in range(i + 1, n):
                cka[i, j] = cka[j, i] = (grams[i].double() * grams[j].double()).sum() / (self_norm[i] * self_norm[j])
    # A layer whose output does not vary over tokens has no CKA with anything: call it 0.
    return torch.nan_to_num(cka, nan=0.0).float()


def angular_distance(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean angular distance ``arccos(cos) / pi`` between every pair, token by token (0 = same
    direction), one pair of layers at a time."""
    n = len(outputs)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        ui = F.normalize(outputs[i].double(), dim=-1)
        for j in range(i + 1, n):
            cos = (ui * F.normalize(outputs[j].double(), dim=-1)).sum(-1).clamp(-1.0, 1.0)
            dist[i, j] = dist[j, i] = (torch.arccos(cos) / math.pi).mean()
    return dist.float()
