"""`compress finetune`: recover a compressed model's quality by distilling from the original."""

from __future__ import annotations

import json

import click

from cli.main import cli, emit_result, log_format
from compressor.finetune.config import TRAIN_MODES


@cli.command()
@click.argument("student")
@click.option("--teacher", default=None, help="The original model (default: the source the student's checkpoint records).")
@click.option("--data", default="movie-snippets", show_default=True, help="Training text: a file, a packaged data set, or a Hugging Face dataset id.")
@click.option("--text-column", default=None)
@click.option("--label-column", default=None, help="Labels, for cross-entropy on a classifier.")
@click.option("--encoding", default="utf-8", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(), help="Checkpoint folder (written every --save-every steps and at the end).")
@click.option("--train", "train_mode", type=click.Choice(TRAIN_MODES), default="lora+norms", show_default=True, help="What trains.")
@click.option("--max-steps", type=int, default=None, help="Step budget (default 200 when no --max-minutes).")
@click.option("--max-minutes", type=float, default=None, help="Time budget.")
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-length", type=int, default=64, show_default=True)
@click.option("--max-samples", type=int, default=None, help="Use at most this many training texts.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=50, show_default=True, help="Steps between resumable checkpoints (0: only at the end).")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from the step it stopped at.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--json", "json_path", default=None, help="Write the record as JSON here ('-' prints it).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(student, teacher, data, text_column, label_column, encoding, output, train_mode, max_steps, max_minutes, lr,
             batch_size, max_length, max_samples, device, seed, save_every, resume, overwrite, json_path, quiet):
    """Distil the original (--teacher) into STUDENT, a compressed model, for a short budget.

    The loss is the hidden-state error per layer, plus the pooled-embedding cosine for
    encoders, KL on logits for classifiers and causal LMs, and cross-entropy when the data has
    labels. The first Ctrl-C finishes the current step and saves a usable checkpoint;
    --resume continues from it.
    """
    from compressor.finetune import FinetuneConfig

    if max_steps is None and max_minutes is None:
        max_steps = 200
    config = FinetuneConfig(
        teacher=teacher, data=data, text_column=text_column, label_column=label_column, encoding=encoding,
        train=train_mode, max_steps=max_steps, max_minutes=max_minutes, lr=lr, batch_size=batch_size,
        max_length=max_length, max_samples=max_samples, device=device, seed=seed, save_every=save_every,
    )
    from compressor.io import check_writable

    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)

    from compressor.finetune import finetune as run_finetune
    from compressor.models import load_model

    if resume:
        from compressor.finetune.trainer import check_resumable

        check_resumable(output)
    loaded = load_model(output if resume else student)
    loaded, record = run_finetune(loaded, config, output=output, resume=resume, overwrite=overwrite,
                                  progress=not quiet and json_path != "-" and log_format() == "text")
    result = json.dumps(record.to_dict(), indent=2)
    if emit_result(result, json_path):
        return
    m = record.metrics
    loss = f"; loss {m['loss_first']:.4f} -> {m['loss_last']:.4f}" if m["loss_first"] is not None else "; no step ran"
    click.echo(f"{m['steps']} steps ({m['steps_this_run']} this run, stopped by {m['stopped_by']}) on {m['device']}, "
               f"{record.seconds:.0f} s{loss}")
    if m["stopped_by"] == "interrupted":
        click.echo(f"interrupted: the checkpoint in {output} is usable; continue with --resume")
    click.echo(f"wrote {output}")
