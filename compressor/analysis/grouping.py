"""Choosing which contiguous layers to share: the best partition into K groups, exactly.

The score of a partition is the mean, over layers, of each layer's *fit* to its group: its mean
similarity to the other members (a layer alone in its group keeps its own weights and fits
perfectly, 1). With K fixed the number of shared groups is fixed, so the score says how much
of the layers' similarity a sharing plan keeps. Groups are contiguous runs of layers, as in
Relaxed Recursive Transformers and LaCo; dynamic programming finds the best one in
O(K * L^2) after an O(L^3) table of group scores.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def group_fit(similarity: Matrix, start: int, stop: int) -> float:
    """Sum over layers ``start..stop-1`` of their mean similarity to the other members."""
    size = stop - start
    if size == 1:
        return 1.0
    pair_sum = sum(similarity[i][j] for i in range(start, stop) for j in range(start, stop) if i != j)
    return pair_sum / (size - 1)  # = sum_i mean_{j != i} s(i, j)


def partition_score(similarity: Matrix, groups: Sequence[Sequence[int]]) -> float:
    """Mean fit of the layers to their groups (1 = every layer alone, the identity)."""
    n = len(similarity)
    return sum(group_fit(similarity, g[0], g[-1] + 1) for g in groups) / n


def best_partition(similarity: Matrix, k: int) -> tuple[list[list[int]], float]:
    """The contiguous partition of the layers into ``k`` groups with the highest score.

    Args:
        similarity: ``L x L`` symmetric layer similarity (higher = more alike).
        k: Number of groups, ``1 <= k <= L``.

    Returns:
        ``(groups, score)``: lists of layer indices, and `partition_score` of that partition.
    """
    n = len(similarity)
    if not 1 <= k <= n:
        raise ValueError(f"groups must be between 1 and {n}, got {k}")
    fit = [[0.0] * (n + 1) for _ in range(n + 1)]
    for start in range(n):
        for stop in range(start + 1, n + 1):
            fit[start][stop] = group_fit(similarity, start, stop)
    neg = float("-inf")
    # best[g][stop]: the best total fit of layers 0..stop-1 split into g groups
    best = [[neg] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for stop in range(g, n + 1):
            for start in range(g - 1, stop):
                value = best[g - 1][start] + fit[start][stop]
                if value > best[g][stop] + 1e-12:
                    best[g][stop], cut[g][stop] = value, start
    groups, stop = [], n
    for g in range(k, 0, -1):
        start = cut[g][stop]
        groups.append(list(range(start, stop)))
        stop = start
    groups.reverse()
    return groups, best[k][n] / n
