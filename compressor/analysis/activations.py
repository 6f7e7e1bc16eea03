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


def linear_cka(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of representations (same tokens, rows)."""
    centered = [(x - x.mean(0, keepdim=True)).double() for x in outputs]
    n = len(centered)
    tokens, width = centered[0].shape
    cka = torch.eye(n, dtype=torch.float64)
    if width <= tokens:
        # ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F), in feature space (cheap when width <= tokens)
        self_norm = [torch.linalg.matrix_norm(x.t() @ x) for x in centered]
        for i in range(n):
            for j in range(i + 1, n):
                hsic = torch.linalg.matrix_norm(centered[i].t() @ centered[j]) ** 2
                cka[i, j] = cka[j, i] = hsic / (self_norm[i] * self_norm[j])
    else:
        # Same quantity through the token Gram matrices <XX^T, YY^T>_F (cheap when tokens < width).
        grams = [x @ x.t() for x in centered]
        self_norm = [torch.linalg.matrix_norm(g) for g in grams]
        for i in range(n):
            for j in range(i + 1, n):
                cka[i, j] = cka[j, i] = (grams[i] * grams[j]).sum() / (self_norm[i] * self_norm[j])
    # A layer whose output does not vary over tokens has no CKA with anything: call it 0.
    return torch.nan_to_num(cka, nan=0.0).float()


def angular_distance(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Mean angular distance ``arccos(cos) / pi`` between every pair, token by token (0 = same direction)."""
    unit = [F.normalize(x.double(), dim=-1) for x in outputs]
    n = len(unit)
    dist = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            cos = (unit[i] * unit[j]).sum(-1).clamp(-1.0, 1.0)
            dist[i, j] = dist[j, i] = (torch.arccos(cos) / math.pi).mean()
    return dist.float()
