"""Check the analysis's own recommendation: apply the best candidate plans and measure them.

A similarity score predicts how much a plan costs; `validate_plans` measures it. For each of the
``k`` group counts nearest the recommended one it applies the best contiguous plan to a copy of
the model, and drops as many layers (those of lowest Block Influence, ShortGPT) as the plan
saves blocks, then measures the damage against the original on held-out text: next-token KL for
models with a language-model head, embedding cosine otherwise. Plans are ranked by the measured
number, and the rank correlation between predicted and measured says how far the prediction can
be trusted on this model.

Sharing is applied as `compress share` starts it before any training (heads and FFN neurons of
every member permuted onto the group's first layer, a function-preserving change, then every
shared weight averaged; each layer keeps its own biases and norms); dropping a layer makes its
block pass its input through (in a residual stream the same function as removing it).
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..adapters.alignment import find_permutation, permute_weights, restrict, unit_features
from ..errors import ConfigError
from .grouping import Grouping, plan_string


def candidate_counts(grouping: Grouping, k: int) -> list[int]:
    """The ``k`` group counts nearest the recommended one (fewer groups first on a tie), each
    with fewer groups than layers.

    Raises:
        ConfigError: ``k`` is more than there are plans that share anything.
    """
    counts = [g for g, p in grouping.by_groups.items() if any(len(members) > 1 for members in p.groups)]
    if k > len(counts):
        raise ConfigError(f"--validate {k}: there are only {len(counts)} plans that share layers", option="validate")
    return sorted(counts, key=lambda g: (abs(g - grouping.recommended_groups), g))[:k]


def averaged_copy(loaded, groups: list[list[int]]):
    """A copy of ``loaded`` whose group members carry their group's aligned mean weights."""
    model = copy.deepcopy(loaded.model)
    adapter = loaded.adapter
    geometry = adapter.geometry(model.config)
    blocks = adapter.blocks(model)
    heads, neurons = adapter.refusal("permute_heads") is None, adapter.refusal("permute_neurons") is None
    with torch.no_grad():
        for group in (g for g in groups if len(g) > 1):
            aligned = {group[0]: adapter.block_weights(blocks[group[0]], geometry)}
            ref_w = aligned[group[0]][0]
            for layer in group[1:]:
                w, b = adapter.block_weights(blocks[layer], geometry)
                perm = restrict(find_permutation(unit_features(ref_w, geometry), unit_features(w, geometry)), geometry,
                                heads=heads, neurons=neurons)
                aligned[layer] = permute_weights(w, b, perm, geometry)
            mean = {r: torch.stack([aligned[i][0][r] for i in group]).mean(0) for r in ref_w}
            for layer in group:
                adapter.load_block_weights(blocks[layer], dict(mean), aligned[layer][1], geometry)
    return dataclasses.replace(loaded, model=model)


def dropped_copy(loaded, drop: list[int]):
    """A copy of ``loaded`` whose blocks ``drop`` pass their input through unchanged."""
    model = copy.deepcopy(loaded.model)
    blocks = loaded.adapter.blocks(model)

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for i in drop:
        blocks[i].register_forward_hook(skip, with_kwargs=True)
    return dataclasses.replace(loaded, model=model)


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (``None`` for fewer than 3 values or a constant side)."""
    if len(a) < 3:
        return None
    ra, rb = (torch.tensor(x, dtype=torch.float64).argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else None


def validate_plans(loaded, metrics: dict, k: int, texts: list[str], *, batch_size: int = 16, max_length: int = 128,
                   device: str = "cpu") -> dict:
    """Apply the ``k`` best candidate plans (and the equal layer drops) and measure each.

    Args:
        loaded: The model analyzed.
        metrics: Its analysis (``grouping`` and, for the drops, ``activations``).
        k: How many group counts to try.
        texts: Held-out text (not the analysis's calibration text).

    Returns:
        ``{"measure", "higher_is_better", "held_out_texts", "plans": [...], "ranked": [...],
        "rank_correlation"}``; each plan has ``kind`` (``share`` or ``drop``), ``groups`` (unique
        blocks after it), ``plan`` or ``dropped``, ``predicted`` (the grouping score; for a drop,
        1 - the mean Block Influence of the dropped layers) and ``measured``.
    """
    from ..fidelity import fidelity

    grouping = Grouping.from_dict(metrics["grouping"])
    influence = metrics.get("activations", {}).get("block_influence")
    has_head = loaded.model.get_output_embeddings() is not None if hasattr(loaded.model, "get_output_embeddings") else False
    measure = "next_token_kl" if has_head else "embedding_cosine"
    kw = {"batch_size": batch_size, "max_length": max_length, "device": device}

    def measured(candidate) -> float:
        return float(fidelity(candidate, loaded, texts, **kw)[measure])

    plans = []
    for g in candidate_counts(grouping, k):
        partition = grouping.by_groups[g]
        plans.append({"kind": "share", "groups": g, "plan": plan_string(partition.groups),
                      "predicted": partition.score, "measured": measured(averaged_copy(loaded, partition.groups))})
        if influence is not None:
            n = len(influence)
            drop = sorted(sorted(range(n), key=lambda i: influence[i])[: n - g])
            plans.append({"kind": "drop", "groups": g, "dropped": drop,
                          "predicted": 1.0 - sum(influence[i] for i in drop) / len(drop),
                          "measured": measured(dropped_copy(loaded, drop))})
    higher = measure == "embedding_cosine"
    ranked = sorted(range(len(plans)), key=lambda i: -plans[i]["measured"] if higher else plans[i]["measured"])
    shares = [p for p in plans if p["kind"] == "share"]
    # agreement: a higher predicted score should mean less damage
    sign = 1.0 if higher else -1.0
    rho = spearman([p["predicted"] for p in shares], [sign * p["measured"] for p in shares])
    return {"measure": measure, "higher_is_better": higher, "held_out_texts": len(texts), "plans": plans,
            "ranked": [plans[i]["plan"] if plans[i]["kind"] == "share" else f"drop {plans[i]['dropped']}" for i in ranked],
            "rank_correlation": rho}
