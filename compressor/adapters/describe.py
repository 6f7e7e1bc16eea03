"""What `compress` believes about a model: the adapter in use and what its self-checks found.

`describe` returns what the self-checks found as plain data (`compress inspect` runs the pruning
ones first), which the command prints as a table or as JSON.
"""

from __future__ import annotations

from .base import CAPABILITIES, module_shape


def _row_span(rows) -> str:
    """``rows 32-47`` for a contiguous map, ``24 rows, per head`` for an interleaved one."""
    values = rows.tolist()
    if values == list(range(values[0], values[-1] + 1)):
        return f"rows {values[0]}-{values[-1]}"
    return f"{len(values)} rows, per head"


def describe(loaded, seconds: float = 0.0) -> dict:
    """What compress believes about ``loaded``, as plain data.

    Args:
        loaded: A `LoadedModel` (its load ran the mapping and permutation checks; a check not
            run, such as the pruning ones, shows as not run).
        seconds: What the self-checks took, to report.

    Returns:
        The adapter (declared or inferred), each role's module, shape and rows, fused layouts,
        norms, per-head state, capabilities with the reason for each refusal, every self-check
        with its result, and the seconds the checks took.
    """
    adapter, model = loaded.adapter, loaded.model
    g = loaded.geometry
    block = adapter.blocks(model)[0]
    roles = []
    for role in adapter.roles:
        path = adapter.linears[role]
        module = adapter.linear(block, role)
        rows = adapter.role_rows(role, g)
        roles.append({
            "role": role,
            "module": f"{adapter.blocks_path}.<i>.{path}",
            "class": type(module).__name__,
            "module_shape": list(module_shape(module)),
            "shape": list(adapter.weight(block, role, g).shape),
            "rows": None if rows is None else _row_span(rows),
            "layout": adapter.fused[path].kind if path in adapter.fused else None,
            "bias": getattr(module, "bias", None) is not None,
        })
    base = adapter.base(model)
    params = dict(base.named_parameters())
    return {
        "model": loaded.name,
        "model_type": model.config.model_type,
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "adapter": adapter.family,
        "source": "inferred" if adapter.inferred else "declared",
        "blocks": f"{adapter.blocks_path} ({len(adapter.blocks(model))} x {type(block).__name__})",
        "geometry": {"layers": g.num_layers, "hidden": g.hidden_size, "heads": g.num_heads, "kv_heads": g.num_kv_heads,
                     "head_dim": g.head_dim, "ffn": g.intermediate_size},
        "is_decoder": adapter.is_decoder,
        "roles": roles,
        "fused": {path: {"roles": list(layout.roles), "layout": layout.kind}
                  for path, layout in adapter.fused.items()},
        "norms": list(adapter.norms),
        "head_norms": list(adapter.head_norms),
        "outer_norms": list(adapter.outer_norms),
        "head_state": [{"parameter": p, "shape": list(params[p].shape)} for p in adapter.head_state if p in params],
        "max_positions": adapter.max_positions(model.config),
        "capabilities": {c: {"allowed": adapter.refusal(c) is None, "reason": adapter.refusal(c)} for c in CAPABILITIES},
        "checks": loaded.checks.to_dict(),
        "seconds": round(seconds, 3),
    }


def describe_text(d: dict) -> str:
    """`describe`'s result as the lines `compress inspect` prints."""
    g = d["geometry"]
    lines = [
        f"{d['model']}: {d['model_type']} ({d['model_class']}, {d['dtype']}), adapter {d['adapter']} ({d['source']})",
        f"blocks     {d['blocks']}",
        f"geometry   {g['layers']} layers, hidden {g['hidden']}, {g['heads']} heads ({g['kv_heads']} key/value), "
        f"head size {g['head_dim']}, FFN {g['ffn']}{', decoder' if d['is_decoder'] else ', encoder'}",
        "",
        f"{'role':<9} {'module':<44} {'weight':>11}  rows",
    ]
    for r in d["roles"]:
        shape = f"{r['shape'][0]} x {r['shape'][1]}"
        rows = r["rows"] or "all"
        if r["rows"]:
            rows += f" of {r['module_shape'][0]} ({r['layout']})"
        lines.append(f"{r['role']:<9} {r['module']:<44} {shape:>11}  {rows}")
    lines.append("")
    lines.append(f"norms      {', '.join(d['norms']) or '-'}"
                 + (f"; in the heads: {', '.join(d['head_norms'])}" if d["head_norms"] else ""))
    if d["head_state"]:
        lines.append("per-head state outside the blocks: "
                     + ", ".join(f"{s['parameter']} {tuple(s['shape'])}" for s in d["head_state"]))
    if d["max_positions"]:
        lines.append(f"positions  up to {d['max_positions']} tokens")
    lines.append("")
    lines.append("self-checks:")
    for c in d["checks"]:
        where = f" [{c['sublayer']}]" if c["sublayer"] else ""
        lines.append(f"  {c['name']:<16} {c['status']:<8} {c['detail']}{where}")
    refused = {k: v for k, v in d["capabilities"].items() if not v["allowed"]}
    if refused:
        lines.append("refused:")
        for cap, v in refused.items():
            lines.append(f"  {CAPABILITIES[cap]}: {v['reason']}")
    lines.append(f"({d['seconds']:.2f} s of self-checks)")
    return "\n".join(lines)
