"""The report as Markdown, JSON and a PNG chart of size vs speed vs accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _row(cells: list[str]) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(cells) + " |"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def markdown(result: dict[str, Any], *, title: str, command: str | None = None) -> str:
    cfg, prov = result["config"], result["provenance"]
    sizes = [str(b) for b in cfg["batch_sizes"]]
    largest = str(max(cfg["batch_sizes"]))  # what compare() computed the ratios at, whatever the order given
    has_int8 = any("speedup_vs_optimum_int8" in r for r in result["rows"])
    head = ["model", "format", "file size", "unique params"]
    for b in sizes:
        head += [f"batch {b} p50 / p90 (ms)"]
    head += [f"throughput b{largest} (seq/s)", result["metric"], "of original", "fidelity"]
    if has_int8:
        head += [f"speed vs optimum int8 (b{largest})", "size vs optimum int8"]
    has_o2 = any("speedup_vs_optimum_o2_int8" in r for r in result["rows"])
    if has_o2:
        head += [f"speed vs optimum O2 int8 (b{b})" for b in sizes] + ["size vs optimum O2 int8"]
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"Measured {prov['date']} on {prov['cpu']}, {cfg['threads']} threads (PyTorch and onnxruntime alike), "
        f"sequence length {cfg['seq_len']}, {cfg['warmup']} warm-up and {cfg['repeats']} timed runs per row and batch "
        f"size, rows taking turns, each timed run at least 50 ms (a fast call repeated within it); latencies are "
        f"medians (p50) and p90s. Commit {prov['git_commit']}; "
        + ", ".join(f"{k} {v}" for k, v in prov["packages"].items() if v) + ".",
        "",
        f"Task metric: {result['metric']} on `{cfg['data']}` ({cfg['train_size']:,} train / {cfg['test_size']:,} test, "
        f"{cfg['max_length']} tokens), as `compress evaluate` computes it; fidelity: "
        + ("cosine of the pooled sentence embeddings to the original's" if result["task"] == "feature-extraction"
           else "agreement of predictions with the original's" if result["task"] == "text-classification"
           else f"greedy agreement with the original's {cfg['new_tokens']} new tokens (below)")
        + ("." if result["task"] == "text-generation" else f" on {min(cfg['fidelity_size'], cfg['test_size']):,} test texts."),
        "",
    ]
    for label, note in (prov.get("baselines") or {}).items():  # where a baseline came from, or why it is missing
        lines += [f"Baseline {label}: {note}.", ""]
    lines += [
        _row(head),
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        cells = [r["label"], r["kind"], _mb(r["size_bytes"]), f"{r['parameters'] / 1e6:.2f} M"]
        for b in sizes:
            lat = r["latency"][b]
            cells.append(f"{lat['p50_ms']:.1f} / {lat['p90_ms']:.1f}")
        cells += [f"{r['latency'][largest]['throughput']:.1f}", f"{r['value']:.4f}", f"{r['of_original']:.1%}",
                  "-" if r["fidelity"] is None else f"{r['fidelity']:.3f}"]
        if has_int8:
            cells += [f"{r['speedup_vs_optimum_int8']:.2f}x", f"{r['size_vs_optimum_int8']:.2f}x"]
        if has_o2:
            speeds = r.get("speedups_vs_optimum_o2_int8", {largest: r["speedup_vs_optimum_o2_int8"]})  # older reports: b-largest
            cells += [f"{speeds[b]:.2f}x" if b in speeds else "-" for b in sizes] + [f"{r['size_vs_optimum_o2_int8']:.2f}x"]
        lines.append(_row(cells))
    lines.append("")
    if any("suite" in r for r in result["rows"]):
        lines += suite_table(result)
    if any("generation" in r for r in result["rows"]):
        lines += generation_table(result)
    return "\n".join(lines)


def generation_table(result: dict[str, Any]) -> list[str]:
    """A causal LM's generation figures, one row per model."""
    cfg = result["config"]
    rows = [r for r in result["rows"] if "generation" in r]
    memory = any("peak_rss_mib" in r["generation"] for r in rows)
    against = any("decode_vs_optimum_fp32" in r["generation"] for r in rows)
    head = ["model", "format", "time to first token (ms)", "decode tokens/s", "greedy agreement"]
    head += ["peak memory (MiB)", "of it the model's (MiB)"] if memory else []
    head += ["decode vs optimum fp32", "size vs optimum fp32"] if against else []
    lines = [f"Generation: batch 1, a {cfg['prompt_tokens']}-token prompt, {cfg['new_tokens']} new tokens, greedy, "
             f"{cfg['generation_repeats']} timed runs per row, rows taking turns (medians). Time to first token is "
             f"the prefill and first token; decode tokens/s counts the other {cfg['new_tokens'] - 1}. Greedy "
             "agreement: share of the new tokens equal, position by position, to the original's."
             + (" Peak memory: the resident set of a fresh process that loads the row and generates once; the "
                "model's part is what it adds to one with torch, transformers and onnxruntime imported." if memory else ""),
             "", _row(head), "|" + "---|" * len(head)]
    for r in rows:
        g = r["generation"]
        cells = [r["label"], r["kind"], f"{g['ttft_ms']:.1f}", f"{g['decode_tokens_per_s']:.1f}",
                 f"{g['greedy_agreement']:.1%}"]
        if memory:
            cells += [f"{g['peak_rss_mib']:.0f}", f"{g['model_rss_mib']:.0f}"]
        if against:
            ratio = g["decode_vs_optimum_fp32"]
            cells += ["-" if ratio is None else f"{ratio:.2f}x", f"{g['size_vs_optimum_fp32']:.2f}x"]
        lines.append(_row(cells))
    lines.append("")
    return lines


def chart(result: dict[str, Any], path: Path, *, title: str) -> None:
    """Size (x) against throughput at the largest batch (y); colour is the task metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    largest = str(max(result["config"]["batch_sizes"]))
    x = [r["size_bytes"] / 1e6 for r in rows]
    y = [r["latency"][largest]["throughput"] for r in rows]
    c = [r["value"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5.5 + 0.22 * len(rows)))
    points = ax.scatter(x, y, c=c, cmap="viridis", s=90, edgecolors="black")
    # numbers beside the points and the names in a key below: rows close in size and speed
    # would print their names over each other
    for i, (xi, yi) in enumerate(zip(x, y)):
        ax.annotate(str(i + 1), (xi, yi), textcoords="offset points", xytext=(7, 5), fontsize=8, weight="bold")
    key = "\n".join(f"{i + 1}  {r['label']} ({r['kind']}): {r['metric']} {r['value']:.3f}" for i, r in enumerate(rows))
    fig.text(0.02, 0.01, key, fontsize=7.5, family="monospace", va="bottom")
    fig.subplots_adjust(bottom=0.08 + 0.026 * len(rows))
    ax.margins(x=0.15, y=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("file size (MB, log scale)")
    ax.set_ylabel(f"throughput at batch {largest}, seq {result['config']['seq_len']} (sequences/s)")
    ax.set_title(f"{title}\n{result['config']['threads']} threads, {result['provenance']['cpu']}", fontsize=9)
    fig.colorbar(points, ax=ax, label=result["metric"])
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def suite_table(result: dict[str, Any]) -> list[str]:
    """The quality suite per row: each task's probe accuracy with its standard error, neighbour
    agreement with the original, and the retained mean."""
    cfg = result["config"]
    rows = [r for r in result["rows"] if "suite" in r]
    tasks = list(rows[0]["suite"]["tasks"])
    k = rows[0]["suite"]["neighbours"]
    head = ["model", "format", *tasks, f"neighbour agreement @{k}", "retained"]
    lines = [f"Quality suite (`compress evaluate --suite`): probe accuracy per task +- its standard error "
             f"({cfg['suite_train_size']:,} train / {cfg['suite_test_size']:,} test at most per task); neighbour "
             f"agreement: overlap of each text's {k} nearest neighbours with the original's, on "
             f"{rows[0]['suite']['pool_size']:,} texts; retained: mean over tasks of accuracy over the original's.",
             "", _row(head), "|" + "---|" * len(head)]
    for r in rows:
        s = r["suite"]
        cells = [r["label"], r["kind"]]
        cells += [f"{s['tasks'][t]['accuracy']:.3f} +- {s['tasks'][t]['stderr']:.3f}" for t in tasks]
        cells += [f"{s['neighbour_agreement']:.3f} +- {s['neighbour_stderr']:.3f}", f"{s['retained']:.1%}"]
        lines.append(_row(cells))
    lines.append("")
    return lines
