"""Structured surgery: remove attention heads, FFN neurons and whole layers, for real.

Rows and columns are cut out of the weights (not masked), so the pruned model does less work.
Everything goes through the architecture adapter, and sharing is respected: a shared base
weight is cut once for all the layers of its group (they must keep the same units), while each
member's own bias and LoRA factors are cut beside it. ``model.config`` is kept true to the new
shapes, so the model saves, reloads (transformers re-applies ``config.pruned_heads``) and exports.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import dense_like, head_rows, module_weight, set_module_weight
from ..models import LoadedModel
from ..models.shared import SharedLinear


def slice_linear(module: nn.Module, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                 done: set[int]) -> None:
    """Keep output ``rows`` and input ``cols`` (both in ``(out, in)`` terms) of a linear module.

    Handles ``nn.Linear``, GPT-2's ``Conv1D`` (stored ``(in, out)``) and `SharedLinear`, whose
    shared base is cut only the first time it is met (``done`` holds the ids of cut bases).
    """
    with torch.no_grad():
        if isinstance(module, SharedLinear):
            base = module.base_layer
            if id(base) not in done:
                done.add(id(base))
                base.weight = nn.Parameter(_cut(base.weight, rows, cols), requires_grad=base.weight.requires_grad)
                base.out_features, base.in_features = base.weight.shape
            if module.bias is not None and rows is not None:
                module.bias = nn.Parameter(module.bias[rows].clone(), requires_grad=module.bias.requires_grad)
            if module.lora_rank:
                # lora_B: (out, rank) loses rows; lora_A: (rank, in) loses columns
                set_module_weight(module.lora_B, _cut(module.lora_B.weight, rows, None))
                set_module_weight(module.lora_A, _cut(module.lora_A.weight, None, cols))
            module.out_features, module.in_features = base.out_features, base.in_features
            return
        set_module_weight(module, _cut(module_weight(module), rows, cols))
        if getattr(module, "bias", None) is not None and rows is not None:
            module.bias = nn.Parameter(module.bias[rows].clone(), requires_grad=module.bias.requires_grad)


def _cut(w: torch.Tensor, rows, cols) -> torch.Tensor:
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    return w.detach().clone()


def recap_lora(module: SharedLinear, lora_alpha: float | None) -> None:
    """Bring a delta whose rank now exceeds its matrix back to full rank, exactly.

    A checkpoint is rebuilt with the rank capped at the matrix's smaller side (as `share`
    caps it); a delta of a smaller matrix has at most that rank, so the truncated SVD is exact.
    """
    cap = min(module.in_features, module.out_features)
    if not module.lora_rank or module.lora_rank <= cap:
        return
    with torch.no_grad():
        delta = module.delta_weight()
        factory = {"dtype": module.lora_A.weight.dtype, "device": module.lora_A.weight.device}
        module.lora_rank = cap
        module.lora_alpha = float(lora_alpha if lora_alpha is not None else cap)
        module.lora_A = nn.Linear(module.in_features, cap, bias=False, **factory)
        module.lora_B = nn.Linear(cap, module.out_features, bias=False, **factory)
        module.init_lora_from_residual(delta)


# --- heads and neurons ---------------------------------------------------------------------
def prune_heads(loaded: LoadedModel, keep: dict[int, list[int]], done: set[int]) -> None:
    """Keep the attention units ``keep[layer]`` (sorted, as many in every layer).

    A unit is a head, or under grouped-query attention a key/value head with its query heads.
    """
    adapter, model, config = loaded.adapter, loaded.model, loaded.model.config
    g = loaded.geometry
    blocks = adapter.blocks(model)
    hpk, d = g.heads_per_kv, g.head_dim
    kept_units = {len(v) for v in keep.values()}
    assert len(kept_units) == 1, "every layer keeps as many heads (the config holds one count)"
    new_kv = kept_units.pop()
    new_heads = new_kv * hpk
    if adapter.head_state:
        # every layer reads one per-head state outside the blocks (MPNet's relative bias): a
        # head can only go from every layer at once, and the state loses it once
        assert len({tuple(v) for v in keep.values()}) == 1 and len(keep) == len(blocks), \
            "a family with per-head state outside its blocks keeps the same heads in every layer"
    for layer, units in keep.items():
        block = blocks[layer]
        q_rows = head_rows(units, hpk, d)
        kv_rows = head_rows(units, 1, d)
        rows_by_role = {"query": q_rows, "key": kv_rows, "value": kv_rows}
        for path in adapter.module_roles(("query", "key", "value")):
            # a fused module keeps its layout (stacked or per head) through its row map
            slice_linear(block.get_submodule(path), rows=adapter.module_rows(path, rows_by_role, g), done=done)
        slice_linear(adapter.linear(block, "attn_out"), cols=q_rows, done=done)

        removed_now = sorted(set(range(g.num_heads)) - {u * hpk + i for u in units for i in range(hpk)})
        removed_original = _original_heads(config, layer, removed_now)
        for path, attr, kind in adapter.head_attrs:
            module = block.get_submodule(path)
            if kind == "heads":
                setattr(module, attr, new_heads)
            elif kind == "kv_heads":
                setattr(module, attr, new_kv)
            elif kind == "width":
                setattr(module, attr, new_heads * d)
            elif kind == "pruned":
                setattr(module, attr, set(removed_original))
        if adapter.pruned_heads_in_config:
            config.pruned_heads = {**(config.pruned_heads or {}), layer: removed_original}
    if not adapter.pruned_heads_in_config:
        adapter.write_heads(config, new_heads, new_kv, d)
    if adapter.head_state:
        units = next(iter(keep.values()))
        adapter.slice_head_state(model, [u * hpk + i for u in units for i in range(hpk)], g.num_heads)


def _original_heads(config, layer: int, removed_now: list[int]) -> list[int]:
    """Heads removed from ``layer`` so far, in the numbering of the unpruned layer.

    ``config.pruned_heads`` is in original numbering (transformers re-prunes from it), while
    ``removed_now`` numbers the heads the layer has today.
    """
    earlier = set((config.pruned_heads or {}).get(layer, []))
    remaining = [h for h in range(config.num_attention_heads) if h not in earlier]
    return sorted(earlier | {remaining[h] for h in removed_now})


def prune_ffn(loaded: LoadedModel, keep: dict[int, list[int]], done: set[int]) -> None:
    """Keep the FFN neurons ``keep[layer]`` (sorted, as many in every layer)."""
    adapter, model = loaded.adapter, loaded.model
    g = loaded.geometry
    blocks = adapter.blocks(model)
    widths = {len(v) for v in keep.values()}
    assert len(widths) == 1, "every layer keeps as many neurons (the config holds one width)"
    for layer, neurons in keep.items():
        idx = torch.tensor(neurons, dtype=torch.long)
        block = blocks[layer]
        for path in adapter.module_roles(("ffn_gate", "ffn_in")):
            rows = adapter.module_rows(path, {"ffn_gate": idx, "ffn_in": idx}, g)
            slice_linear(block.get_submodule(path), rows=rows, done=done)
        slice_linear(adapter.linear(block, "ffn_out"), cols=idx, done=done)
    adapter.write_intermediate(model.config, widths.pop())


def recap_all(loaded: LoadedModel) -> None:
    """`recap_lora` every shared module of the model."""
    if not loaded.sharing:
        return
    for module in loaded.model.modules():
        if isinstance(module, SharedLinear):
            recap_lora(module, loaded.sharing.lora_alpha)


# --- layers ----------------------------------------------------------------------------------
def drop_layers(loaded: LoadedModel, drop: list[int]) -> None:
    """Remove the blocks ``drop`` and renumber what refers to layers.

    Shared groups lose the dropped members; a member left alone gets its weights back as
    dense modules (its shared weight plus its own delta), since sharing needs two layers.
    """
    adapter, model, config = loaded.adapter, loaded.model, loaded.model.config
    blocks = adapter.blocks(model)
    n = len(blocks)
    keep = [i for i in range(n) if i not in set(drop)]
    new_index = {old: new for new, old in enumerate(keep)}

    if loaded.sharing:
        plan = []
        for group in loaded.sharing.plan:
            members = [i for i in group if i in new_index]
            if len(members) == 1 and len(group) > 1:
                for path in loaded.sharing.modules:
                    _densify(blocks[members[0]], path, conv1d=adapter.conv1d)
            if members:
                plan.append([new_index[i] for i in members])
        loaded.sharing = loaded.sharing.with_plan(plan)

    parent_path, _, attr = adapter.blocks_path.rpartition(".")
    parent = adapter.base(model).get_submodule(parent_path) if parent_path else adapter.base(model)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    for new, block in enumerate(adapter.blocks(model)):
        for module in block.modules():  # decoders index their KV cache by layer_idx
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new

    if getattr(config, "pruned_heads", None):
        config.pruned_heads = {new_index[k]: v for k, v in config.pruned_heads.items() if k in new_index}
    for key, value in list(config.to_diff_dict().items()):
        # per-layer lists (e.g. Qwen2's layer_types) lose the dropped entries
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)


def _densify(block: nn.Module, path: str, *, conv1d: bool) -> None:
    """Replace the `SharedLinear` at ``path`` by a dense module holding its effective weight."""
    shared = block.get_submodule(path)
    bias = shared.bias.detach().clone() if shared.bias is not None else None
    block.set_submodule(path, dense_like(shared.effective_weight().detach(), bias, conv1d=conv1d))
