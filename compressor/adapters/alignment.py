"""Function-preserving permutations of a Transformer block, and how to find the best one.

Two layers of a trained model are not aligned: FFN neuron 17 of layer 3 has nothing to do
with neuron 17 of layer 4, and the same goes for attention heads. Two symmetries of a block
leave its function unchanged:

* permuting FFN neurons: rows of ``ffn_in`` (and ``ffn_gate``) with their biases, and the
  matching columns of ``ffn_out``;
* permuting attention heads as whole heads: row blocks of Q, K, V (with biases) and the
  matching column blocks of the attention output. With grouped-query attention a key/value
  head moves together with the query heads that read it, so the unit permuted is the
  key/value *group*.

The best permutation of layer B onto layer A is found with the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on the summed cosine similarity of the units'
weights. All weights are ``(out_features, in_features)``, as the adapters hand them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from .base import Geometry

Weights = dict[str, torch.Tensor]
Biases = dict[str, "torch.Tensor | None"]


@dataclass
class BlockPermutation:
    """A function-preserving permutation of one block.

    Attributes:
        neurons: ``(intermediate_size,)``; new neuron ``i`` is old neuron ``neurons[i]``.
        kv_groups: ``(num_kv_heads,)``; new key/value group ``g`` is old group ``kv_groups[g]``
            (a group is one key/value head and the query heads that read it).
        query_within: ``(num_kv_heads, heads_per_kv)`` or ``None``; under grouped-query
            attention the query heads of a group may also be reordered among themselves: new
            query head ``k`` of group ``g`` is old query head ``query_within[g, k]`` of old group
            ``kv_groups[g]``. ``None`` keeps their order.
    """

    neurons: torch.Tensor
    kv_groups: torch.Tensor
    query_within: torch.Tensor | None = None

    @classmethod
    def identity(cls, geometry: Geometry) -> BlockPermutation:
        return cls(torch.arange(geometry.intermediate_size), torch.arange(geometry.num_kv_heads))

    def query_heads(self, geometry: Geometry) -> torch.Tensor:
        """The permutation of query heads: group moves plus moves inside a group."""
        r = geometry.heads_per_kv
        inner = self.query_within if self.query_within is not None else torch.arange(r).expand(len(self.kv_groups), r)
        return (self.kv_groups[:, None] * r + inner).reshape(-1)


def _rows(perm_units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Expand a permutation of units (heads) into one of rows."""
    return (perm_units[:, None] * unit_size + torch.arange(unit_size)[None, :]).reshape(-1)


def row_permutations(perm: BlockPermutation, geometry: Geometry) -> dict[str, torch.Tensor]:
    """For each role, the permutation of its output rows (``None`` roles are untouched)."""
    q_rows = _rows(perm.query_heads(geometry), geometry.head_dim)
    kv_rows = _rows(perm.kv_groups, geometry.head_dim)
    return {"query": q_rows, "key": kv_rows, "value": kv_rows, "ffn_gate": perm.neurons, "ffn_in": perm.neurons}


def column_permutations(perm: BlockPermutation, geometry: Geometry) -> dict[str, torch.Tensor]:
    """For each role, the permutation of its input columns."""
    return {"attn_out": _rows(perm.query_heads(geometry), geometry.head_dim), "ffn_out": perm.neurons}


def permute_weights(
    weights: Weights, biases: Biases, perm: BlockPermutation, geometry: Geometry
) -> tuple[Weights, Biases]:
    """Apply a function-preserving permutation to a block's weights (returns new tensors)."""
    rows = row_permutations(perm, geometry)
    cols = column_permutations(perm, geometry)
    new_w, new_b = {}, {}
    for role, w in weights.items():
        if role in rows:
            w = w.index_select(0, rows[role].to(w.device))
        if role in cols:
            w = w.index_select(1, cols[role].to(w.device))
        new_w[role] = w
        b = biases.get(role)
        new_b[role] = b.index_select(0, rows[role].to(b.device)) if (b is not None and role in rows) else b
    return new_w, new_b


@dataclass
class UnitFeatures:
    """Row-normalized features of one layer's permutable units, ready for matching.

    ``a.neurons @ b.neurons.T`` is the sum over FFN roles of the cosine similarity of every
    pair of neurons; ``kv`` does the same for key/value heads (K and V) and ``query_heads`` for
    query heads (Q rows and the matching attention-output columns).
    """

    neurons: torch.Tensor  # (intermediate_size, n_ffn_roles * hidden)
    kv: torch.Tensor  # (num_kv_heads, 2 * head_dim * hidden)
    query_heads: torch.Tensor  # (num_heads, 2 * head_dim * hidden)


def unit_features(weights: Weights, geometry: Geometry, *, neurons: bool = True) -> UnitFeatures:
    """Build the matching features of one block's weights, in float32 whatever their dtype (a
    bf16 cosine between two neurons is good to two digits; the matching needs more).

    ``neurons=False`` builds the heads' alone (``neurons`` is then empty): what a large model's
    analysis rebuilds per pair rather than keeping."""
    if neurons:
        # written role by role into one tensor: one role in float32 at a time beside the result
        parts = [weights[r] for r in ("ffn_gate", "ffn_in") if r in weights] + [weights["ffn_out"].t()]  # columns are neurons
        neuron_features = torch.empty(parts[0].shape[0], sum(p.shape[1] for p in parts), device=parts[0].device)
        start = 0
        for part in parts:
            part = part.float()
            # F.normalize's own arithmetic, into place
            torch.div(part, part.norm(2, 1, keepdim=True).clamp_min(1e-12), out=neuron_features[:, start:start + part.shape[1]])
            start += part.shape[1]
    else:
        neuron_features = torch.empty(0, 0, device=weights["query"].device)
    weights = {r: weights[r].float() for r in ("query", "key", "value", "attn_out")}
    g, h = geometry.num_kv_heads, geometry.num_heads
    kv = [F.normalize(weights[r].reshape(g, -1), dim=1) for r in ("key", "value")]  # (groups, head_dim * hidden)
    query = [
        F.normalize(weights["query"].reshape(h, -1), dim=1),  # (heads, head_dim * hidden)
        # attention-output columns of a head: (hidden, heads, head_dim) -> (heads, hidden * head_dim)
        F.normalize(weights["attn_out"].reshape(geometry.hidden_size, h, -1).transpose(0, 1).reshape(h, -1), dim=1),
    ]
    return UnitFeatures(neuron_features, torch.cat(kv, dim=1), torch.cat(query, dim=1))


def match_units(similarity: torch.Tensor) -> torch.Tensor:
    """Maximum-weight matching of the columns onto the rows (Hungarian algorithm).

    Returns ``perm`` with ``similarity[i, perm[i]]`` summed as large as possible.
    """
    _, cols = linear_sum_assignment(similarity.detach().float().cpu().numpy(), maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


#: Entries of the neurons' cost matrix computed at a time (a block of rows).
_COST_BLOCK = 2**24


def _best_partners(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """For each row of ``rows``, its distinct partner among ``columns`` such that the summed
    similarity ``rows @ columns.T`` is largest (Hungarian algorithm).

    The cost matrix is written straight into the float64 array scipy solves on, negated, a block
    of rows at a time: given a float32 similarity and ``maximize=True``, scipy holds a negated
    copy and a float64 one beside it, 1.6 GB more than this for 8,192 neurons.
    """
    cost = np.empty((rows.shape[0], columns.shape[0]))
    step = max(1, _COST_BLOCK // max(columns.shape[0], 1))
    for start in range(0, rows.shape[0], step):
        block = (rows[start : start + step] @ columns.t()).detach().float().cpu()
        cost[start : start + step] = block.neg_().numpy()
        del block
    _, picked = linear_sum_assignment(cost)
    return torch.as_tensor(picked, dtype=torch.long)


def _match_sample(rows: torch.Tensor, columns: torch.Tensor, sample: torch.Tensor, n: int) -> torch.Tensor:
    """A permutation of ``n`` neurons whose ``sample`` entries are their best distinct partners
    (``rows``: the sampled neurons' features, ``columns``: all of the other layer's) and whose
    others take the unused ones in order."""
    cols = _best_partners(rows, columns)
    perm = torch.full((n,), -1, dtype=torch.long)
    perm[sample] = torch.as_tensor(cols, dtype=torch.long)
    unused = torch.ones(n, dtype=torch.bool)
    unused[perm[sample]] = False
    perm[perm < 0] = torch.arange(n)[unused]
    return perm


def find_permutation(reference: UnitFeatures, other: UnitFeatures, *,
                     sample: torch.Tensor | None = None) -> BlockPermutation:
    """The permutation that best lines up ``other``'s neurons and heads with ``reference``'s.

    ``sample`` (reference neuron indices) matches only those neurons, each among all of
    ``other``'s (a far cheaper, rectangular solve); the rest get the unused neurons in order, so
    the result is still a permutation, but only the sampled neurons are aligned.

    Heads are matched as whole heads. Under grouped-query attention a key/value group is
    scored by its K and V plus the best matching of its query heads (mean over them), groups
    are matched on that score, and the query heads inside matched groups follow their matching.
    """
    if sample is None:
        neurons = _best_partners(reference.neurons, other.neurons)
    else:
        neurons = _match_sample(reference.neurons[sample], other.neurons, sample, reference.neurons.shape[0])
    return _match_heads(reference, other, neurons)


def find_sampled_permutation(reference_rows: UnitFeatures, other: UnitFeatures,
                             sample: torch.Tensor) -> BlockPermutation:
    """`find_permutation` with a ``sample`` for a reference whose ``neurons`` hold only the
    sampled neurons' rows (``reference.neurons[sample]``, taken once per layer): what a large
    model's analysis keeps of a layer instead of all its features."""
    neurons = _match_sample(reference_rows.neurons, other.neurons, sample, other.neurons.shape[0])
    return _match_heads(reference_rows, other, neurons)


def _match_heads(reference: UnitFeatures, other: UnitFeatures, neurons: torch.Tensor) -> BlockPermutation:
    """The heads' part of `find_permutation`, with the neurons' already matched."""
    kv_sim = reference.kv @ other.kv.t()  # (groups, groups)
    q_sim = (reference.query_heads @ other.query_heads.t()).cpu()  # (heads, heads); tiny, so on the CPU
    kv_sim = kv_sim.cpu()
    groups = kv_sim.shape[0]
    r = q_sim.shape[0] // groups
    if r == 1:
        return BlockPermutation(neurons, match_units(kv_sim + q_sim))
    blocks = q_sim.reshape(groups, r, groups, r).permute(0, 2, 1, 3)  # (g_ref, g_other, r, r)
    inner = torch.empty(groups, groups, r, dtype=torch.long)
    score = torch.empty(groups, groups)
    for a in range(groups):
        for b in range(groups):
            inner[a, b] = match_units(blocks[a, b])
            score[a, b] = blocks[a, b][torch.arange(r), inner[a, b]].mean()
    kv_groups = match_units(kv_sim + score)
    return BlockPermutation(neurons, kv_groups, inner[torch.arange(groups), kv_groups])


def restrict(perm: BlockPermutation, geometry: Geometry, *, heads: bool = True, neurons: bool = True) -> BlockPermutation:
    """``perm`` with the heads (or neurons) left in place where they may not move.

    A family whose heads are read by state outside the block (MPNet's shared per-head bias) or
    whose self-check found heads not permutable keeps its heads where they are.
    """
    identity = BlockPermutation.identity(geometry)
    return BlockPermutation(
        perm.neurons if neurons else identity.neurons,
        perm.kv_groups if heads else identity.kv_groups,
        perm.query_within if heads else None,
    )


def random_permutation(geometry: Geometry, generator: torch.Generator) -> BlockPermutation:
    """A random function-preserving permutation (neurons, key/value groups, heads within groups)."""
    r = geometry.heads_per_kv
    within = torch.stack([torch.randperm(r, generator=generator) for _ in range(geometry.num_kv_heads)])
    return BlockPermutation(
        torch.randperm(geometry.intermediate_size, generator=generator),
        torch.randperm(geometry.num_kv_heads, generator=generator),
        within if r > 1 else None,
    )
