"""Weight similarity between every pair of layers, raw and after permutation alignment."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations

import torch

from ..adapters import ArchitectureAdapter
from ..adapters.alignment import (
    UnitFeatures,
    find_permutation,
    find_sampled_permutation,
    permute_weights,
    restrict,
    unit_features,
)
from ..progress import Progress

#: Up to this many layers every pair is aligned exactly (MiniLM, BERT-base: at most 66 solves).
ALL_EXACT_LAYERS = 12
#: Deeper models: pairs at most this far apart are aligned exactly, farther ones on a sample.
EXACT_WITHIN = 3
#: Layer weights (as float32 copies) and matching features are kept for models whose blocks hold
#: at most this many weights (about 1 GB in float32); a larger model keeps two layers at a time
#: and aligns one pair at a time, so the analysis adds two layers to the model in memory.
FEATURE_CACHE_NUMBERS = 250_000_000
#: Farther pairs align this many sampled FFN neurons (each among all of the other layer's) and
#: compare those; heads are always aligned in full.
SAMPLED_NEURONS = 256
#: FFNs up to this wide are aligned over every neuron on near pairs (a 4,096-neuron assignment
#: takes about 1.6 s on one core); a wider FFN aligns `NEAR_SAMPLED_NEURONS` sampled neurons
#: there too (an 8,192-neuron one takes 7 s a pair and grows as the cube of the width, 66
#: pairs of a 24-layer model). Sharing itself (`compress share`) always aligns every neuron.
EXACT_NEURONS = 4096
NEAR_SAMPLED_NEURONS = 1024
FFN_ROLES = ("ffn_gate", "ffn_in", "ffn_out")


def neuron_sample(intermediate_size: int, seed: int = 0, size: int | None = None) -> torch.Tensor:
    """The FFN neurons sampled pairs are aligned on: a fixed random subset of ``size`` (default
    `SAMPLED_NEURONS`), sorted."""
    size = SAMPLED_NEURONS if size is None else size
    if intermediate_size <= size:
        return torch.arange(intermediate_size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(intermediate_size, generator=generator)[:size].sort().values


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
    neuron when the FFN is at most `EXACT_NEURONS` wide. A farther pair aligns a fixed sample
    of `SAMPLED_NEURONS` FFN neurons, each among all of the other layer's, and compares the FFN
    weights on those (heads in full): an estimate of the same number at a small fraction of
    the cost; a near pair of a wider FFN does the same on `NEAR_SAMPLED_NEURONS`. The result
    says which pairs are which (``alignment``).

    The weights are read in the model's own dtype and compared in float32. A model whose blocks
    hold more than `FEATURE_CACHE_NUMBERS` weights is streamed: each layer is turned into float32
    and matching features once, and keeps only what later pairs read of it (its sampled
    neurons' rows, its heads' features, its norms; all of it for the next `exact_window` layers
    where near pairs are exact), so the analysis holds one layer in float32 beside the model.

    Args:
        model: A ``transformers`` model.
        adapter: Its architecture adapter.
        workers: Threads for the pairs of a small model (the Hungarian solver releases the
            GIL); default: the torch intra-op thread count.

    Returns:
        ``{"sublayers": [...], "raw": {role: LxL}, "aligned": {role: LxL},
        "raw_mean": LxL, "aligned_mean": LxL, "alignment": {"exact_within", "exact_pairs",
        "sampled_pairs", "sampled_neurons", "near_sampled_neurons"}}`` as nested lists (diagonal 1).
    """
    geometry = adapter.geometry(model.config)
    blocks = adapter.blocks(model)
    n = len(blocks)
    with torch.no_grad():  # views of the stored weights, in the model's dtype
        stored = [{r: adapter.weight(b, r, geometry) for r in adapter.roles} for b in blocks]
    window = exact_window(n, exact_within)
    pairs = _Pairs(
        roles=adapter.roles, geometry=geometry, n=n, window=window,
        far_sample=neuron_sample(geometry.intermediate_size) if n - 1 > window else None,
        near_sample=(neuron_sample(geometry.intermediate_size, size=NEAR_SAMPLED_NEURONS)
                     if geometry.intermediate_size > EXACT_NEURONS else None),
        movable_heads=adapter.refusal("permute_heads") is None,
        movable_neurons=adapter.refusal("permute_neurons") is None,
    )
    small = sum(w.numel() for layer in stored for w in layer.values()) <= FEATURE_CACHE_NUMBERS
    with torch.no_grad(), Progress("weight similarity", len(pairs.all), "layer pairs") as progress:
        if small:
            pairs.cached(stored, workers or torch.get_num_threads(), progress)
        else:
            pairs.streamed(stored, progress)
    return pairs.result()


@dataclass
class _Pairs:
    """The raw and aligned cosines of every pair of layers, filled by `cached` or `streamed`."""

    roles: tuple[str, ...]
    geometry: object
    n: int
    window: int
    far_sample: torch.Tensor | None
    near_sample: torch.Tensor | None
    movable_heads: bool
    movable_neurons: bool

    def __post_init__(self):
        self.raw = {r: torch.eye(self.n) for r in self.roles}
        self.aligned = {r: torch.eye(self.n) for r in self.roles}
        self.all = list(combinations(range(self.n), 2))

    def sample(self, i: int, j: int) -> torch.Tensor | None:
        """The neurons pair (i, j) is aligned on (``None``: all of them)."""
        return self.near_sample if j - i <= self.window else self.far_sample  # near: the pairs plans are made of

    def set(self, mats: dict, r: str, i: int, j: int, value: float) -> None:
        mats[r][i, j] = mats[r][j, i] = value

    def restrict(self, perm):
        # units that may not move (see the adapter's self-checks) stay where they are
        return restrict(perm, self.geometry, heads=self.movable_heads, neurons=self.movable_neurons)

    def cached(self, stored: list[dict], workers: int, progress: Progress) -> None:
        """Every layer's float32 weights and features kept (no copies for an fp32 model), the
        pairs on ``workers`` threads: for a small model."""
        weights = [{r: w.float() for r, w in layer.items()} for layer in stored]
        norms = [{r: float(w.norm()) for r, w in layer.items()} for layer in weights]
        features = [unit_features(w, self.geometry) for w in weights]

        def pair(ij: tuple[int, int]) -> None:
            i, j = ij
            sample = self.sample(i, j)
            with torch.no_grad():
                perm = self.restrict(find_permutation(features[i], features[j], sample=sample))
                permuted, _ = permute_weights(weights[j], {}, perm, self.geometry)
                for r in self.roles:
                    wi = weights[i][r]
                    self.set(self.raw, r, i, j, _cosine(wi, weights[j][r], norms[i][r], norms[j][r]))
                    if sample is None or r not in FFN_ROLES:
                        self.set(self.aligned, r, i, j, _cosine(wi, permuted[r], norms[i][r], norms[j][r]))
                    else:  # the sampled neurons' rows (columns of ffn_out), aligned
                        a, b = _neuron_slice(wi, r, sample), _neuron_slice(permuted[r], r, sample)
                        self.set(self.aligned, r, i, j, _cosine(a, b, float(a.norm()), float(b.norm())))

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(pair, self.all):
                progress.update()

    def streamed(self, stored: list[dict], progress: Progress) -> None:
        """One layer at a time, for a large model: layer j's full matching features are compared
        with every earlier layer i through what i kept (`_Kept`), and the raw cosines are taken
        one role at a time; no layer is ever whole in float32 (except near pairs of a narrow FFN,
        solved exactly on what the last `exact_window` layers keep)."""
        kept: dict[int, _Kept] = {}
        for j in range(self.n):
            wj = _FloatView(stored[j])
            fj = unit_features(stored[j], self.geometry)  # one role in float32 at a time
            nj = {r: float(wj[r].norm()) for r in self.roles}
            heads_j = {r: wj[r] for r in self.roles if r not in FFN_ROLES}
            for i in range(j):
                self._aligned_pair(i, j, kept[i], stored[i], stored[j], heads_j, fj, nj)
                progress.update()
            kept_j = _Kept.of(stored[j], fj, nj, self)
            del heads_j, fj
            for r in self.roles:  # j's role against every earlier layer's
                wjr = wj[r]
                for i in range(j):
                    self.set(self.raw, r, i, j, _cosine(stored[i][r].float(), wjr, kept[i].norms[r], nj[r]))
            kept[j] = kept_j
            for i in [i for i in kept if j + 1 - i > self.window]:
                kept[i].forget_near()

    def _aligned_pair(self, i: int, j: int, ki: _Kept, stored_i: dict, stored_j: dict, heads_j: dict, fj,
                      nj: dict) -> None:
        sample = self.sample(i, j)
        near = j - i <= self.window
        if sample is None:  # exact: layer i's full features and weights, kept while it is near
            wi = ki.weights
            perm = self.restrict(find_permutation(ki.features, fj))
            moved = {**heads_j, **{r: stored_j[r].float() for r in self.roles if r in FFN_ROLES}}
        else:  # its sampled neurons' rows, kept; its heads' features, rebuilt (a hidden^2 each)
            wi = _FloatView(stored_i)  # one role in float32 at a time
            heads = unit_features({r: w for r, w in stored_i.items() if r not in FFN_ROLES}, self.geometry,
                                  neurons=False)
            rows = UnitFeatures(ki.rows[near], heads.kv, heads.query_heads)
            perm = self.restrict(find_sampled_permutation(rows, fj, sample))
            moved = heads_j
        permuted, _ = permute_weights(moved, {}, perm, self.geometry)
        for r in self.roles:
            if r in permuted:
                self.set(self.aligned, r, i, j, _cosine(wi[r], permuted[r], ki.norms[r], nj[r]))
            else:  # the sampled neurons' rows (columns of ffn_out), aligned: j's neurons matched to them
                a, b = ki.slices[near][r].float(), _neuron_slice(stored_j[r], r, perm.neurons[sample]).float()
                self.set(self.aligned, r, i, j, _cosine(a, b, float(a.norm()), float(b.norm())))

    def result(self) -> dict:
        def as_lists(mats: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
            return {r: m.tolist() for r, m in mats.items()}

        near = sum(j - i <= self.window for i, j in self.all)
        exact = near if self.near_sample is None else 0
        return {
            "sublayers": list(self.roles),
            "raw": as_lists(self.raw),
            "aligned": as_lists(self.aligned),
            "raw_mean": torch.stack(list(self.raw.values())).mean(0).tolist(),
            "aligned_mean": torch.stack(list(self.aligned.values())).mean(0).tolist(),
            "alignment": {"exact_within": min(self.window, self.n - 1), "exact_pairs": exact,
                          "sampled_pairs": len(self.all) - exact,
                          "sampled_neurons": 0 if self.far_sample is None else len(self.far_sample),
                          "near_sampled_neurons": 0 if self.near_sample is None else len(self.near_sample)},
        }


class _FloatView(dict):
    """A layer's stored weights, each read in float32 when asked for (one role's copy at a time)."""

    def __getitem__(self, role: str) -> torch.Tensor:
        return super().__getitem__(role).float()


@dataclass
class _Kept:
    """What the later pairs of a streamed analysis read of one layer, by nearness (``True``:
    the pairs within the exact window; ``False``: the farther ones).

    Attributes:
        norms: Each role's weight norm.
        rows: The sampled neurons' matching features (``features.neurons[sample]``).
        slices: The sampled neurons' float32 rows (columns of ``ffn_out``), by FFN role.
        features, weights: All of the layer's, while near pairs are solved exactly.
    """

    norms: dict
    rows: dict
    slices: dict
    features: object = None
    weights: dict | None = None

    @classmethod
    def of(cls, stored: dict, features: UnitFeatures, norms: dict, pairs: _Pairs) -> _Kept:
        rows, slices = {}, {}
        for near, sample in ((True, pairs.near_sample), (False, pairs.far_sample)):
            if sample is not None:
                rows[near] = features.neurons[sample].clone()
                # in the stored dtype: a bf16 layer's rows are bf16 numbers, float32 adds nothing
                slices[near] = {r: _neuron_slice(w, r, sample).clone() for r, w in stored.items() if r in FFN_ROLES}
        if pairs.near_sample is not None:
            return cls(norms, rows, slices)
        return cls(norms, rows, slices, features, {r: w.float() for r, w in stored.items()})

    def forget_near(self) -> None:
        """The layer is past the exact window of every later layer: drop what only near pairs read."""
        self.rows.pop(True, None)
        self.slices.pop(True, None)
        self.features = self.weights = None
