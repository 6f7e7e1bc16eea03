"""The pruning stage on folders: a model in, a pruned checkpoint with its report out.

`compress prune` and a recipe's ``prune`` stage both run `run_prune`; `STAGE` declares the stage.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..contract import StageRun, Stage
from ..io import check_writable, write_text_atomic
from ..record import StageRecord
from .config import PruneConfig


def run_prune(model, config: PruneConfig, output: str | Path, *, overwrite: bool = False,
              trust_remote_code: bool = False, dtype="auto") -> StageRecord:
    """Prune ``model`` (read in ``dtype``: see `compressor.models.load_model`) and write the checkpoint, with ``prune_report.json``/``.md``, to ``output``.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is not set (before any work).
    """
    from ..models import as_loaded
    from ..models.checkpoint import save_checkpoint
    from .render import prune_markdown
    from .stage import prune

    check_writable(output, overwrite=overwrite, folder=True)
    loaded, record = prune(as_loaded(model, trust_remote_code=trust_remote_code, dtype=dtype), config)

    def reports(staged: Path) -> None:
        write_text_atomic(staged / "prune_report.json", json.dumps(record.to_dict(), indent=2))
        write_text_atomic(staged / "prune_report.md", prune_markdown(record, loaded.name))

    save_checkpoint(loaded, output, overwrite=overwrite, extra_files=reports)
    return record


def run(run: StageRun) -> StageRecord:
    """``run_prune`` on a `StageRun`."""
    return run_prune(run.model, run.config, run.output, overwrite=run.overwrite, trust_remote_code=run.trust_remote_code,
                     dtype=run.dtype)


def summary(record: StageRecord) -> str:
    from ..render import aligned_rows
    from .render import prune_summary_rows

    return aligned_rows(prune_summary_rows(record))


STAGE = Stage(
    "prune", PruneConfig, run, writes="model", summary=summary, key_metrics=("metrics.fidelity.embedding_cosine",),
    help="""Prune MODEL structurally and write the smaller checkpoint to OUTPUT.

    Rows and columns are removed for real, so the model gets faster, not only sparser; the
    config follows the new shapes. Layers that share weights keep the same heads and neurons.
    """,
    output_help="Folder for the pruned checkpoint.",
    option_help={"text_column": "Column (csv/tsv) or key (jsonl) holding the text of --data and --vocab-from.",
                 "encoding": "Text encoding of --data and --vocab-from."},
)
