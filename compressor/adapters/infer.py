"""Inferring an adapter for a ``model_type`` nobody declared.

From the loaded model's structure alone: the block list is the ``nn.ModuleList`` of
``num_hidden_layers`` identical blocks; every linear of a block is labelled by its shape
against the config's geometry, its name, and its order (query / key / value / output / FFN in
/ gate / out); fused projections are recognised by their widths; norms by class and width;
per-head parameters outside the blocks by their shape. Nothing here is trusted: the caller
proves the result with `compressor.adapters.checks.prove`, and a fused projection whose split
is not clear is settled by which layout survives a head permutation, or refused.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError
from .base import ArchitectureAdapter, FusedLayout, Geometry, base_model, is_conv1d, is_linear, module_shape

if TYPE_CHECKING:
    from torch import nn

#: Config attributes that hold the FFN width, in the order they are tried.
_FFN_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim", "d_ff", "d_inner", "ffn_hidden_size", "ffn_size")
_HEAD_DIM_KEYS = ("head_dim", "attention_head_size", "kv_channels")
_KV_KEYS = ("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
#: Name stems (the last path component, lower case, without _proj / _lin) by role.
_NAMES = {
    "query": {"q", "query", "wq", "q_proj"},
    "key": {"k", "key", "wk"},
    "value": {"v", "value", "wv"},
    "attn_out": {"o", "out", "dense", "c_proj", "wo", "attn_out", "proj", "output"},
    "ffn_gate": {"gate", "w1", "wi_0", "gate_proj", "fc_gate"},
}


def _stem(path: str) -> str:
    last = path.rsplit(".", 1)[-1].lower()
    return re.sub(r"_(proj|lin|linear)$", "", last)


def _attention_like(path: str) -> bool:
    return any(w in part for part in path.lower().split(".") for w in ("attn", "attention"))


def _refuse(model_type: str, check: str, detail: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{model_type}: no adapter could be inferred: self-check '{check}' failed: {detail}")


def find_blocks(base: nn.Module, num_layers: int, model_type: str) -> str:
    """The dotted path of the block list: ``num_layers`` blocks of one class, the largest such list."""
    from torch import nn

    best, best_size = None, -1
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and name and len(module) == num_layers and len({type(b) for b in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise _refuse(model_type, "block list", f"no list of num_hidden_layers ({num_layers}) identical blocks")
    return best


def _config_value(config, keys):
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return key, value
    return None, None


class _Pool:
    """The block's linears not labelled yet."""

    def __init__(self, linears):
        self.left = list(linears)

    def take(self, pred) -> list[tuple[str, tuple[int, int]]]:
        found = [item for item in self.left if pred(item)]
        for item in found:
            self.left.remove(item)
        return found


def _label(linears: list[tuple[str, tuple[int, int]]], g: Geometry, model_type: str) -> tuple[dict[str, str], dict[str, FusedLayout]]:
    """Role -> module path, and the fused modules, from shapes, names and order.

    The FFN goes first (its widths are the least ambiguous), then the attention; a linear left
    over is refused, never guessed at.
    """
    pool = _Pool(linears)
    roles: dict[str, str] = {}
    fused: dict[str, FusedLayout] = {}
    _label_ffn(pool, g, model_type, roles, fused)
    _label_attention(pool, g, model_type, roles, fused)
    if pool.left:
        path, (o, i) = pool.left[0]
        raise _refuse(model_type, "label linears", f"{path} ({o} x {i}) matches no role (query, key, value, output, FFN)")
    return roles, fused


def _label_ffn(pool: _Pool, g: Geometry, model_type: str, roles: dict, fused: dict) -> None:
    a, inter = g.hidden_size, g.intermediate_size
    # names break ties of shape (a fused QKV as wide as the FFN): attention modules are not FFN
    out_proj = pool.take(lambda it: it[1] == (a, inter) and not _attention_like(it[0]))
    if len(out_proj) != 1:
        raise _refuse(model_type, "label linears", f"expected one FFN output projection ({a} x {inter}), found {len(out_proj)}")
    roles["ffn_out"] = out_proj[0][0]
    up = pool.take(lambda it: it[1] == (inter, a) and not _attention_like(it[0]))
    if len(up) == 2:
        gate = next((p for p, _ in up if _stem(p) in _NAMES["ffn_gate"] or "gate" in _stem(p)), up[0][0])
        roles["ffn_gate"] = gate
        roles["ffn_in"] = next(p for p, _ in up if p != gate)
    elif len(up) == 1:
        roles["ffn_in"] = up[0][0]
    else:
        gate_up = pool.take(lambda it: it[1] == (2 * inter, a) and not _attention_like(it[0]))
        if len(gate_up) != 1:
            raise _refuse(model_type, "label linears", f"no FFN input projection ({inter} x {a}, or {2 * inter} x {a} fused)")
        path = gate_up[0][0]
        roles["ffn_gate"] = roles["ffn_in"] = path
        fused[path] = FusedLayout(("ffn_gate", "ffn_in"))


def _label_attention(pool: _Pool, g: Geometry, model_type: str, roles: dict, fused: dict) -> None:
    a, q, kv = g.hidden_size, g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    qkv = pool.take(lambda it: it[1] == (q + 2 * kv, a))
    if len(qkv) > 1:
        raise _refuse(model_type, "label linears", f"{len(qkv)} modules could be a fused QKV projection ({q + 2 * kv} x {a})")
    if qkv:
        path = qkv[0][0]
        roles["query"] = roles["key"] = roles["value"] = path
        fused[path] = FusedLayout(("query", "key", "value"))  # stacked; adapter_for settles per head
    else:
        for role, item in zip(("query", "key", "value"), _separate_qkv(pool, q, kv, a, model_type)):
            roles[role] = item[0]
            pool.left.remove(item)
    out = pool.take(lambda it: it[1] == (a, q))
    if len(out) != 1:
        named = [it for it in out if _stem(it[0]) in _NAMES["attn_out"]]
        if len(named) != 1:
            raise _refuse(model_type, "label linears", f"expected one attention output projection ({a} x {q}), found {len(out)}")
        pool.left.extend(it for it in out if it is not named[0])
        out = named
    roles["attn_out"] = out[0][0]


def _separate_qkv(pool: _Pool, q: int, kv: int, a: int, model_type: str) -> list:
    """The query, key and value projections, by name where the names say, else by order."""
    by_name = []
    for role in ("query", "key", "value"):
        named = [it for it in pool.left if _stem(it[0]) in _NAMES[role] and it[1] == ((q if role == "query" else kv), a)]
        by_name += named[:1] if len(named) == 1 else []
    if len(by_name) == 3:
        return by_name
    queries = [it for it in pool.left if it[1] == (q, a)]
    if q != kv:
        keys_values = [it for it in pool.left if it[1] == (kv, a)]
        if len(queries) != 1 or len(keys_values) != 2:
            raise _refuse(model_type, "label linears", f"cannot tell the query ({q} x {a}) and key/value ({kv} x {a}) "
                                                       "projections apart")
        return [queries[0], *keys_values]
    # q, k, v and the output are all hidden x hidden: the first three in order that are not
    # named as the output
    if len(queries) < 3:
        raise _refuse(model_type, "label linears", f"fewer than three attention projections ({q} x {a})")
    chosen = [it for it in queries if _stem(it[0]) not in _NAMES["attn_out"]][:3]
    return chosen if len(chosen) == 3 else queries[:3]


def _is_norm(module) -> bool:
    """A normalisation layer with a per-feature weight."""
    from torch import nn

    w = getattr(module, "weight", None)
    is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()
    return is_norm and w is not None and w.dim() == 1


def _norm_paths(modules: list[tuple[str, nn.Module]], width: int) -> list[str]:
    return [path for path, m in modules if path and _is_norm(m) and m.weight.shape[0] == width]


def _head_attrs_from_own_pruning(block, attention_path: str, heads: int, head_dim: int) -> list[tuple[str, str, str]]:
    """What the family's own ``prune_heads`` changes on a copy of the attention: the attributes
    that count heads, their width, and the set of pruned heads (so surgery changes the same)."""
    import copy

    path = attention_path
    while True:  # the nearest module up from the projections that prunes its own heads
        holder = block.get_submodule(path) if path else block
        if callable(getattr(holder, "prune_heads", None)):
            break
        if not path:
            return []
        path = path.rpartition(".")[0]
    copied = copy.deepcopy(holder)

    def ints(root):
        return {(p, a): v for p, m in root.named_modules() for a, v in vars(m).items()
                if (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, set)}

    before = ints(copied)
    try:
        copied.prune_heads([0])
    except Exception:  # noqa: BLE001  (a family whose prune_heads is not implemented)
        return []
    found = []
    for (sub, attr), value in ints(copied).items():
        old = before.get((sub, attr))
        full = ".".join(p for p in (path, sub) if p)
        if isinstance(value, set):
            if value != old:
                found.append((full, attr, "pruned"))
        elif old == heads and value == heads - 1:
            found.append((full, attr, "heads"))
        elif old == heads * head_dim and value == (heads - 1) * head_dim:
            found.append((full, attr, "width"))
    return found


def infer_adapter(model: nn.Module) -> ArchitectureAdapter:
    """An adapter for ``model`` built from its structure (to be proven before use).

    Raises:
        UnsupportedModelError: no block list, a linear that matches no role, a missing role,
            or a fused projection that is not split as the geometry says.
    """
    config = model.config
    model_type = str(getattr(config, "model_type", None) or type(model).__name__)
    base = base_model(model)
    n = getattr(config, "num_hidden_layers", None)
    if not all(isinstance(getattr(config, k, None), int) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")):
        raise _refuse(model_type, "geometry", "the config has no num_hidden_layers / hidden_size / num_attention_heads")
    blocks_path = find_blocks(base, n, model_type)
    blocks = base.get_submodule(blocks_path)
    linears = [(p, module_shape(m)) for p, m in blocks[0].named_modules() if p and is_linear(m)]
    # a SharedLinear's inner modules are ours, not the family's
    linears = [(p, s) for p, s in linears if not any(p.startswith(q + ".") for q, _ in linears)]
    g, keys, config_kv = _geometry(config, linears, model_type)
    # refusals name the blocks they looked at (XLM keeps attention and FFN in separate lists)
    roles, fused = _label(linears, g, f"{model_type} (blocks: {blocks_path}, {type(blocks[0]).__name__})")
    outer = [(p, m) for p, m in base.named_modules() if p and not p.startswith(blocks_path + ".") and p != blocks_path]
    reserved, after_padding = _reserved_positions(config, outer)
    prunes_in_config = "head_dim" not in keys and "_prune_heads" in type(base).__dict__
    return ArchitectureAdapter(
        family=model_type,
        model_types=(model_type,),
        blocks_path=blocks_path,
        linears=roles,
        fused=fused,
        norms=_block_norms(blocks, g.hidden_size),
        head_norms=tuple(_norm_paths(list(blocks[0].named_modules()), g.head_dim)) if g.head_dim != g.hidden_size else (),
        outer_norms=tuple(p for p, m in outer if _is_norm(m)),
        head_state=_head_state(base, blocks, outer, g),
        config_keys=keys,
        is_decoder=_is_decoder(model),
        head_attrs=_head_attrs(blocks[0], roles["query"].rpartition(".")[0], g, from_own_pruning=prunes_in_config),
        pruned_heads_in_config=prunes_in_config,
        reserved_positions=reserved,
        positions_after_padding=after_padding,
        conv1d=any(is_conv1d(m) for m in blocks[0].modules()),
        fixed_kv_heads=g.num_kv_heads if g.num_kv_heads != config_kv else None,
        inferred=True,
    )


def _geometry(config, linears, model_type: str) -> tuple[Geometry, dict[str, str], int]:
    """The geometry from the config (the FFN width, and key/value heads the config miscounts,
    from the shapes), the config keys that hold it, and the config's own key/value head count."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_key, kv = _config_value(config, _KV_KEYS)
    config_kv = kv = kv or heads
    head_key, head_dim = _config_value(config, _HEAD_DIM_KEYS)
    head_dim = head_dim or hidden // heads
    kv = _kv_heads_from_shapes(linears, hidden, heads, head_dim, kv)
    inter_key, inter = _config_value(config, _FFN_KEYS)
    if inter is None:  # the FFN output projection is the hidden-sized linear fed by another width
        widths = [i for _, (o, i) in linears if o == hidden and i not in (hidden, heads * head_dim)]
        if len(set(widths)) != 1:
            raise _refuse(model_type, "geometry", "the FFN width is neither in the config nor clear from the shapes")
        inter = widths[0]
    keys = {"intermediate_size": inter_key or "intermediate_size"}
    if kv_key:
        keys["num_kv_heads"] = kv_key
    if head_key:
        keys["head_dim"] = head_key
    return Geometry(config.num_hidden_layers, hidden, heads, kv, head_dim, inter), keys, config_kv


def _kv_heads_from_shapes(linears, hidden: int, heads: int, head_dim: int, kv: int) -> int:
    """Key/value heads as the projections' shapes say, where the config's count fits none of
    them (Falcon's multi-query flag means one key/value head whatever ``num_kv_heads`` says)."""
    q = heads * head_dim
    shapes = {s for _, s in linears}
    separate = sum(1 for _, s in linears if s == (kv * head_dim, hidden))  # a key and a value projection at least
    if (q + 2 * kv * head_dim, hidden) in shapes or separate >= 2:
        return kv  # the config's count fits
    counts = [n for n in range(1, heads + 1) if heads % n == 0]
    return next((n for n in counts if (q + 2 * n * head_dim, hidden) in shapes), kv)  # a fused QKV's width


def _block_norms(blocks, hidden: int) -> tuple[str, ...]:
    """Norm paths, the union over blocks (ModernBERT's first block has an Identity where the
    others norm), in the order of the block that has the most."""
    per_block = sorted((_norm_paths(list(block.named_modules()), hidden) for block in blocks), key=len, reverse=True)
    norms: list[str] = []
    for paths in per_block:
        norms.extend(p for p in paths if p not in norms)
    return tuple(norms)


def _head_state(base, blocks, outer, g: Geometry) -> tuple[str, ...]:
    """Parameters outside the blocks with one entry per head (MPNet's relative attention bias is
    (buckets, heads)): a vector of num_heads, or a matrix whose smallest axis is num_heads.
    A false alarm only keeps heads in place; a miss is what the permutation check is for."""
    if g.num_heads == g.hidden_size:
        return ()
    inside = {id(p) for p in blocks.parameters()}
    norm_params = {id(p) for _, m in outer if _is_norm(m) for p in m.parameters(recurse=False)}
    return tuple(
        name for name, p in base.named_parameters()
        if id(p) not in inside and id(p) not in norm_params and p.dim() <= 2
        and (tuple(p.shape) == (g.num_heads,) or (p.dim() == 2 and min(p.shape) == g.num_heads))
    )


def _reserved_positions(config, outer) -> tuple[int, bool]:
    """Position ids reserved before the first token: RoBERTa-style embeddings count positions
    from ``padding_idx + 1`` (``pad_token_id + 1`` where the two are the same)."""
    from torch import nn

    max_pos = getattr(config, "max_position_embeddings", None)
    for path, m in outer:
        if (isinstance(m, nn.Embedding) and "pos" in path.lower() and m.num_embeddings == max_pos
                and m.padding_idx is not None):
            if m.padding_idx == getattr(config, "pad_token_id", None):
                return 0, True
            return m.padding_idx + 1, False
    return 0, False


def _head_attrs(block, attention_path: str, g: Geometry, *, from_own_pruning: bool) -> tuple[tuple[str, str, str], ...]:
    """The attention's own records of its head count that pruning must update: learned from the
    family's own ``prune_heads`` where it has one, else the integer attributes named for heads."""
    if from_own_pruning:
        return tuple(_head_attrs_from_own_pruning(block, attention_path, g.num_heads, g.head_dim))
    attention = block.get_submodule(attention_path) if attention_path else block
    found = []
    for attr, value in vars(attention).items():
        if not isinstance(value, int) or isinstance(value, bool) or "head" not in attr:
            continue
        if value == g.num_heads and "key_value" not in attr:
            found.append((attention_path, attr, "heads"))
        elif value == g.num_kv_heads and g.num_kv_heads != g.num_heads:
            found.append((attention_path, attr, "kv_heads"))
        elif value == g.num_heads * g.head_dim and "size" in attr:
            found.append((attention_path, attr, "width"))
    return tuple(found)


def _is_decoder(model) -> bool:
    """Causal: the config says so, the class is a causal LM, or transformers knows the family
    only as a causal LM (BERT is in both the causal and the masked LM mappings: an encoder)."""
    import transformers

    mappings = transformers.models.auto.modeling_auto
    config = model.config
    causal = type(config) in mappings.MODEL_FOR_CAUSAL_LM_MAPPING
    masked = type(config) in mappings.MODEL_FOR_MASKED_LM_MAPPING
    return (bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
            or (causal and not masked))
