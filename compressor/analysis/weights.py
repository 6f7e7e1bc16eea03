"""Weight similarity between every pair of layers, raw and after permutation alignment."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import torch

from ..adapters import ArchitectureAdapter
from ..adapters.alignment import find_permutation, permute_weights, restrict, unit_features


def _cosine(a: torch.Tensor, b: torch.Tensor, norm_a: float, norm_b: float) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)) / (norm_a * norm_b + 1e-12))


def weight_similarity(model, adapter: ArchitectureAdapter, *, workers: int | None = None) -> dict:
    """Cosine similarity of every linear sublayer for every pair of layers.

    For each pair (i, j), the raw cosine compares the weights as stored. The aligned cosine
    first permutes layer j's FFN neurons and attention heads onto layer i's (Hungarian
    matching; see `alignment`) and then compares: it is 1 for a layer and any permuted copy.

    Args:
        model: A ``transformers`` model.
        adapter: Its architecture adapter.
        workers: Threads for the pairs (the Hungarian solver releases the GIL); default: the
            torch intra-op thread count.

    Returns:
        ``{"sublayers": [...], "raw": {role: LxL}, "aligned": {role: LxL},
        "raw_mean": LxL, "aligned_mean": LxL}`` as nested lists (diagonal 1).
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

    def pair(ij: tuple[int, int]) -> None:
        i, j = ij
        with torch.no_grad():
            perm = find_permutation(unit_features(weights[i], geometry), unit_features(weights[j], geometry))
            # units that may not move (see the adapter's self-checks) stay where they are
            perm = restrict(perm, geometry, heads=movable_heads, neurons=movable_neurons)
            permuted, _ = permute_weights(weights[j], {}, perm, geometry)
            for r in roles:
                raw[r][i, j] = raw[r][j, i] = _cosine(weights[i][r], weights[j][r], norms[i][r], norms[j][r])
                aligned[r][i, j] = aligned[r][j, i] = _cosine(weights[i][r], permuted[r], norms[i][r], norms[j][r])

    with ThreadPoolExecutor(max_workers=workers or torch.get_num_threads()) as pool:
        list(pool.map(pair, combinations(range(n), 2)))

    def as_lists(mats: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
        return {r: m.tolist() for r, m in mats.items()}

    return {
        "sublayers": list(roles),
        "raw": as_lists(raw),
        "aligned": as_lists(aligned),
        "raw_mean": torch.stack(list(raw.values())).mean(0).tolist(),
        "aligned_mean": torch.stack(list(aligned.values())).mean(0).tolist(),
    }
