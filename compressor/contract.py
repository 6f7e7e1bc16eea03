"""The stage contract: what a stage declares once, and what its runner is given.

A stage is a package with the same three files: ``config.py`` (its `StageConfig`), ``stage.py``
(the stage function, ``model, record = prune(model, PruneConfig(...))``) and ``runner.py`` (the
stage on folders: it reads a model folder, writes its output, returns the `StageRecord`). The
runner module declares the stage once, and the recipe registry (`compressor.pipeline.stages`)
and the ``compress <name>`` command are built from that declaration::

    # compressor/pruning/runner.py
    def run(run: StageRun) -> StageRecord:
        return run_prune(run.model, run.config, run.output, overwrite=run.overwrite,
                         trust_remote_code=run.trust_remote_code)

    STAGE = Stage("prune", PruneConfig, run, writes="model", summary=summary,
                      help="Prune MODEL structurally ...", output_help="Folder for the pruned checkpoint.",
                      key_metrics=("metrics.fidelity.embedding_cosine",))

and one line in `compressor.pipeline.stages` lists the package. The generated command takes
MODEL, one flag per config field, ``-o``, ``--json``, ``--overwrite`` and
``--trust-remote-code``; a stage whose command needs more (several models, ``--resume``) sets
``own_command`` and writes its command by hand in ``cli/``.

This module is core: it imports no stage and no CLI, so every stage can declare itself here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import StageConfig
from .record import StageRecord

#: What a stage writes into its folder: a model the next stages read, an ONNX export, or JSON
#: (and Markdown) only.
WRITES = ("model", "onnx", "json")


@dataclass
class StageRun:
    """What a stage runner is given.

    Attributes:
        config: The stage's options.
        model: The model it reads (a folder, hub id or alias; ``None``: the bundled model): the
            job's model, or the folder of the last stage that wrote one.
        output: The stage's folder.
        job_folder: The job's folder (earlier stages' folders are inside it); ``None`` outside a
            job (a command).
        resume: ``output`` holds an unfinished run of this same stage with these same options
            (only for stages declared ``resumable``).
        overwrite: ``output`` may be replaced (a job's stage folders are the job's own; a
            command sets ``--overwrite``).
        trust_remote_code: The checkpoint's own Python code may run.
        dtype: The dtype a model is read in (``auto``: the checkpoint's own; see
            `compressor.models.load_model`).
        fed: Configs of the stages that feed this one, by stage name (``{"quantize": ...}``).
        records: The records of the job's earlier stages, in order.
        progress: Show progress bars.
        log: Where a long stage's steps go (an `EventLog`; ``None``: nowhere).
        devices: The GPUs the job declared (``num_gpus``); a fine-tune runs on that many
            processes when there are several.
    """

    config: StageConfig
    model: str | None
    output: Path
    job_folder: Path | None = None
    resume: bool = False
    overwrite: bool = True
    trust_remote_code: bool = False
    dtype: str = "auto"
    fed: dict[str, StageConfig] = field(default_factory=dict)
    records: list[StageRecord] = field(default_factory=list)
    progress: bool = False
    log: Any = None
    devices: int = 0


StageRunner = Callable[[StageRun], StageRecord]


@dataclass(frozen=True)
class Stage:
    """A stage, declared once: recipes, the registry and its command are built from this.

    Attributes:
        name: What a recipe and the command call it (``prune``).
        config_class: Its options: the config dataclass its command and recipes build.
        run: The runner on folders; ``None`` for a stage that only feeds the next one.
        reads: What it reads: ``model`` (a model folder, hub id or alias).
        writes: What its folder holds: ``model`` (a checkpoint the following stages read),
            ``onnx`` (an export) or ``json`` (results only); see `WRITES`.
        feeds: The stage that must come right after this one and receives its options.
        resumable: An unfinished run left in its folder can be continued (`StageRun.resume`).
        key_metrics: Dotted paths into the record's dict shown in a batch summary, e.g.
            ``"metrics.accuracy"``; missing ones are left out.
        summary: The command's summary of a record, as terminal text (``None``: none).
        help: The command's help: what it does to MODEL and writes to OUTPUT.
        output_help: The help of the command's ``-o``.
        option_help: Help texts of the command's flags where they differ from the field's.
        own_command: The command is written by hand in ``cli/`` (it takes more than MODEL and
            the config's options); none is generated.
    """

    name: str
    config_class: type[StageConfig]
    run: StageRunner | None
    reads: str = "model"
    writes: str = "json"
    feeds: str | None = None
    resumable: bool = False
    key_metrics: tuple[str, ...] = ()
    summary: Callable[[StageRecord], str] | None = None
    help: str = ""
    output_help: str = "Output folder."
    option_help: Mapping[str, str] = field(default_factory=dict)
    own_command: bool = False

    def __post_init__(self):
        if self.writes not in WRITES:
            raise ValueError(f"stage {self.name!r}: writes is one of {', '.join(WRITES)}, not {self.writes!r}")
        if (self.run is None) == (self.feeds is None):
            raise ValueError(f"stage {self.name!r}: give a runner, or the stage it feeds, not both")

    @property
    def writes_model(self) -> bool:
        """Its folder holds a model, which the following stages read."""
        return self.writes == "model"

    @property
    def has_command(self) -> bool:
        """A ``compress <name>`` command is generated from this declaration."""
        return self.run is not None and not self.own_command

