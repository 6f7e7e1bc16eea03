"""Activation similarity on calibration text: CKA, angular distance and Block Influence.

The hidden state a block writes to the residual stream is captured with forward hooks (not
``output_hidden_states``, whose last entry already has the final norm applied in decoders).
Only real tokens count: padding is dropped with the attention mask.

* Linear CKA (Kornblith et al., 2019) between the outputs of layers i and j, over tokens.
* Mean angular distance ``arccos(cos(h_i, h_j)) / pi`` between the outputs of layers i and j,
  token by token (Gromov et al., 2024).
* Block Influence of layer i: ``1 - mean cos(input_i, output_i)`` (ShortGPT, Men et al., 2024);
  low means the layer barely changes its input, so it is a candidate for removal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.text import fit_length
from ..errors import ConfigError


#: Fewer tokens than this say nothing about how alike two layers are.
MIN_TOKENS = 16


def _hidden_from_args(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_from_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def collect_block_outputs(
    loaded,
    texts: list[str],
    *,
    max_length: int = 128,
    batch_size: int = 16,
    max_tokens: int = 4096,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Run the model on ``texts`` and capture every block's output at real tokens.

    The token positions kept for CKA and angular distance (at most ``max_tokens``, the same
    for every layer) are drawn before the forward passes, so memory stays at
    ``layers x max_tokens x hidden`` however much text there is.

    Returns:
        ``(outputs, block_influence, num_tokens)``: one ``(kept tokens, hidden)`` float32 tensor
        per layer, the Block Influence of each layer over all tokens, and the number of tokens seen.

    Raises:
        ConfigError: no tokenizer, or too little text to compare layers on.
    """
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise ConfigError(f"{loaded.source} has no tokenizer; activation analysis needs one (or use --no-activations)")
    adapter, model = loaded.adapter, loaded.model
    blocks = adapter.blocks(model)
    base = adapter.base(model).to(device)
    n = len(blocks)

    # Real tokens per text (as the batches will see them), then the global sample of positions.
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=fit_length(tokenizer, max_length))["input_ids"]]
    total = sum(lengths)
    if total < MIN_TOKENS:
        raise ConfigError(f"the calibration text holds {total} token(s), under {MIN_TOKENS}; give more text to compare layers on")
    keep = torch.zeros(total, dtype=torch.bool)
    keep[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_tokens]] = True
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)

    current: dict[str, torch.Tensor] = {}
    inputs: dict[int, torch.Tensor] = {}
    outputs: list[list[torch.Tensor]] = [[] for _ in range(n)]
    cos_sum = torch.zeros(n, dtype=torch.float64)

    def pre_hook(i):
        def hook(module, args, kwargs):
            inputs[i] = _hidden_from_args(args, kwargs)[current["mask"]].float()

        return hook

    def post_hook(i):
        def hook(module, args, kwargs, output):
            out = _hidden_from_output(output)[current["mask"]].float()  # (real tokens, hidden)
            cos_sum[i] += F.cosine_similarity(inputs.pop(i), out, dim=-1).double().sum()
            outputs[i].append(out[current["keep"]].cpu())

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(block.register_forward_hook(post_hook(i), with_kwargs=True))
    try:
        for start in range(0, len(texts), batch_size):
            stop = min(start + batch_size, len(texts))
            enc = tokenizer(texts[start:stop], padding=True, truncation=True, max_length=fit_length(tokenizer, max_length),
                            return_tensors="pt").to(device)
            current["mask"] = enc["attention_mask"].bool()  # (batch, seq); real tokens come out text by text
            current["keep"] = keep[offsets[start] : offsets[stop]].to(device)
            base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()

    block_influence = 1.0 - cos_sum / total
    return [torch.cat(o) for o in outputs], block_influence.float(), total


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
