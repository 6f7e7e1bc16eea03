"""`compress run` (one model through a recipe) and `compress batch` (many models x recipes)."""

from __future__ import annotations

import json

import click

from cli.main import EXIT_OK, cli, emit_result, log_format
from cli.options import json_option, output_option

#: What --dry-run says for each action.
_WOULD = {"run": "would run", "continue": "would continue", "skip": "would skip", "fail": "would fail"}


def print_schema(ctx, param, value):
    """``--schema``: every recipe stage's options as JSON, then exit."""
    if value:
        from compressor.pipeline.stages import recipe_schema

        click.echo(json.dumps(recipe_schema(), indent=2, default=str))
        ctx.exit(EXIT_OK)


@cli.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--schema", is_flag=True, expose_value=False, is_eager=True, callback=print_schema,
              help="Print every stage a recipe can name, with its options, as JSON, and exit.")
@click.option("--model", default=None, help="The model (default: the recipe's 'model', else the bundled MiniLM).")
@output_option("The job's folder: one subfolder per stage, report.json, DONE.json.")
@click.option("--dry-run", is_flag=True, help="Say whether the job would run, continue or be skipped, and why; run nothing.")
@click.option("--overwrite", is_flag=True,
              help="Replace a folder that holds the job of another recipe or another model (refused without).")
@json_option
def run(recipe, model, output, dry_run, overwrite, json_path):
    """Run the stages of RECIPE (a YAML file) on a model, each stage's output in OUTPUT/NN-stage.

    The recipe is validated before anything runs. Run again, the command skips a job done with
    the same model and recipe, and continues an unfinished one from its last finished stage
    (a fine-tuning stage from its last checkpoint).
    """
    from compressor.errors import CompressError
    from compressor.io import check_writable
    from compressor.pipeline import EventLog, job_for_recipe, load_recipe, plan_job, run_job

    job = job_for_recipe(load_recipe(recipe), output, model)
    check_writable(output, overwrite=True, folder=True)
    plan = plan_job(job, overwrite=overwrite)
    if plan.action == "fail":
        raise CompressError(plan.reason)
    if dry_run:
        if not emit_result(json.dumps(plan.to_dict(), indent=2), json_path):
            click.echo(f"{_WOULD[plan.action]} {job.name}: {plan.reason}")
        return EXIT_OK
    log = EventLog(log_format())
    if plan.action == "skip":
        log.emit("job_skip", job=job.name, reason=plan.reason)
        result = plan.result
    else:
        result = run_job(job, plan.keys, log=log, reason=plan.reason, reraise=True,
                         progress=log.format == "text" and json_path != "-")
    if emit_result(json.dumps(result.to_dict(), indent=2), json_path):
        return EXIT_OK
    from compressor.pipeline.job import format_value

    click.echo(f"{job.name}: {result.status} ({result.seconds:.1f} s of work)")
    for key, value in result.metrics.items():
        click.echo(f"  {key:<36} {format_value(value)}")
    click.echo(f"wrote {output}")
    return EXIT_OK


@cli.command()
@click.argument("manifest", type=click.Path())
@output_option("The batch folder: one folder per job, summary.json, summary.md.")
@click.option("--jobs", "workers", type=int, default=1, show_default=True, help="Jobs at once, in parallel processes (local executor).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine; ray: tasks on a Ray cluster, each asking for its CPUs (and a GPU when a stage runs on cuda).")
@click.option("--address", default=None, help="Ray cluster: ray://host:10001, host:6379 or auto (default: start a local Ray instance).")
@click.option("--retries", type=int, default=2, show_default=True,
              help="Ray: times a job runs again after its node or worker process died (on another node when its node "
                   "died); it continues from its last finished stage and fine-tuning checkpoint (a job's own error is "
                   "not retried).")
@click.option("--placement-timeout", type=float, default=None, metavar="SECONDS",
              help="Ray: how long a job waits for a node that has its resources when no node does. Unset, such a job "
                   "stops the batch before it starts (exit 2), and a job whose only fitting node died waits 120 s.")
@click.option("--dry-run", is_flag=True, help="List what would run, continue, be skipped or fail, and why; run nothing.")
@json_option
def batch(manifest, output, workers, executor, address, retries, placement_timeout, dry_run, json_path):
    """Run every job of MANIFEST (models x recipes, or jobs one by one), each in OUTPUT/JOB.

    Every recipe is validated first. A job that fails records its error and the others go on;
    at the end OUTPUT/summary.md and summary.json list every job with its key metrics, and the
    exit code is 1 if a job failed. Run again, it skips jobs done with the same inputs and
    recipe, reruns those whose recipe changed and continues unfinished ones.
    """
    from compressor.config import check_int, devices_elsewhere
    from compressor.pipeline import EventLog, load_manifest, plan_batch, run_batch
    from compressor.pipeline.executors import RayOptions

    check_int("jobs", workers, 1)  # before the manifest is read
    ray_options = RayOptions(retries=retries, placement_timeout=placement_timeout)
    for flag, given in (("--address", address is not None), ("--placement-timeout", placement_timeout is not None),
                        ("--retries", retries != 2)):
        if given and executor != "ray":
            raise click.UsageError(f"{flag} is for --executor ray")
    if workers > 1 and executor == "ray":
        raise click.UsageError("--jobs is for the local executor; on Ray, each job's num_cpus/num_gpus decide how many run at once")
    if executor == "ray":
        with devices_elsewhere():  # the cluster's nodes have the GPUs, maybe not this machine
            jobs = load_manifest(manifest, output)
    else:
        jobs = load_manifest(manifest, output)
    if dry_run:
        plans = plan_batch(jobs)
        if emit_result(json.dumps([p.to_dict() for p in plans], indent=2), json_path):
            return EXIT_OK
        width = max(len(p.job.name) for p in plans)
        for p in plans:
            click.echo(f"{_WOULD[p.action]:<14} {p.job.name:<{width}}  {p.reason}")
        return EXIT_OK
    log = EventLog(log_format())
    summary = run_batch(jobs, output, executor=executor, workers=workers, address=address, log=log,
                        progress=log.format == "text" and executor == "local" and workers == 1 and json_path != "-",
                        ray_options=ray_options)
    if not emit_result(json.dumps(summary.to_dict(), indent=2), json_path):
        click.echo(summary.markdown(), nl=False)
        click.echo(f"wrote {output}/summary.md and summary.json")
    return summary.exit_code
