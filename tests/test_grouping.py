"""The exact grouping (dynamic programming) against brute force."""

import itertools
import random

import pytest

from compressor.analysis import best_partition, partition_score


def contiguous_partitions(n, k):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [list(range(bounds[i], bounds[i + 1])) for i in range(k)]


def random_similarity(n, seed):
    rng = random.Random(seed)
    s = [[1.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            s[i][j] = s[j][i] = rng.uniform(-0.2, 1.0)
    return s


@pytest.mark.parametrize("n", range(1, 9))
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(n, seed):
    sim = random_similarity(n, seed)
    for k in range(1, n + 1):
        groups, score = best_partition(sim, k)
        brute = max(partition_score(sim, p) for p in contiguous_partitions(n, k))
        assert score == pytest.approx(brute, abs=1e-12)
        assert partition_score(sim, groups) == pytest.approx(score, abs=1e-12)
        assert sorted(i for g in groups for i in g) == list(range(n))
        assert len(groups) == k and all(g == list(range(g[0], g[-1] + 1)) for g in groups)


def test_finds_planted_blocks():
    blocks = [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    n = 9
    sim = [[0.1] * n for _ in range(n)]
    for b in blocks:
        for i in b:
            for j in b:
                sim[i][j] = 0.95
    for i in range(n):
        sim[i][i] = 1.0
    groups, score = best_partition(sim, 3)
    assert groups == blocks
    assert score == pytest.approx(0.95)


def test_identity_and_single_group_scores():
    sim = random_similarity(6, 1)
    assert best_partition(sim, 6) == ([[i] for i in range(6)], 1.0)
    groups, score = best_partition(sim, 1)
    assert groups == [list(range(6))]
    off = [sim[i][j] for i in range(6) for j in range(6) if i != j]
    assert score == pytest.approx(sum(off) / len(off))


@pytest.mark.parametrize("k", [0, 5])
def test_rejects_bad_group_counts(k):
    with pytest.raises(ValueError):
        best_partition(random_similarity(4, 0), k)


def test_all_group_counts_in_one_pass_agree_with_single_k():
    from compressor.analysis import best_partitions

    sim = random_similarity(12, 3)
    every = best_partitions(sim)
    assert set(every) == set(range(1, 13))
    for k, (groups, score) in every.items():
        assert score == pytest.approx(best_partition(sim, k)[1], abs=1e-12)
        assert partition_score(sim, groups) == pytest.approx(score, abs=1e-12)
    assert every[12] == ([[i] for i in range(12)], 1.0)
