"""Presenting an analysis: terminal tables, Markdown and heatmap PNGs."""

from __future__ import annotations

from pathlib import Path

from .grouping import Grouping

#: Sublayer roles as shown to users.
ROLE_LABELS = {
    "query": "Q",
    "key": "K",
    "value": "V",
    "attn_out": "attn out",
    "ffn_gate": "FFN gate",
    "ffn_in": "FFN in",
    "ffn_out": "FFN out",
}
#: The largest layer count whose full L x L matrices are printed (beyond, adjacent pairs only).
MAX_MATRIX_LAYERS = 16


def _adjacent_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """One row per adjacent pair (i, i+1): weight cosine raw -> aligned per sublayer, CKA, angular."""
    n = metrics["model"]["num_layers"]
    weights, acts = metrics.get("weights"), metrics.get("activations")
    header = ["layers"]
    if weights:
        header += [ROLE_LABELS[r] for r in weights["sublayers"]] + ["mean"]
    if acts:
        header += ["CKA", "angular"]
    rows = []
    for i in range(n - 1):
        row = [f"{i}-{i + 1}"]
        if weights:
            row += [_arrow(weights["raw"][r][i][i + 1], weights["aligned"][r][i][i + 1]) for r in weights["sublayers"]]
            row += [_arrow(weights["raw_mean"][i][i + 1], weights["aligned_mean"][i][i + 1])]
        if acts:
            row += [f"{acts['cka'][i][i + 1]:.3f}", f"{acts['angular_distance'][i][i + 1]:.3f}"]
        rows.append(row)
    return header, rows


def _f2(v: float) -> str:
    return f"{round(v, 2) + 0.0:.2f}"  # + 0.0 turns -0.0 into 0.0: no "-0.00" noise


def _arrow(raw: float, aligned: float) -> str:
    return f"{_f2(raw)}→{_f2(aligned)}"


def _matrices(metrics: dict) -> list[tuple[str, list[list[float]]]]:
    out = []
    if "weights" in metrics:
        out.append(("weight cosine, raw (mean over sublayers)", metrics["weights"]["raw_mean"]))
        out.append(("weight cosine, aligned (mean over sublayers)", metrics["weights"]["aligned_mean"]))
    if "activations" in metrics:
        out.append(("linear CKA of layer outputs", metrics["activations"]["cka"]))
        out.append(("angular distance of layer outputs (0 = same)", metrics["activations"]["angular_distance"]))
    return out


def _grouping_rows(metrics: dict) -> list[list[str]]:
    grouping = Grouping.from_dict(metrics["grouping"])
    rows = []
    for k, partition in grouping.by_groups.items():
        mark = " <- recommended" if k == grouping.recommended_groups else ""
        groups = " | ".join(",".join(map(str, g)) for g in partition.groups)
        rows.append([str(k), f"{partition.score:.3f}", groups + mark])
    return rows


def _block_influence_rows(metrics: dict) -> list[list[str]]:
    bi = metrics["activations"]["block_influence"]
    removable = {e["layer"] for e in metrics.get("removable_layers", [])}
    return [[str(i), f"{v:.4f}", "most removable" if i in removable else ""] for i, v in enumerate(bi)]


def _summary_line(metrics: dict) -> str:
    m, g = metrics["model"], Grouping.from_dict(metrics["grouping"])
    return (
        f"{m['name']}: {m['model_type']}, {m['num_layers']} layers, hidden {m['hidden_size']}, "
        f"{m['num_heads']} heads, FFN {m['intermediate_size']}. "
        f"Recommended --groups {g.recommended_groups}: --plan \"{g.plan}\" "
        f"(score {g.recommended.score:.3f} by {g.metric})"
    )


def print_report(metrics: dict, console=None) -> None:
    """Print the analysis as tables on the terminal."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)  # piped output: do not squeeze the tables to 80 columns
    n = metrics["model"]["num_layers"]

    header, rows = _adjacent_rows(metrics)
    table = Table(title="Adjacent layers: weight cosine raw→aligned per sublayer; CKA and angular distance of outputs")
    for h in header:
        table.add_column(h, justify="right")
    for row in rows:
        table.add_row(*row)
    console.print(table)

    if n <= MAX_MATRIX_LAYERS:
        for title, matrix in _matrices(metrics):
            t = Table(title=title)
            t.add_column("")
            for j in range(n):
                t.add_column(str(j), justify="right")
            for i, row in enumerate(matrix):
                t.add_row(str(i), *[_f2(v) for v in row])
            console.print(t)

    if left_out_line(metrics):
        console.print(left_out_line(metrics))
    if "activations" in metrics:
        t = Table(title="Block Influence (1 - cos(input, output)); low = layer changes little")
        for h in ("layer", "block influence", ""):
            t.add_column(h, justify="right")
        for row in _block_influence_rows(metrics):
            t.add_row(*row)
        console.print(t)

    t = Table(title=f"Best contiguous groups by {metrics['grouping']['metric']} (score 1 = no sharing)")
    for h in ("groups", "score", "layers"):
        t.add_column(h, justify="right" if h != "layers" else "left")
    for row in _grouping_rows(metrics):
        t.add_row(*row)
    console.print(t)
    if validation_rows(metrics):
        t = Table(title="Plans applied and measured (--validate)")
        for h in VALIDATION_HEADER:
            t.add_column(h, justify="left" if h in ("kind", "plan") else "right")
        for row in validation_rows(metrics):
            t.add_row(*row)
        console.print(t)
        console.print(validation_line(metrics))
    console.print(_summary_line(metrics))


def left_out_line(metrics: dict) -> str | None:
    """What the activation measures left out (massive-activation tokens), as one sentence;
    ``None`` when nothing was (or there were no activations)."""
    left = metrics.get("activations", {}).get("left_out")
    if not left or not left["tokens"]:
        return None
    layers = left["layers"]
    span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else ", ".join(map(str, layers))
    return (f"Left out of CKA, angular distance and Block Influence: {left['tokens']} massive-activation token(s) "
            f"({left['first_position']} of them the first token of their text), whose hidden-state norm exceeds "
            f"{left['factor']:g}x the layer's median (up to {left['max_norm_ratio']:g}x, in layers {span}); "
            "attention sinks would otherwise make every layer that carries them look alike.")


def validation_rows(metrics: dict) -> list[list[str]]:
    """``--validate``: each plan tried, ranked by the damage measured on held-out text."""
    v = metrics.get("validation")
    if not v:
        return []
    order = sorted(v["plans"], key=lambda p: -p["measured"] if v["higher_is_better"] else p["measured"])
    return [[str(rank), p["kind"], str(p["groups"]), p.get("plan") or "drop " + ",".join(map(str, p["dropped"])),
             f"{p['predicted']:.4f}", f"{p['measured']:.4f}"] for rank, p in enumerate(order, 1)]


def validation_line(metrics: dict) -> str:
    v = metrics["validation"]
    rho = "n/a (fewer than 3 plans)" if v["rank_correlation"] is None else f"{v['rank_correlation']:.2f}"
    return (f"Validated on {v['held_out_texts']} held-out texts by {v['measure'].replace('_', ' ')} to the original "
            f"({'higher' if v['higher_is_better'] else 'lower'} is better), before any training; rank correlation of "
            f"predicted and measured over the sharing plans: {rho}.")


VALIDATION_HEADER = ["rank", "kind", "blocks", "plan", "predicted", "measured"]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(metrics: dict) -> str:
    """The analysis as a Markdown document."""
    n = metrics["model"]["num_layers"]
    parts = ["# Layer similarity analysis", "", _summary_line(metrics), ""]
    header, rows = _adjacent_rows(metrics)
    parts += ["## Adjacent layers", "", "Weight cosine per sublayer as raw→aligned (FFN neurons and attention heads matched by the Hungarian algorithm); CKA and angular distance of the layer outputs on calibration text.", "", _md_table(header, rows), ""]
    for title, matrix in _matrices(metrics):
        parts += [f"## {title[0].upper()}{title[1:]}", ""]
        parts += [_md_table([""] + [str(j) for j in range(n)], [[str(i)] + [f"{v:.3f}" for v in row] for i, row in enumerate(matrix)]), ""]
    if "activations" in metrics:
        a = metrics["activations"]
        parts += ["## Block Influence", "", f"On {a['num_texts']} texts, {a['num_tokens']} tokens.", ""]
        if left_out_line(metrics):
            parts += [left_out_line(metrics), ""]
        parts += [_md_table(["layer", "block influence", ""], _block_influence_rows(metrics)), ""]
    parts += [f"## Best contiguous groups by {metrics['grouping']['metric']}", ""]
    parts += [_md_table(["groups", "score", "layers"], _grouping_rows(metrics)), ""]
    if validation_rows(metrics):
        parts += ["## Plans applied and measured", "", validation_line(metrics), "",
                  _md_table(VALIDATION_HEADER, validation_rows(metrics)), ""]
    return "\n".join(parts)


def save_heatmaps(metrics: dict, folder: str | Path) -> list[Path]:
    """Write ``similarity.png`` (all metrics side by side) and, with weights, ``weights_by_sublayer.png``.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    short = metrics["model"]["name"]

    panels = _matrices(metrics)
    # Raw and aligned weight cosine share one colour scale from 0, so that raw noise (about
    # 0.005) does not look like structure next to the aligned values.
    weight_top = _off_diagonal_max(metrics["weights"]["aligned_mean"]) if "weights" in metrics else None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels):
        if title.startswith("weight"):
            _heatmap(ax, matrix, title, "viridis", vmin=0.0, vmax=weight_top)
        else:
            _heatmap(ax, matrix, title, "viridis_r" if "distance" in title else "viridis")
    written.append(_save(fig, f"Layer similarity: {short}", folder / "similarity.png"))

    if "weights" in metrics:
        roles = metrics["weights"]["sublayers"]
        top = max(_off_diagonal_max(metrics["weights"]["aligned"][r]) for r in roles)
        fig, axes = plt.subplots(2, len(roles), figsize=(2.8 * len(roles), 5.8), squeeze=False)
        for col, role in enumerate(roles):
            for row, kind in enumerate(("raw", "aligned")):
                _heatmap(axes[row][col], metrics["weights"][kind][role], f"{ROLE_LABELS[role]} {kind}", "viridis", vmin=0.0, vmax=top)
        written.append(_save(fig, f"Weight cosine per sublayer, raw (top) and aligned (bottom): {short}",
                             folder / "weights_by_sublayer.png"))
    return written


def _save(fig, title: str, path: Path) -> Path:
    """Title, lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _off_diagonal_max(matrix) -> float:
    n = len(matrix)
    values = [matrix[i][j] for i in range(n) for j in range(n) if i != j]
    return max(values) if values else 1.0


def _heatmap(ax, matrix, title, cmap, vmin=None, vmax=None):
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    n = data.shape[0]
    off = data[~np.eye(n, dtype=bool)] if n > 1 else data.ravel()
    # Scale colours to the off-diagonal values, where the information is (the diagonal is 1 or 0).
    lo = vmin if vmin is not None else float(off.min())
    hi = vmax if vmax is not None else float(off.max())
    hi = hi if hi > lo else lo + 1e-6
    im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ticks = range(n) if n <= 16 else range(0, n, max(1, n // 8))
    ax.set_xticks(list(ticks))
    ax.set_yticks(list(ticks))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    if n <= 12:
        for i in range(n):
            for j in range(n):
                r, g, b, _ = im.cmap(im.norm(data[i, j]))
                ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"  # readable on the cell's colour
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6, color=ink)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
