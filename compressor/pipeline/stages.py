"""The stages a recipe can name: one registry entry each, built from the stages' declarations.

Every stage package declares itself once, as ``STAGE = Stage(...)`` in its ``runner.py`` (see
`compressor.contract`): its config class, which a recipe's options build, and its runner on
folders, which reads the model ``run.model``, writes its output into ``run.output`` and returns
the stage's `StageRecord`. `STAGE_PACKAGES` lists the packages; adding a stage is a package and
one line there. The ``compress`` command of a declared stage is generated from the same
declaration (``cli/stages.py``).

A stage whose options only configure the next one (``quantize`` for ``export``) is registered
with ``run=None`` and ``feeds="export"``; a recipe must then put the fed stage right after it,
and that stage's runner finds the options in ``run.fed["quantize"]``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from ..config import StageConfig
from ..contract import Stage, StageRun, StageRunner
from ..errors import ConfigError
from ..record import StageRecord

__all__ = ["STAGES", "STAGE_PACKAGES", "Stage", "StageRun", "StageRunner", "get_stage", "key_metrics", "recipe_schema",
           "register", "uses_cuda"]

#: The stage packages, each declaring itself in ``compressor.<package>.runner.STAGE``, in the
#: order recipes and the schema list them.
STAGE_PACKAGES = ("analysis", "sharing", "finetune", "evaluation", "pruning", "quantization", "export", "report")

#: name -> stage, in registration order.
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to the registry (a name is registered once); recipes, the recipe schema and,
    unless the stage has its own, the ``compress`` command see it at once."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is already registered")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> Stage:
    """The registered stage called ``name``.

    Raises:
        ConfigError: no such stage; the message lists the known ones.
    """
    if name not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return STAGES[name]


def key_metrics(record: StageRecord) -> dict[str, Any]:
    """The record's summary numbers, named ``<stage>.<path>`` (``evaluate.accuracy``)."""
    data = record.to_dict()
    found = {}
    for path in get_stage(record.stage).key_metrics:
        value: Any = data
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            found[f"{record.stage}.{path.removeprefix('metrics.')}"] = value
    return found


def recipe_schema() -> dict[str, Any]:
    """Every stage a recipe can name with its options (name, kind, default, help, choices):
    read from the same config dataclasses the commands build their flags from."""
    from ..config import option_specs, plain_help

    def options(stage: Stage) -> list[dict[str, Any]]:
        specs = option_specs(stage.config_class)
        names = {spec.name for spec in specs}
        return [{**spec.to_dict(), "help": plain_help(spec.help, names)} for spec in specs]

    return {name: {"writes_model": stage.writes_model, "feeds": stage.feeds, "options": options(stage)}
            for name, stage in STAGES.items()}


def uses_cuda(config: StageConfig) -> bool:
    """The stage runs on a CUDA device (a Ray job then asks for a GPU)."""
    return str(getattr(config, "device", "")).startswith("cuda")


def _declared(package: str) -> Stage:
    """The stage ``compressor.<package>`` declares, composed with what it needs from another stage."""
    stage = importlib.import_module(f"compressor.{package}.runner").STAGE
    if stage.name == "share":
        from .compose import run_share  # share --groups K plans with the analysis stage

        stage = dataclasses.replace(stage, run=run_share)
    return stage


for _package in STAGE_PACKAGES:
    register(_declared(_package))
