"""Human-readable summaries of an export record."""

from __future__ import annotations


def export_summary_rows(record) -> list[tuple[str, str]]:
    m = record.metrics
    check, proj = m["check"], m["projections"]
    if m.get("layout") == "genai":
        loads = "onnxruntime-genai layout (loads with onnxruntime_genai.Model)"
        shared = f", {proj['reads_of_shared_weights']} more reads of shared ones" if proj["reads_of_shared_weights"] else ""
        lora = f", {proj['lora_matmuls']} LoRA delta MatMuls beside them" if proj["lora_matmuls"] else ""
        projections = f"{proj['weights']} weights stored ({proj['block_weights']} in blocks){shared}{lora}"
    else:
        loads = f"{m['task']} (loads with optimum.onnxruntime.{m['ort_class']})"
        projections = f"{proj['on_weights']} on weights, {proj['on_weights'] - proj['float_on_weights']} of them quantized"
    rows = [
        ("layout", loads),
        ("precision", m["precision"]),
        ("file", f"{m['file_bytes'] / 2**20:.1f} MiB ({m['file_bytes']:,} bytes)"),
        ("stored numbers", f"{record.params_after:,} for {record.params_before:,} unique parameters"),
        ("projections", projections),
    ]
    rows += _graph_rows(m["graph"]) + _check_rows(m, check)
    rows.append(("time", f"{record.seconds:.1f} s"))
    return rows


def _graph_rows(graph: dict) -> list[tuple[str, str]]:
    """What the passes and the quantization did to the graph, where it says anything."""
    rows = []
    blocks = graph.get("blocks")
    if blocks:
        bits = ", ".join(f"{n} in {b}-bit" for b, n in sorted(graph["bits"].items()))
        rows.append(("blocks", f"{bits} blocks of {blocks['block_size']} (accuracy level {blocks['accuracy_level']}): "
                               f"{blocks['fitted']} fitted by calibration, {blocks['int8']} kept in 8 bits, "
                               f"{blocks['rtn']} rounded to nearest; output head {blocks['head_bits']}-bit"
                               + (f"; {blocks['lora_factors']} LoRA factors in 8-bit blocks" if blocks.get("lora_factors")
                                  else "")))
    trained = graph.get("trained_grid")
    if trained:
        off = f"; {trained['off_grid']} off it rounded" if trained.get("off_grid") else ""
        rows.append(("int4 blocks", f"{trained['weights']} weights already on their int4 grid (blocks of "
                                    f"{trained['block_size']}, a --quantize-aware fine-tune's): stored as they are{off}"))
    tables = graph.get("tables")
    if tables and tables.get("tables"):
        hot = (f"; the {tables['hot_rows']:,} most used token rows in 8 bits ({tables['hot_tokens_read']:.0%} of the "
               f"tokens of {tables['hot_rows_counted_on']})" if tables.get("hot_rows") else "")
        rows.append(("embeddings", f"{tables['tables']} table{'s' * (tables['tables'] != 1)} as {tables['bits']}-bit "
                                   f"blocks of {tables['block_size']}{hot}"))
    per_token = graph.get("per_token_inputs")
    if per_token is not None:
        which = " (the FFN down-projections')" if graph.get("per_token") == "ffn-down" else ""
        rows.append(("activations", f"int8 with a range per token at {per_token} projection input"
                                    f"{'s' * (per_token != 1)}{which}" if per_token else
                                    "int8 with one range per tensor: no projection input could take one per token"))
    optimized = graph.get("optimized")
    if optimized:
        fused = ", ".join(f"{n} {op}" for op, n in optimized["fused"].items()) or "nothing fused"
        rows.append(("optimized", f"onnxruntime level {optimized['level']}: {fused}; "
                                  f"{optimized['copies_merged']} identical initializers stored once "
                                  f"({optimized['numbers_merged']:,} numbers saved)"))
    return rows


def _check_rows(m: dict, check: dict) -> list[tuple[str, str]]:
    """The export's checks, each threshold beside the number it applies to."""
    rows = []
    lengths = ", ".join(str(b["length"]) for b in check["batches"])
    # a record only exists for an export that passed (a failing one raises), but the line says
    # so in words, with each threshold beside the number it applies to
    if m["precision"] == "fp32":
        tol = check["tolerance"]
        rows.append(("check vs PyTorch", f"lengths {lengths}: max |diff| {check['max_abs_diff']:.2e}, every output "
                                         f"within {tol['atol']:g} + {tol['rtol']:g} x |output|: passed"))
    else:
        rows.append(("check vs PyTorch", f"lengths {lengths}: mean cosine {check['mean_cosine']:.4f} (needs >= "
                                         f"{check['tolerance']['min_mean_cosine']} at every length: passed); lowest "
                                         f"single row {check['min_cosine']:.4f} (shown, no threshold)"))
    st = check.get("sentence_transformers")
    if st:
        norms = (f", norms {st['norm_min']:.4f}..{st['norm_max']:.4f} (need 1 +- 0.001: passed)" if st["normalize"]
                 else " (the model does not normalize)")
        rows.append(("sentence-transformers", f"{' -> '.join(st['modules'])}: cosine to PyTorch mean "
                                              f"{st['mean_cosine']:.5f}, lowest {st['min_cosine']:.5f} ({_needs(st)}: "
                                              f"passed){norms}"))
    pooled = check.get("sentence_embedding")
    if pooled:
        rows.append(("sentence_embedding", f"in the graph, plain onnxruntime: cosine to PyTorch mean "
                                           f"{pooled['mean_cosine']:.5f}, lowest {pooled['min_cosine']:.5f} ({_needs(pooled)}: "
                                           "passed)"))
    generation = check.get("generation")
    if generation:
        rows.append(("generation check", f"greedy, {generation['new_tokens']} new tokens with the KV cache, "
                                         f"{generation['prompts']} prompts: {generation['token_agreement']:.0%} of "
                                         f"tokens as PyTorch's ({'passed' if generation['passed'] else 'failed'})"))
    return rows


def _needs(check) -> str:
    """``lowest needs >= 0.9999`` or ``mean needs >= 0.9``: the threshold beside its number."""
    (which, value), = check["needs"].items()
    return f"{'lowest' if which == 'min_cosine' else 'mean'} needs >= {value}"
