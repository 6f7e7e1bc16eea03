"""Presenting a stage's record in the terminal and in Markdown: what several stages print alike."""

from __future__ import annotations

MIB = 1024 * 1024


def aligned_rows(rows: list[tuple[str, str]]) -> str:
    """A summary as aligned ``label  value`` lines."""
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


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
