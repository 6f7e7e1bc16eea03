"""Architecture adapters: what differs between model families lives here and nowhere else.

`adapter_for` gives a model its adapter: the declared one for its ``model_type``
(`families`), or one inferred from its structure (`infer`). Either way `checks.prove` proves
it on the loaded model before a stage uses it (`compressor.models.load_model` does).
"""

from __future__ import annotations

import dataclasses

from ..errors import UnsupportedModelError
from .base import (
    CAPABILITIES,
    HEAD_ROW_ROLES,
    NEURON_ROW_ROLES,
    ROLES,
    ArchitectureAdapter,
    FusedLayout,
    Geometry,
    applied_weight,
    dense_like,
    head_rows,
    is_conv1d,
    module_shape,
    module_weight,
    set_module_weight,
)
from .families import ADAPTERS

_BY_MODEL_TYPE = {t: a for a in ADAPTERS for t in a.model_types}

#: The ``model_type`` values with a declared adapter, for messages and docs.
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def declared_adapter(model_or_config) -> ArchitectureAdapter | None:
    """The declared adapter for a model (or its config), or ``None``."""
    config = getattr(model_or_config, "config", model_or_config)
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The declared adapter for a model (or its config).

    Raises:
        UnsupportedModelError: no adapter is declared for ``config.model_type``.
    """
    adapter = declared_adapter(model_or_config)
    if adapter is None:
        config = getattr(model_or_config, "config", model_or_config)
        raise UnsupportedModelError(
            f"no declared adapter for {getattr(config, 'model_type', None)!r}; declared: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return adapter


def adapter_for(model, *, infer: bool = False, settle: bool = True) -> ArchitectureAdapter:
    """The model's adapter: declared for its ``model_type``, else (or with ``infer``) inferred.

    An inferred attention has several readings its shapes allow (a fused QKV stacked or
    interleaved per head, in any order; the value in another of the separate projections); the
    one the loaded weights bear out is chosen (``settle``; off for a model whose weights are not
    loaded yet, whose checkpoint records the adapter).

    Raises:
        UnsupportedModelError: nothing could be inferred, or no layout of the fused QKV holds.
    """
    declared = None if infer else declared_adapter(model)
    if declared is not None:
        return declared
    from .infer import infer_adapter

    adapter = infer_adapter(model)
    return _settle_attention(model, adapter) if settle else adapter


def _settle_attention(model, adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Choose, among the readings of an inferred model's attention that its shapes allow, the one
    the loaded weights bear out: a fused QKV stacked or interleaved per head, in any order of
    query, key and value (CodeGen's is query, value, key); separate projections with the value
    where the names or order put it, or elsewhere. A reading must survive a head permutation
    and its value rows must silence their heads."""
    from .checks import check_mapping, check_permutation, check_value_rows, guarded, probe_inputs

    g = adapter.geometry(model.config)
    inputs = probe_inputs(model)
    if not check_mapping(model, adapter, g, inputs).passed:
        return adapter  # prove() refuses it, naming the sublayer
    candidates = list(_readings(adapter, g))
    for candidate in candidates:
        permutes = bool(candidate.head_state) or guarded("permute heads", check_permutation, model, candidate, g,
                                                          "heads", inputs).passed is not False
        if permutes and guarded("value rows", check_value_rows, model, candidate, g, inputs).passed is not False:
            return candidate
    path = candidate.linears["value"]
    out_f, in_f = module_shape(adapter.linear(adapter.blocks(model)[0], "value"))
    what = "fused split" if path in adapter.fused else "value rows"
    raise UnsupportedModelError(
        f"{adapter.family}: no adapter could be inferred: self-check '{what}' failed: {path} ({out_f} x {in_f}): none of "
        f"{len(candidates)} readings of query/key/value survives a head permutation with its value rows silencing "
        "their heads (or the attention reads per-head state the adapter cannot see, such as ALiBi slopes)"
    )


def _readings(adapter: ArchitectureAdapter, g: Geometry):
    """The adapter as inferred, then the other assignments of query / key / value its shapes allow."""
    import itertools

    qkv = ("query", "key", "value")
    path = adapter.linears["query"]
    if path in adapter.fused:
        layouts = [False] + ([True] if g.num_kv_heads == g.num_heads else [])
        # under grouped-query attention the wide query block comes first or last: orders keep it in place
        orders = [o for o in itertools.permutations(qkv) if g.num_kv_heads == g.num_heads or o[0] == "query"]
        for per_head in layouts:
            for order in orders:
                yield dataclasses.replace(adapter, fused={**adapter.fused, path: FusedLayout(order, per_head=per_head)})
        return
    yield adapter
    paths = {r: adapter.linears[r] for r in qkv}
    # the value where the key was read (or the query, where they are as wide)
    for role in ("key", "query") if g.num_kv_heads == g.num_heads else ("key",):
        swapped = {**paths, "value": paths[role], role: paths["value"]}
        yield dataclasses.replace(adapter, linears={**adapter.linears, **swapped})


__all__ = [
    "ADAPTERS", "ArchitectureAdapter", "CAPABILITIES", "FusedLayout", "Geometry", "HEAD_ROW_ROLES",
    "NEURON_ROW_ROLES", "ROLES", "SUPPORTED_MODEL_TYPES", "adapter_for", "applied_weight",
    "declared_adapter", "dense_like", "get_adapter", "head_rows", "is_conv1d", "module_shape", "module_weight",
    "set_module_weight",
]
