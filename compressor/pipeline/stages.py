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

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..analysis.config import AnalyzeConfig
from ..config import StageConfig
from ..errors import CompressError, ConfigError
from ..evaluation.evaluate import EvaluateConfig
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


def uses_cuda(config: StageConfig) -> bool:
    """The stage runs on a CUDA device (a Ray job then asks for a GPU)."""
    return str(getattr(config, "device", "")).startswith("cuda")


def write_record(folder: Path, filename: str, record: StageRecord) -> None:
    from ..io import write_text_atomic

    write_text_atomic(folder / filename, json.dumps(record.to_dict(), indent=2))


# ---- runners ----------------------------------------------------------------------------------


def run_analyze(run: StageRun) -> StageRecord:
    """``analysis.json`` and ``analysis.md``, as ``compress analyze -o`` writes them (no heatmaps)."""
    from ..analysis import analyze
    from ..analysis.render import markdown_report
    from ..io import staged_folder, write_text_atomic
    from ..models import load_model

    _, record = analyze(load_model(run.model), run.config)
    with staged_folder(run.output, overwrite=True) as tmp:
        write_record(tmp, "analysis.json", record)
        write_text_atomic(tmp / "analysis.md", markdown_report(record.metrics))
    return record


def run_share(run: StageRun) -> StageRecord:
    """A compressed checkpoint with ``share_report.json``/``.md``, as ``compress share`` writes it."""
    from ..models import load_model
    from ..sharing import save_checkpoint, share
    from ..sharing.render import share_reports

    loaded, record = share(load_model(run.model), run.config)
    save_checkpoint(loaded, run.output, overwrite=True, extra_files=share_reports(record, loaded.name))
    return record


def run_finetune(run: StageRun) -> StageRecord:
    """A compressed checkpoint, as ``compress finetune`` writes it; an unfinished run continues
    from its last saved step (``--resume``). The teacher is the original the student records."""
    from ..finetune import finetune
    from ..finetune.trainer import STATE
    from ..models import load_model

    resume = run.resume and (run.output / STATE).is_file()
    student = load_model(run.output if resume else run.model)
    _, record = finetune(student, run.config, output=run.output, resume=resume, overwrite=True, progress=run.progress)
    if record.metrics["stopped_by"] == "interrupted":
        # Ctrl-C: the checkpoint is saved and resumable, but the stage is not done.
        raise KeyboardInterrupt
    return record


def run_evaluate(run: StageRun) -> StageRecord:
    """``evaluate.json``; with fidelity to the original the model records, if it is not the original."""
    from ..evaluation import evaluate
    from ..io import staged_folder
    from ..models import load_model

    loaded = load_model(run.model)
    teacher, unreachable = None, None
    if loaded.origin and loaded.origin != loaded.source:
        try:
            teacher = load_model(loaded.origin)
        except CompressError as e:  # the original is not reachable from here; the task metric still counts
            unreachable = str(e)
    _, record = evaluate(loaded, run.config, teacher=teacher)
    record.metrics["model"] = loaded.name
    if unreachable:
        record.metrics["fidelity_skipped"] = unreachable
    with staged_folder(run.output, overwrite=True) as tmp:
        write_record(tmp, "evaluate.json", record)
    return record


def run_prune(run: StageRun) -> StageRecord:
    """A pruned checkpoint with ``prune_report.json``/``.md``, as ``compress prune`` writes it."""
    from ..io import write_text_atomic
    from ..models import load_model
    from ..pruning import prune
    from ..pruning.render import prune_markdown
    from ..sharing import save_checkpoint

    loaded, record = prune(load_model(run.model), run.config)

    def reports(staged: Path) -> None:
        write_record(staged, "prune_report.json", record)
        write_text_atomic(staged / "prune_report.md", prune_markdown(record, loaded.name))

    save_checkpoint(loaded, run.output, overwrite=True, extra_files=reports)
    return record


def run_export(run: StageRun) -> StageRecord:
    """An ONNX folder as ``compress export`` writes it, quantized as a ``quantize`` stage before
    it says."""
    from ..export import export
    from ..models import load_model

    return export(load_model(run.model), run.config, run.output, quantize=run.fed.get("quantize"), overwrite=True)


def run_report(run: StageRun) -> StageRecord:
    """``report.md``/``.json``/``.png`` as ``compress report`` writes them: the job's exports
    (every earlier stage folder holding a model.onnx) or, with none, the job's last model,
    against the original the model records and optimum's baselines."""
    from ..io import staged_folder, write_text_atomic
    from ..models import load_model, unique_parameters
    from ..report import report
    from ..report.render import chart, markdown

    exports = sorted(p for p in run.job_folder.iterdir() if p.is_dir() and (p / "model.onnx").is_file()
                     and p.name < run.output.name)
    last = load_model(run.model)
    original = load_model(last.origin) if last.origin and last.origin != last.source else last
    variants = [(p.name, str(p)) for p in exports] or ([] if original is last else [(Path(run.model).name, run.model)])
    title = f"{original.name}: size, speed and accuracy"
    with staged_folder(run.output, overwrite=True) as tmp:
        result = report(original, variants, run.config, work=tmp)
        write_text_atomic(tmp / "report.json", json.dumps(result, indent=2))
        write_text_atomic(tmp / "report.md", markdown(result, title=title))
        chart(result, tmp / "report.png", title=title)
    params, nbytes = unique_parameters(original.model)
    final = result["rows"][-1]
    summary = {k: final.get(k) for k in ("label", "size_bytes", "value", "of_original", "fidelity",
                                         "speedup_vs_optimum_int8", "size_vs_optimum_int8")}
    return StageRecord(stage="report", config=run.config.to_dict(), params_before=params, params_after=final["parameters"],
                       bytes_before=nbytes, bytes_after=final["size_bytes"],
                       metrics={"metric": result["metric"], "last_row": summary, "rows": len(result["rows"])},
                       seconds=result["seconds"])


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
                            "metrics.last_row.size_vs_optimum_int8")))
