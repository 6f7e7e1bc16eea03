"""`compress finetune`: recover a compressed model's quality by distilling from the original."""

from __future__ import annotations

import json
import os

import click

from cli.main import cli, emit_result
from cli.options import build_config, check_json, config_options, json_option, output_option, overwrite_option
from compressor.finetune.config import FinetuneConfig


@cli.command()
@click.argument("student")
@config_options(FinetuneConfig)
@output_option("Checkpoint folder (written every --save-every steps and at the end).")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from the step it stopped at.")
@overwrite_option
@json_option
@click.option("--quiet", is_flag=True, help="No progress bar or progress lines.")
def finetune(student, output, resume, overwrite, json_path, quiet, **options):
    """Distil the original (--teacher) into STUDENT, a compressed model, for a short budget.

    The loss is the hidden-state error per layer, plus the pooled-embedding cosine for
    encoders, KL on logits for classifiers and causal LMs, and cross-entropy when the data has
    labels. The first Ctrl-C finishes the current step and saves a usable checkpoint;
    --resume continues from it.
    """
    from compressor.finetune.runner import run_finetune

    config = build_config(FinetuneConfig, options)
    check_json(json_path, output, overwrite=overwrite)
    record = run_finetune(student, config, output, resume=resume, overwrite=overwrite,
                          progress=not quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 writes and speaks for the run
        return
    if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
        return
    m = record.metrics
    loss = f"; loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}" if m["loss_first"] is not None else "; no step ran"
    held = f", {m['held_out']:,} held out" if m.get("held_out") else ""
    click.echo(f"{m['steps']} steps ({m['steps_this_run']} this run, stopped by {m['stopped_by']}) on {m['device']}, "
               f"{record.seconds:.0f} s{loss}; {m['texts']:,} training texts{held}")
    if m["stopped_by"] == "interrupted":
        click.echo(f"interrupted: the checkpoint in {output} is usable; continue with --resume")
    click.echo(f"wrote {output}")
