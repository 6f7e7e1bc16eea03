"""`compress share`: merge layers into shared groups, with optional per-layer LoRA deltas."""

from __future__ import annotations

import json

import click

from cli.main import cli, echo_rows, emit_result
from cli.options import build_config, check_json, checkpoint_outputs, config_options
from compressor.sharing.config import ShareConfig


@cli.command()
@click.argument("model", required=False)
@config_options(ShareConfig, overrides={"plan_metric": {"help": "Similarity that picks the plan with --groups."}})
@checkpoint_outputs("Folder for the compressed checkpoint.")
def share(model, output, json_path, overwrite, trust_remote_code, **options):
    """Merge MODEL's layers into shared groups and write a compressed checkpoint to OUTPUT.

    Layers of a group use one set of weights for the shared sublayers; each keeps its own
    norms and biases, and with --lora-rank its own low-rank delta. The checkpoint stores every
    shared tensor once; every compress command takes it as MODEL.
    """
    from compressor.sharing.render import share_summary_rows
    from compressor.sharing.runner import run_share

    config = build_config(ShareConfig, options)
    check_json(json_path, output, overwrite=overwrite)
    record = run_share(model, config, output, overwrite=overwrite, trust_remote_code=trust_remote_code)
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    echo_rows(share_summary_rows(record))
    if record.metrics.get("note"):
        click.echo("\n" + record.metrics["note"])
    click.echo(f"wrote {output}")
