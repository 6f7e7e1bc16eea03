"""`compress inspect`: the adapter compress uses for a model, and what its self-checks found."""

from __future__ import annotations

import json

import click

from cli.main import cli, emit_result
from cli.options import dtype_option, json_option, overwrite_option, trust_remote_code_option


@cli.command()
@click.argument("model", required=False)
@click.option("--infer", is_flag=True, help="Infer the adapter from the model's structure even where one is declared (to compare).")
@json_option
@overwrite_option
@trust_remote_code_option
@dtype_option
def inspect(model, infer, json_path, overwrite, trust_remote_code, dtype):
    """Show how compress reads MODEL: the adapter (declared for its family, or inferred from
    its structure), the module path, shape and rows of every role, norms and per-head state,
    and each self-check (mapping, permutations, pruning) with its result.

    A model whose adapter fails the mapping check is refused (exit 2), as every command refuses it.
    """
    from compressor.adapters.describe import describe, describe_text
    from compressor.io import check_writable
    from compressor.models import load_model
    from compressor.pruning.checks import prove_pruning

    if json_path and json_path != "-":
        check_writable(json_path, overwrite=overwrite)
    loaded = load_model(model, trust_remote_code=trust_remote_code, infer_adapter=infer, dtype=dtype)
    result = describe(loaded, seconds=prove_pruning(loaded))
    if not emit_result(json.dumps(result, indent=2) + "\n", json_path):
        click.echo(describe_text(result))
