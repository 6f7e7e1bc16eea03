"""Choosing which contiguous layers to share: the best partition into K groups, exactly.

The score of a partition is the mean, over layers, of each layer's *fit* to its group: its mean
similarity to the other members (a layer alone in its group keeps its own weights and fits
perfectly, 1). With K fixed the number of shared groups is fixed, so the score says how much
of the layers' similarity a sharing plan keeps. Groups are contiguous runs of layers, as in
Relaxed Recursive Transformers and LaCo; one dynamic program finds the best partition for
every K in O(L^3), after an O(L^2) table of group scores (2-D prefix sums).

`recommend_grouping` returns them all as a `Grouping`, the record sharing reads its plan from.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..layer_groups import Grouping, Partition, plan_string

# the grouping's data live in the core (sharing reads an analysis.json's); importable from here as before
__all__ = ["Grouping", "Matrix", "Partition", "best_partition", "best_partitions", "group_fit", "partition_score",
           "plan_string", "recommend_grouping"]

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


def _fit_table(similarity: Matrix) -> list[list[float]]:
    """``fit[start][stop]`` for every contiguous group, in O(L^2) with 2-D prefix sums."""
    n = len(similarity)
    prefix = [[0.0] * (n + 1) for _ in range(n + 1)]  # prefix[i][j] = sum of s[:i, :j]
    for i in range(n):
        for j in range(n):
            prefix[i + 1][j + 1] = similarity[i][j] + prefix[i][j + 1] + prefix[i + 1][j] - prefix[i][j]
    diag = [0.0] * (n + 1)
    for i in range(n):
        diag[i + 1] = diag[i] + similarity[i][i]
    fit = [[0.0] * (n + 1) for _ in range(n + 1)]
    for start in range(n):
        fit[start][start + 1] = 1.0
        for stop in range(start + 2, n + 1):
            block = prefix[stop][stop] - prefix[start][stop] - prefix[stop][start] + prefix[start][start]
            fit[start][stop] = (block - (diag[stop] - diag[start])) / (stop - start - 1)
    return fit


def best_partitions(similarity: Matrix, max_groups: int | None = None) -> dict[int, tuple[list[list[int]], float]]:
    """The best contiguous partition into K groups, for every K from 1 to ``max_groups``.

    One dynamic program serves every K: ``best[k][stop]`` is the best total fit of layers
    ``0..stop-1`` split into ``k`` groups. O(K * L^2) in all.

    Returns:
        ``{k: (groups, score)}``; see `best_partition`.
    """
    n = len(similarity)
    kmax = n if max_groups is None else max_groups
    if not 1 <= kmax <= n:
        raise ValueError(f"groups must be between 1 and {n}, got {kmax}")
    fit = _fit_table(similarity)
    neg = float("-inf")
    best = [[neg] * (n + 1) for _ in range(kmax + 1)]
    cut = [[0] * (n + 1) for _ in range(kmax + 1)]
    best[0][0] = 0.0
    for g in range(1, kmax + 1):
        for stop in range(g, n + 1):
            for start in range(g - 1, stop):
                value = best[g - 1][start] + fit[start][stop]
                if value > best[g][stop] + 1e-12:
                    best[g][stop], cut[g][stop] = value, start
    result = {}
    for k in range(1, kmax + 1):
        groups, stop = [], n
        for g in range(k, 0, -1):
            start = cut[g][stop]
            groups.append(list(range(start, stop)))
            stop = start
        groups.reverse()
        result[k] = (groups, best[k][n] / n)
    return result


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
    return best_partitions(similarity, k)[k]


def recommend_grouping(similarity: Matrix, metric: str, groups: int | None = None) -> Grouping:
    """The best contiguous partition for every group count, recommending ``groups`` of them.

    Args:
        similarity: ``L x L`` symmetric layer similarity (higher = more alike).
        metric: The name of that similarity, kept in the result.
        groups: The group count to recommend; ``None``: about half the layers, ``(L + 1) // 2``.
    """
    by_groups = {k: Partition(g, score) for k, (g, score) in best_partitions(similarity).items()}
    recommended = groups or (len(similarity) + 1) // 2  # about half the layers
    return Grouping(metric=metric, recommended_groups=recommended, by_groups=by_groups)
