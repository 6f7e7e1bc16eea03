"""Weight similarity between every pair of layers, raw and after permutation alignment."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import torch

from ..adapters import ArchitectureAdapter
from ..adapters.alignment import find_permutation, permute_weights, restrict, unit_features
from ..progress import Progress

#: Up to this many layers every pair is aligned exactly (MiniLM, BERT-base: at most 66 solves).
ALL_EXACT_LAYERS = 12
#: Deeper models: pairs at most this far apart are aligned exactly, farther ones on a sample.
EXACT_WITHIN = 3
#: Matching features (as large as the layers) are kept for models whose blocks hold at most this
#: many weights (about 1 GB in float32), rebuilt per pair for larger ones.
FEATURE_CACHE_NUMBERS = 250_000_000
#: Farther pairs align this many sampled FFN neurons (each among all of the other layer's) and
#: compare those; heads are always aligned in full.
SAMPLED_NEURONS = 256
FFN_ROLES = ("ffn_gate", "ffn_in", "ffn_out")


def neuron_sample(intermediate_size: int, seed: int = 0) -> torch.Tensor:
    """The FFN neurons far pairs are aligned on: a fixed random subset, sorted."""
    if intermediate_size <= SAMPLED_NEURONS:
        return torch.arange(intermediate_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(intermediate_size, generator=generator)[:SAMPLED_NEURONS].sort().values


def _neuron_slice(weight: torch.Tensor, role: str, sample: torch.Tensor) -> torch.Tensor:
    """The sampled neurons' part of an FFN weight: rows of the input projections, columns of the output one."""
    return weight[:, sample] if role == "ffn_out" else weight[sample]


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
    `exact_window` apart, the ones sharing plans are made of, get the exact solve over every
    neuron. A farther pair aligns a fixed sample of `SAMPLED_NEURONS` FFN neurons, each among
    all of the other layer's, and compares the FFN weights on those (heads in full): an
    estimate of the same number at a small fraction of the cost. The result says which pairs
    are which (``alignment``).

    Args:
        model: A ``transformers`` model.
        adapter: Its architecture adapter.
        workers: Threads for the pairs (the Hungarian solver releases the GIL); default: the
            torch intra-op thread count.

    Returns:
        ``{"sublayers": [...], "raw": {role: LxL}, "aligned": {role: LxL},
        "raw_mean": LxL, "aligned_mean": LxL, "alignment": {"exact_within", "exact_pairs",
        "sampled_pairs", "sampled_neurons"}}`` as nested lists (diagonal 1).
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

    raw = {r: torch.eye(n) for r in roles}
    aligned = {r: torch.eye(n) for r in roles}

    window = exact_window(n, exact_within)
    cached: dict[int, object] = {}
    small = sum(w.numel() for layer in weights for w in layer.values()) <= FEATURE_CACHE_NUMBERS

    def features(i: int):
        # kept while the model is small (its weights are in memory anyway); rebuilt per pair
        # for a large one, where they would double what the analysis holds
        if small:
            if i not in cached:
                cached[i] = unit_features(weights[i], geometry)
            return cached[i]
        return unit_features(weights[i], geometry)

    sample = neuron_sample(geometry.intermediate_size) if n - 1 > window else None

    def pair(ij: tuple[int, int]) -> None:
        i, j = ij
        near = j - i <= window  # the pairs plans are made of: every neuron, the dense exact solve
        with torch.no_grad():
            perm = find_permutation(features(i), features(j), sample=None if near else sample)
            # units that may not move (see the adapter's self-checks) stay where they are
            perm = restrict(perm, geometry, heads=movable_heads, neurons=movable_neurons)
            permuted, _ = permute_weights(weights[j], {}, perm, geometry)
            for r in roles:
                raw[r][i, j] = raw[r][j, i] = _cosine(weights[i][r], weights[j][r], norms[i][r], norms[j][r])
                if near or r not in FFN_ROLES:
                    aligned[r][i, j] = aligned[r][j, i] = _cosine(weights[i][r], permuted[r], norms[i][r], norms[j][r])
                else:  # the sampled neurons' rows (columns of ffn_out), aligned
                    a, b = _neuron_slice(weights[i][r], r, sample), _neuron_slice(permuted[r], r, sample)
                    aligned[r][i, j] = aligned[r][j, i] = _cosine(a, b, float(a.norm()), float(b.norm()))

    pairs = list(combinations(range(n), 2))
    with ThreadPoolExecutor(max_workers=workers or torch.get_num_threads()) as pool, \
            Progress("weight similarity", len(pairs), "layer pairs") as progress:
        for _ in pool.map(pair, pairs):
            progress.update()

    def as_lists(mats: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
        return {r: m.tolist() for r, m in mats.items()}

    return {
        "sublayers": list(roles),
        "raw": as_lists(raw),
        "aligned": as_lists(aligned),
        "raw_mean": torch.stack(list(raw.values())).mean(0).tolist(),
        "aligned_mean": torch.stack(list(aligned.values())).mean(0).tolist(),
        "alignment": {"exact_within": min(window, n - 1), "exact_pairs": sum(j - i <= window for i, j in pairs),
                      "sampled_pairs": sum(j - i > window for i, j in pairs),
                      "sampled_neurons": 0 if sample is None else len(sample)},
    }
