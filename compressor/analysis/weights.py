"""Weight similarity between every pair of layers, raw and after permutation alignment."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import torch

from ..adapters import ArchitectureAdapter
from ..adapters.alignment import compose, find_permutation, permute_weights, restrict, unit_features

#: Up to this many layers every pair is aligned exactly (MiniLM, BERT-base: at most 66 solves).
ALL_EXACT_LAYERS = 12
#: Deeper models: pairs at most this far apart are solved exactly, farther ones composed.
EXACT_WITHIN = 3


def exact_window(num_layers: int, within: int | None) -> int:
    """How far apart two layers may be for their alignment to be solved exactly."""
    if within is not None:
        return within
    return num_layers if num_layers <= ALL_EXACT_LAYERS else EXACT_WITHIN


def _cosine(a: torch.Tensor, b: torch.Tensor, norm_a: float, norm_b: float) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)) / (norm_a * norm_b + 1e-12))


def weight_similarity(model, adapter: ArchitectureAdapter, *, workers: int | None = None,
                      exact_within: int | None = None) -> dict:
    """Cosine similarity of every linear sublayer for every pair of layers.

    For each pair (i, j), the raw cosine compares the weights as stored. The aligned cosine
    first permutes layer j's FFN neurons and attention heads onto layer i's (Hungarian
    matching; see `alignment`) and then compares: it is 1 for a layer and any permuted copy.

    The Hungarian solve is most of the time (a 30-layer model has 435 pairs). Pairs at most
    `exact_window` apart are solved exactly; a farther pair composes the exact permutations
    along the chain between them (``i -> i+1 -> ... -> j``), which costs no solve and gives a
    valid permutation, so its aligned cosine is a lower bound of the exact one. Sharing only
    groups contiguous layers and the plan rarely spans more than a few, so the pairs a plan
    rests on are exact; the far corners of the heatmap are estimates, and the result says which.

    Args:
        model: A ``transformers`` model.
        adapter: Its architecture adapter.
        workers: Threads for the pairs (the Hungarian solver releases the GIL); default: the
            torch intra-op thread count.

    Returns:
        ``{"sublayers": [...], "raw": {role: LxL}, "aligned": {role: LxL},
        "raw_mean": LxL, "aligned_mean": LxL, "alignment": {"exact_within", "exact_pairs",
        "composed_pairs"}}`` as nested lists (diagonal 1).
    """
    geometry = adapter.geometry(model.config)
    roles = adapter.roles
    blocks = adapter.blocks(model)
    n = len(blocks)
    movable_heads = adapter.refusal("permute_heads") is None
    movable_neurons = adapter.refusal("permute_neurons") is None
    with torch.no_grad():
        # Views of the stored weights, in float32 for stable cosines; no copies for fp32 models.
        weights = [{r: adapter.weight(b, r, geometry).float() for r in roles} for b in blocks]
        norms = [{r: float(w[r].norm()) for r in roles} for w in weights]
    # Matching features are built per pair rather than kept for every layer: they are as large
    # as the layer itself, and rebuilding them costs a few percent of the time.

    raw = {r: torch.eye(n) for r in roles}
    aligned = {r: torch.eye(n) for r in roles}

    window = exact_window(n, exact_within)
    perms = {}

    def score(i: int, j: int) -> None:
        with torch.no_grad():
            permuted, _ = permute_weights(weights[j], {}, perms[i, j], geometry)
            for r in roles:
                raw[r][i, j] = raw[r][j, i] = _cosine(weights[i][r], weights[j][r], norms[i][r], norms[j][r])
                aligned[r][i, j] = aligned[r][j, i] = _cosine(weights[i][r], permuted[r], norms[i][r], norms[j][r])

    def solve(ij: tuple[int, int]) -> None:
        i, j = ij
        with torch.no_grad():
            perm = find_permutation(unit_features(weights[i], geometry), unit_features(weights[j], geometry))
        # units that may not move (see the adapter's self-checks) stay where they are
        perms[i, j] = restrict(perm, geometry, heads=movable_heads, neurons=movable_neurons)
        score(i, j)

    pairs = list(combinations(range(n), 2))
    with ThreadPoolExecutor(max_workers=workers or torch.get_num_threads()) as pool:
        list(pool.map(solve, [(i, j) for i, j in pairs if j - i <= window]))
        for distance in range(window + 1, n):  # each distance builds on the one below it
            far = [(i, i + distance) for i in range(n - distance)]
            for i, j in far:
                perms[i, j] = compose(perms[i, j - 1], perms[j - 1, j])
            list(pool.map(lambda ij: score(*ij), far))

    def as_lists(mats: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
        return {r: m.tolist() for r, m in mats.items()}

    return {
        "sublayers": list(roles),
        "raw": as_lists(raw),
        "aligned": as_lists(aligned),
        "raw_mean": torch.stack(list(raw.values())).mean(0).tolist(),
        "aligned_mean": torch.stack(list(aligned.values())).mean(0).tolist(),
        "alignment": {"exact_within": min(window, n - 1), "exact_pairs": sum(j - i <= window for i, j in pairs),
                      "composed_pairs": sum(j - i > window for i, j in pairs)},
    }
