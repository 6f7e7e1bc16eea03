"""Presenting a share: a short summary for the terminal and a Markdown report."""

from __future__ import annotations

from ..analysis.grouping import plan_string

MIB = 1024 * 1024


def share_summary_rows(record) -> list[tuple[str, str]]:
    """(label, value) rows describing a share record."""
    m = record.metrics
    rows = [
        ("plan", f"{plan_string(m['plan'])} ({m['plan_source']})"),
        ("shared sublayers", ", ".join(m["shared_modules"])),
        ("init", f"{record.config['init']}, LoRA rank {record.config['lora_rank']}"
                 + (f" ({record.config['lora_init']})" if record.config["lora_rank"] else "")),
        ("unique parameters", (f"{record.params_before:,} -> {record.params_after:,} "
                               f"({record.params_after / record.params_before:.1%}; LoRA {m['lora_params']:,})")),
        ("weights in memory", f"{record.bytes_before / MIB:.1f} MiB -> {record.bytes_after / MIB:.1f} MiB"),
    ]
    if "checkpoint_bytes" in m:
        rows.append(("model.safetensors", f"{m['checkpoint_bytes'] / MIB:.1f} MiB"))
    if "lora_energy_kept_mean" in m:
        rows.append(("residual energy kept by LoRA", f"{m['lora_energy_kept_mean']:.1%} (mean over layers and sublayers)"))
    rows += fidelity_rows(m.get("fidelity"))
    return rows


def fidelity_rows(f: dict | None) -> list[tuple[str, str]]:
    """(label, value) rows for a fidelity result (`compressor.fidelity`)."""
    if not f:
        return []
    rows = [("embedding cosine to original", f"{f['embedding_cosine']:.4f} on {f['num_texts']} texts")]
    if "next_token_kl" in f:
        rows.append(("next-token KL to original", f"{f['next_token_kl']:.4f} nats/token"))
    if f.get("hidden_state_error") is not None:
        rows.append(("hidden-state error per layer", " ".join(f"{e:.3f}" for e in f["hidden_state_error"])))
    return rows


def share_markdown(record, model_name: str) -> str:
    lines = [f"# Share: {model_name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in share_summary_rows(record)]
    if record.metrics.get("note"):
        lines += ["", record.metrics["note"]]
    return "\n".join(lines) + "\n"


def share_reports(record, model_name: str):
    """The ``extra_files`` callback of `save_checkpoint` that writes ``share_report.json`` and
    ``share_report.md`` into the staged checkpoint (after measuring its weights file)."""
    import json

    from ..io import write_text_atomic
    from ..models.checkpoint import WEIGHTS

    def write(staged) -> None:
        record.metrics["checkpoint_bytes"] = (staged / WEIGHTS).stat().st_size
        write_text_atomic(staged / "share_report.json", json.dumps(record.to_dict(), indent=2))
        write_text_atomic(staged / "share_report.md", share_markdown(record, model_name))

    return write
