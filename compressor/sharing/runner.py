"""The sharing stage on folders: a model in, a compressed checkpoint with its report out.

`compress share` and a recipe's ``share`` stage both run `run_share`; `STAGE` declares the stage.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..contract import StageRun, Stage
from ..io import check_writable
from ..record import StageRecord
from .config import ShareConfig


def run_share(model, config: ShareConfig, output: str | Path, *, overwrite: bool = False,
              trust_remote_code: bool = False, plan_with: Callable | None = None, dtype="auto") -> StageRecord:
    """Share ``model``'s layers and write the checkpoint, with ``share_report.json``/``.md``, to
    ``output``.

    Args:
        dtype: The dtype ``model`` is read in (see `compressor.models.load_model`); the
            checkpoint keeps it.
        plan_with: ``(loaded, config) -> Grouping``: the analysis that plans ``--groups K`` when no
            ``analysis`` file is given (the pipeline passes the analysis stage's; see
            `compressor.pipeline.compose`). Called after the checks that need no data.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is not set (before any work).
    """
    from ..models import as_loaded
    from ..models.checkpoint import save_checkpoint
    from .render import share_reports
    from .stage import check_selection, share

    check_writable(output, overwrite=overwrite, folder=True)
    loaded = as_loaded(model, trust_remote_code=trust_remote_code, dtype=dtype)
    grouping = None
    if plan_with is not None and config.groups is not None and config.analysis is None:
        check_selection(loaded, config)  # a bad selection fails before the analysis
        grouping = plan_with(loaded, config)
    loaded, record = share(loaded, config, grouping=grouping)
    save_checkpoint(loaded, output, overwrite=overwrite, extra_files=share_reports(record, loaded.name))
    return record


def run(run: StageRun) -> StageRecord:
    """``run_share`` on a `StageRun`: a ``--groups K`` without an analysis file needs a planner,
    which the pipeline adds (`compressor.pipeline.compose.run_share`)."""
    return run_share(run.model, run.config, run.output, overwrite=run.overwrite, trust_remote_code=run.trust_remote_code,
                     dtype=run.dtype)


def summary(record: StageRecord) -> str:
    from ..render import aligned_rows
    from .render import share_summary_rows

    note = record.metrics.get("note")
    return aligned_rows(share_summary_rows(record)) + (f"\n\n{note}" if note else "")


STAGE = Stage(
    "share", ShareConfig, run, writes="model", summary=summary,
    key_metrics=("metrics.fidelity.embedding_cosine",),
    help="""Merge MODEL's layers into shared groups and write a compressed checkpoint to OUTPUT.

    Layers of a group use one set of weights for the shared sublayers; each keeps its own
    norms and biases, and with --lora-rank its own low-rank delta. The checkpoint stores every
    shared tensor once; every compress command takes it as MODEL.
    """,
    output_help="Folder for the compressed checkpoint.",
    option_help={"plan_metric": "Similarity that picks the plan with --groups."},
)
