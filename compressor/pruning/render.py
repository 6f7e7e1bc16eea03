"""Presenting a prune: a short summary for the terminal and a Markdown report."""

from __future__ import annotations

from ..render import MIB, fidelity_rows


def prune_summary_rows(record) -> list[tuple[str, str]]:
    """(label, value) rows describing a prune record."""
    m = record.metrics
    before, after = m["geometry_before"], m["geometry_after"]

    def geometry(g: dict) -> str:
        heads = f"{g['heads']} heads" + (f" ({g['kv_heads']} key/value)" if g["kv_heads"] != g["heads"] else "")
        return f"{g['layers']} layers, {heads}, FFN {g['ffn']}"

    rows = [("shape", f"{geometry(before)} -> {geometry(after)}")]
    if "dropped_layers" in m:
        rows.append(("dropped layers", ", ".join(map(str, m["dropped_layers"])) + " (lowest Block Influence)"))
    if "vocabulary" in m:
        v = m["vocabulary"]
        rows.append(("vocabulary", f"{v['vocab_before']:,} -> {v['vocab_after']:,} tokens"))
    rows += [
        ("unique parameters", f"{record.params_before:,} -> {record.params_after:,} "
                              f"({record.params_after / record.params_before:.1%})"),
        ("weights in memory", f"{record.bytes_before / MIB:.1f} MiB -> {record.bytes_after / MIB:.1f} MiB"),
    ]
    return rows + fidelity_rows(m.get("fidelity"))


def prune_markdown(record, model_name: str) -> str:
    lines = [f"# Prune: {model_name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in prune_summary_rows(record)]
    return "\n".join(lines) + "\n"
