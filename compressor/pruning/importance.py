"""How much each attention unit and FFN neuron matters, per layer.

A unit is an attention head, or under grouped-query attention a key/value head together with
its query heads (they can only go together); an FFN neuron is one row of the up (and gate)
projection and one column of the down projection.

* ``magnitude``: the norm of the unit's weights on the path it writes through:
  ``||W_v,h|| * ||W_o[:, h]||`` for a head (the query and key only shape the attention
  pattern) and ``||W_in[j]|| * ||W_out[:, j]||`` for a neuron (plus the gate row).
* ``taylor``: with a mask ``m`` on every unit, a sublayer's output is ``y = W_o (m * x)`` and
  ``dy/dm_u = W_o[:, u] x_u``: the first-order Taylor estimate of what removing the unit does
  to the sublayer's output. Its norm, averaged over calibration tokens, is the score (Michel
  et al., 2019 score heads by ``|dL/dm|``; the output norm needs no labels).

Weights are the ones a layer really applies: a shared weight plus the layer's own delta.
"""

from __future__ import annotations

import torch


def magnitude_scores(loaded) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(unit scores, neuron scores)``: one tensor per layer."""
    adapter = loaded.adapter
    g = loaded.geometry
    heads, neurons = [], []
    for block in adapter.blocks(loaded.model):
        value = adapter.applied_weight(block, "value", g).float()
        out = adapter.applied_weight(block, "attn_out", g).float()
        v_norm = value.reshape(g.num_kv_heads, -1).norm(dim=1)  # (kv heads,)
        o_norm = out.reshape(out.shape[0], g.num_kv_heads, -1).norm(dim=(0, 2))  # (kv heads,), query heads of a group together
        heads.append(v_norm * o_norm)
        w_in = adapter.applied_weight(block, "ffn_in", g).float().norm(dim=1)
        if adapter.gated_ffn:
            w_in = w_in + adapter.applied_weight(block, "ffn_gate", g).float().norm(dim=1)
        w_out = adapter.applied_weight(block, "ffn_out", g).float().norm(dim=0)
        neurons.append(w_in * w_out)
    return heads, neurons


@torch.no_grad()
def taylor_scores(loaded, texts: list[str], *, batch_size: int = 16, max_length: int = 128,
                  device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(unit scores, neuron scores)`` from the calibration ``texts``: one tensor per layer."""
    from ..data.text import batches

    adapter, model = loaded.adapter, loaded.model
    g = loaded.geometry
    blocks = adapter.blocks(model)
    n = len(blocks)
    model.to(device).eval()
    out_weights = [adapter.applied_weight(b, "attn_out", g).float() for b in blocks]
    ffn_out_norms = [adapter.applied_weight(b, "ffn_out", g).float().norm(dim=0) for b in blocks]
    # (hidden, kv heads, heads per kv, head_dim): the columns of W_o that each head writes through
    out_by_head = [w.view(w.shape[0], g.num_kv_heads, g.heads_per_kv, g.head_dim) for w in out_weights]
    head_sum = [torch.zeros(g.num_kv_heads, dtype=torch.float64) for _ in range(n)]
    neuron_sum = [torch.zeros(ffn_out_norms[i].shape[0], dtype=torch.float64) for i in range(n)]
    current: dict[str, torch.Tensor] = {}
    tokens = 0

    def attn_hook(i):
        def hook(module, args):
            x = real_tokens(args[0], current["mask"])  # (tokens, heads x head_dim): the heads' outputs
            x = x.view(x.shape[0], g.num_kv_heads, g.heads_per_kv, g.head_dim)
            # dy/dm_u for a unit u: sum over its query heads of W_o[:, h] x_h; (tokens, kv heads, hidden)
            contribution = torch.einsum("tkqd,okqd->tko", x, out_by_head[i])
            head_sum[i] += contribution.norm(dim=-1).sum(0).double().cpu()

        return hook

    def ffn_hook(i):
        def hook(module, args):
            a = real_tokens(args[0], current["mask"])  # (tokens, neurons): activations after the nonlinearity
            neuron_sum[i] += (a.abs() * ffn_out_norms[i]).sum(0).double().cpu()

        return hook

    handles = []
    for i, block in enumerate(blocks):
        handles.append(adapter.linear(block, "attn_out").register_forward_pre_hook(attn_hook(i)))
        handles.append(adapter.linear(block, "ffn_out").register_forward_pre_hook(ffn_hook(i)))
    try:
        for enc in batches(loaded.tokenizer, texts, batch_size, max_length, device):
            current["mask"] = enc["attention_mask"].bool()
            tokens += int(current["mask"].sum())
            adapter.base(model)(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [(s / tokens).float() for s in head_sum], [(s / tokens).float() for s in neuron_sum]


def real_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of a sublayer input ``x`` that are real tokens, as ``(tokens, features)`` float.

    ``x`` is ``(batch, seq, features)``, or already flattened to ``(batch * seq, features)``
    (OPT's decoder layer flattens the tokens before its FFN).
    """
    x = x.reshape(-1, x.shape[-1]) if x.dim() != mask.dim() + 1 else x
    return (x[mask.reshape(-1)] if x.dim() == 2 else x[mask]).float()


def select(scores: list[torch.Tensor], groups: list[list[int]], ratio: float) -> dict[int, list[int]]:
    """Units to keep in every layer: the same count everywhere, the same units within a group.

    Args:
        scores: One score tensor per layer.
        groups: Layers that must keep the same units (a shared group), singletons otherwise.
        ratio: Share of units to remove.

    Returns:
        layer -> kept unit indices, ascending.
    """
    units = scores[0].shape[0]
    keep_count = max(1, units - int(round(ratio * units)))
    keep: dict[int, list[int]] = {}
    for group in groups:
        total = torch.stack([scores[i] for i in group]).sum(0)
        kept = sorted(torch.topk(total, keep_count).indices.tolist())
        for layer in group:
            keep[layer] = kept
    return keep
