"""Presenting a share: a short summary for the terminal and a Markdown report."""

from __future__ import annotations

from ..layer_groups import plan_string
from ..render import MIB, fidelity_rows


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
        rows.append(("weights files", f"{m['checkpoint_bytes'] / MIB:.1f} MiB"))
    if "lora_energy_kept_mean" in m:
        rows.append(("residual energy kept by LoRA", f"{m['lora_energy_kept_mean']:.1%} (mean over layers and sublayers)"))
    rows += fidelity_rows(m.get("fidelity"))
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
    from ..models.checkpoint import weight_files

    def write(staged) -> None:
        record.metrics["checkpoint_bytes"] = sum(f.stat().st_size for f in weight_files(staged))
        write_text_atomic(staged / "share_report.json", json.dumps(record.to_dict(), indent=2))
        write_text_atomic(staged / "share_report.md", share_markdown(record, model_name))

    return write
