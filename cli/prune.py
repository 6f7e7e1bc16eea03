"""`compress prune`: remove attention heads, FFN neurons, whole layers and unused vocabulary."""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from cli.options import build_config, check_json, checkpoint_outputs, config_options
from compressor.pruning.config import PruneConfig


@cli.command()
@click.argument("model", required=False)
@config_options(PruneConfig, overrides={
    "text_column": {"help": "Column (csv/tsv) or key (jsonl) holding the text of --data and --vocab-from."},
    "encoding": {"help": "Text encoding of --data and --vocab-from.", "show_default": True},
})
@checkpoint_outputs("Folder for the pruned checkpoint.")
def prune(model, output, json_path, overwrite, trust_remote_code, **options):
    """Prune MODEL structurally and write the smaller checkpoint to OUTPUT.

    Rows and columns are removed for real, so the model gets faster, not only sparser; the
    config follows the new shapes. Layers that share weights keep the same heads and neurons.
    """
    from compressor.pruning.render import prune_summary_rows
    from compressor.pruning.runner import run_prune

    config = build_config(PruneConfig, options)
    check_json(json_path, output, overwrite=overwrite)
    record = run_prune(model, config, output, overwrite=overwrite, trust_remote_code=trust_remote_code)
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    echo_rows(prune_summary_rows(record), output)
