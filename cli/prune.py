"""`compress prune`: remove attention heads, FFN neurons, whole layers and unused vocabulary."""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from compressor.pruning.config import SCORES


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the pruned checkpoint.")
@click.option("--heads", type=float, default=0.0, show_default=True, help="Share of attention heads to remove in every layer, in [0, 1).")
@click.option("--ffn", type=float, default=0.0, show_default=True, help="Share of FFN neurons to remove in every layer, in [0, 1).")
@click.option("--drop-layers", type=int, default=0, show_default=True, help="Remove this many layers (lowest Block Influence).")
@click.option("--score", type=click.Choice(SCORES), default="taylor", show_default=True, help="taylor: first-order effect on the sublayer output on calibration text; magnitude: weight norms.")
@click.option("--vocab-from", default=None, help="Keep only the tokens this data uses (file, movie-snippets, or hub dataset id) plus special tokens.")
@click.option("--vocab-min-count", type=int, default=1, show_default=True, help="With --vocab-from: keep only tokens the data uses at least this often (above 1, rare words are spelled with kept pieces).")
@click.option("--data", type=click.Path(), default=None, help="Calibration text (.txt, .csv, .tsv, .jsonl; default: the --vocab-from text if given, else built-in sentences).")
@click.option("--text-column", default=None, help="Column (csv/tsv) or key (jsonl) holding the text.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("--max-samples", type=int, default=64, show_default=True, help="Calibration texts.")
@click.option("--fidelity/--no-fidelity", default=True, show_default=True, help="Compare with the model as it came in.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(), default=None, help="Also write the record as JSON here ('-' prints it instead of the summary).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--trust-remote-code", is_flag=True, help="Allow the checkpoint's own Python code to run.")
def prune(model, output, heads, ffn, drop_layers, score, vocab_from, vocab_min_count, data, text_column, encoding, max_samples, fidelity,
          device, json_path, overwrite, trust_remote_code):
    """Prune MODEL structurally and write the smaller checkpoint to OUTPUT.

    Rows and columns are removed for real, so the model gets faster, not only sparser; the
    config follows the new shapes. Layers that share weights keep the same heads and neurons.
    """
    from compressor.io import check_distinct, check_writable
    from compressor.pruning import PruneConfig

    config = PruneConfig(heads=heads, ffn=ffn, drop_layers=drop_layers, score=score, vocab_from=vocab_from,
                         vocab_min_count=vocab_min_count, data=data,
                         text_column=text_column, encoding=encoding, max_samples=max_samples, fidelity=fidelity,
                         device=device)
    check_distinct(output, json_path)
    check_writable(output, overwrite=overwrite, folder=True)
    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)

    from pathlib import Path

    from compressor.io import write_text_atomic
    from compressor.models import load_model
    from compressor.pruning import prune as run_prune
    from compressor.pruning.render import prune_markdown, prune_summary_rows
    from compressor.sharing import save_checkpoint

    loaded = load_model(model, trust_remote_code=trust_remote_code)
    loaded, record = run_prune(loaded, config)

    def reports(staged: Path) -> None:
        write_text_atomic(staged / "prune_report.json", json.dumps(record.to_dict(), indent=2))
        write_text_atomic(staged / "prune_report.md", prune_markdown(record, loaded.name))

    save_checkpoint(loaded, output, overwrite=overwrite, extra_files=reports)
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    echo_rows(prune_summary_rows(record), output)
