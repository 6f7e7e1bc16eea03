"""The ``compress`` commands made from stage declarations (`compressor.contract.Stage`).

A declared stage without a command of its own gets ``compress <name> [MODEL]`` with one flag per
field of its config, ``-o``, ``--json``, ``--overwrite`` and ``--trust-remote-code``: the options
are parsed into the config, the stage's runner writes OUTPUT, and the stage's summary is printed.
The group (`cli.main.CompressGroup`) asks the registry on every lookup, so a stage registered
after import is a command too.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.options import build_config, check_json, checkpoint_outputs, config_options, dtype_option


def declared_stages() -> dict:
    """The registered stages that get a generated command, by name."""
    from compressor.pipeline import stages

    return {name: stage for name, stage in stages.STAGES.items() if stage.has_command}


def declared_commands() -> dict[str, click.Command]:
    """The generated command of every declared stage that has no command of its own, by name."""
    return {name: stage_command(name) for name in declared_stages()}


_BUILT: dict[str, tuple[object, click.Command]] = {}


def stage_command(name: str) -> click.Command | None:
    """The generated command of the declared stage ``name`` (``None``: no such stage, or it has its
    own command)."""
    stage = declared_stages().get(name)
    if stage is None:
        return None
    if name not in _BUILT or _BUILT[name][0] is not stage:  # re-registered: build it again
        _BUILT[name] = (stage, build_command(stage))
    return _BUILT[name][1]


def build_command(stage) -> click.Command:
    """``compress <stage.name>``: MODEL, the config's options and the outputs every stage command takes."""
    from cli.main import emit_result

    def command(model, output, json_path, overwrite, trust_remote_code, dtype, **options):
        from compressor.contract import StageRun

        config = build_config(stage.config_class, options)
        check_json(json_path, output, overwrite=overwrite)
        record = stage.run(StageRun(config=config, model=model, output=Path(output), overwrite=overwrite,
                                    trust_remote_code=trust_remote_code, dtype=dtype))
        if emit_result(json.dumps(record.to_dict(), indent=2), json_path):
            return
        text = stage.summary(record) if stage.summary else ""
        if text:
            click.echo(text)
        click.echo(f"wrote {output}")

    command = dtype_option(checkpoint_outputs(stage.output_help)(command))
    overrides = {field: {"help": text} for field, text in stage.option_help.items()}
    command = config_options(stage.config_class, overrides=overrides)(command)
    command = click.argument("model", required=False)(command)
    return click.command(stage.name, help=stage.help or None)(command)
