"""The stages a recipe can name: one registry entry each.

An entry ties a recipe's stage name to the `StageConfig` its command uses (so a recipe has no
second set of options) and to a runner that does the work on folders: it reads the model
``run.model``, writes its output into ``run.output`` and returns the stage's `StageRecord`.
Runners call the library (``share``, ``finetune``, ...), never the CLI.

Adding a stage is one `register` call::

    register(Stage("prune", PruneConfig, run_prune, writes_model=True))

A stage whose options only configure the next one (``quantize`` for ``export``) is registered
with ``run=None`` and ``feeds="export"``; a recipe must then put the fed stage right after it,
and that stage's runner finds the options in ``run.fed["quantize"]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.config import AnalyzeConfig
from ..config import StageConfig
from ..errors import ConfigError
from ..evaluation.config import EvaluateConfig
from ..export.config import ExportConfig
from ..finetune.config import FinetuneConfig
from ..pruning.config import PruneConfig
from ..quantization.config import QuantizeConfig
from ..record import StageRecord
from ..report.config import ReportConfig
from ..sharing.config import ShareConfig


@dataclass
class StageRun:
    """What a stage runner is given.

    Attributes:
        config: The stage's options.
        model: The model it reads: the job's model, or the folder of the last stage that wrote one.
        output: The stage's folder. It does not exist, except when ``resume`` is set.
        job_folder: The job's folder (earlier stages' folders are inside it).
        resume: ``output`` holds an unfinished run of this same stage with these same options
            (only for stages registered as ``resumable``).
        fed: Configs of the stages that feed this one, by stage name (``{"quantize": ...}``).
        records: The records of the job's earlier stages, in order.
        progress: Show progress bars.
    """

    config: StageConfig
    model: str
    output: Path
    job_folder: Path
    resume: bool = False
    fed: dict[str, StageConfig] = field(default_factory=dict)
    records: list[StageRecord] = field(default_factory=list)
    progress: bool = False


StageRunner = Callable[[StageRun], StageRecord]


@dataclass(frozen=True)
class Stage:
    """A stage a recipe can name.

    Attributes:
        name: What a recipe calls it.
        config_class: Its options: the config class its command builds.
        run: Does the work; ``None`` for a stage that only feeds the next one.
        writes_model: Its folder holds a model, which the following stages read.
        feeds: The stage that must come right after this one and receives its options.
        resumable: An unfinished run left in its folder can be continued (`StageRun.resume`).
        key_metrics: Dotted paths into the record's dict shown in a batch summary, e.g.
            ``"metrics.accuracy"``; missing ones are left out.
    """

    name: str
    config_class: type[StageConfig]
    run: StageRunner | None
    writes_model: bool = False
    feeds: str | None = None
    resumable: bool = False
    key_metrics: tuple[str, ...] = ()


#: name -> stage, in registration order.
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to the registry (a name is registered once)."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is already registered")
    if (stage.run is None) == (stage.feeds is None):
        raise ValueError(f"stage {stage.name!r}: give a runner, or the stage it feeds, not both")
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


# ---- runners: each calls its stage's own, as the command does -----------------------------


def run_analyze(run: StageRun) -> StageRecord:
    """``analysis.json`` and ``analysis.md``, as ``compress analyze -o`` writes them (no heatmaps)."""
    from ..analysis.runner import run_analyze as analyze

    record, _ = analyze(run.model, run.config, run.output, plots=False, overwrite=True)
    return record


def run_share(run: StageRun) -> StageRecord:
    """A compressed checkpoint with ``share_report.json``/``.md``, as ``compress share`` writes it."""
    from ..sharing.runner import run_share as share

    return share(run.model, run.config, run.output, overwrite=True)


def run_finetune(run: StageRun) -> StageRecord:
    """A compressed checkpoint, as ``compress finetune`` writes it; an unfinished run continues
    from its last saved step (``--resume``). The teacher is the original the student records."""
    from ..finetune.runner import run_finetune as finetune
    from ..finetune.stage import STATE

    resume = run.resume and (run.output / STATE).is_file()
    record = finetune(run.model, run.config, run.output, resume=resume, overwrite=True, progress=run.progress)
    if record.metrics["stopped_by"] == "interrupted":
        # Ctrl-C: the checkpoint is saved and resumable, but the stage is not done.
        raise KeyboardInterrupt
    return record


def run_evaluate(run: StageRun) -> StageRecord:
    """``evaluate.json``; with fidelity to the original the model records, if it is not the original."""
    from ..evaluation.runner import run_evaluate as evaluate

    return evaluate(run.model, run.config, run.output, overwrite=True)


def run_prune(run: StageRun) -> StageRecord:
    """A pruned checkpoint with ``prune_report.json``/``.md``, as ``compress prune`` writes it."""
    from ..pruning.runner import run_prune as prune

    return prune(run.model, run.config, run.output, overwrite=True)


def run_export(run: StageRun) -> StageRecord:
    """An ONNX folder as ``compress export`` writes it, quantized as a ``quantize`` stage before
    it says."""
    from ..export.runner import run_export as export

    return export(run.model, run.config, run.output, quantize=run.fed.get("quantize"), overwrite=True)


def run_report(run: StageRun) -> StageRecord:
    """``report.md``/``.json``/``.png`` as ``compress report`` writes them: the job's exports
    (every earlier stage folder holding a model.onnx) or, with none, the job's last model,
    against the original the model records and optimum's baselines."""
    from ..models import load_model
    from ..report.runner import report_record
    from ..report.runner import run_report as report

    exports = sorted(p for p in run.job_folder.iterdir() if p.is_dir() and (p / "model.onnx").is_file()
                     and p.name < run.output.name)
    last = load_model(run.model)
    original = load_model(last.origin) if last.origin and last.origin != last.source else last
    variants = [(p.name, str(p)) for p in exports] or ([] if original is last else [(Path(run.model).name, run.model)])
    from .events import EventLog

    # the report takes minutes: its steps go to stderr as `compress report`'s do, when progress is shown
    result, _ = report(original, variants, run.config, run.output, overwrite=True,
                       log=EventLog() if run.progress else None)
    return report_record(original, run.config, result)


register(Stage("analyze", AnalyzeConfig, run_analyze, key_metrics=("metrics.grouping.plan",)))
register(Stage("share", ShareConfig, run_share, writes_model=True,
               key_metrics=("metrics.fidelity.embedding_cosine",)))
register(Stage("finetune", FinetuneConfig, run_finetune, writes_model=True, resumable=True,
               key_metrics=("metrics.steps", "metrics.loss_last")))
register(Stage("evaluate", EvaluateConfig, run_evaluate,
               key_metrics=("metrics.accuracy", "metrics.macro_f1", "metrics.perplexity",
                            "metrics.fidelity.embedding_cosine")))
register(Stage("prune", PruneConfig, run_prune, writes_model=True,
               key_metrics=("metrics.fidelity.embedding_cosine",)))
register(Stage("quantize", QuantizeConfig, None, feeds="export"))
register(Stage("export", ExportConfig, run_export,
               key_metrics=("metrics.precision", "metrics.file_bytes", "metrics.check.mean_cosine")))
register(Stage("report", ReportConfig, run_report,
               key_metrics=("metrics.last_row.of_original", "metrics.last_row.speedup_vs_optimum_int8",
                            "metrics.last_row.size_vs_optimum_int8", "metrics.last_row.speedup_vs_optimum_o2_int8",
                            "metrics.last_row.size_vs_optimum_o2_int8", "metrics.last_row.suite_retained",
                            "metrics.last_row.neighbour_agreement", "metrics.last_row.decode_tokens_per_s")))
