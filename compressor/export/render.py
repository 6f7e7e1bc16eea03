"""Human-readable summaries of an export record."""

from __future__ import annotations


def export_summary_rows(record) -> list[tuple[str, str]]:
    m = record.metrics
    check, proj = m["check"], m["projections"]
    rows = [
        ("task", f"{m['task']} (loads with optimum.onnxruntime.{m['ort_class']})"),
        ("precision", m["precision"]),
        ("file", f"{m['file_bytes'] / 2**20:.1f} MiB ({m['file_bytes']:,} bytes)"),
        ("stored numbers", f"{record.params_after:,} for {record.params_before:,} unique parameters"),
        ("projections", f"{proj['on_weights']} on weights, {proj['on_weights'] - proj['float_on_weights']} of them quantized"),
    ]
    lengths = ", ".join(str(b["length"]) for b in check["batches"])
    if m["precision"] == "fp32":
        rows.append(("check vs PyTorch", f"lengths {lengths}: max |diff| {check['max_abs_diff']:.2e} "
                                         f"(tolerance {check['tolerance']['atol']:g} + {check['tolerance']['rtol']:g} x |output|)"))
    else:
        rows.append(("check vs PyTorch", f"lengths {lengths}: mean cosine {check['mean_cosine']:.4f}, lowest "
                                         f"{check['min_cosine']:.4f} (needs >= {check['tolerance']['min_mean_cosine']})"))
    generation = check.get("generation")
    if generation:
        rows.append(("generation check", f"greedy, {generation['new_tokens']} new tokens with the KV cache, "
                                         f"{generation['prompts']} prompts: {generation['token_agreement']:.0%} of "
                                         f"tokens as PyTorch's ({'passed' if generation['passed'] else 'failed'})"))
    rows.append(("time", f"{record.seconds:.1f} s"))
    return rows
