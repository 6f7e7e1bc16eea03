"""The fine-tuning stage on folders: a compressed model in, a fine-tuned checkpoint out.

`compress finetune` and a recipe's ``finetune`` stage both run `run_finetune`; `STAGE` declares the
stage (its command, with ``--resume`` and ``--quiet``, is written in ``cli/finetune.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..contract import StageRun, Stage
from ..io import check_writable
from ..record import StageRecord
from .config import FinetuneConfig


def run_finetune(student, config: FinetuneConfig, output: str | Path, *, resume: bool = False,
                 overwrite: bool = False, progress: bool = False) -> StageRecord:
    """Distil into ``student`` and write the checkpoint to ``output`` (every ``save_every`` steps
    and at the end). With ``resume``, continue the run ``output`` holds from its last saved step.

    Raises:
        ConfigError: ``resume`` with nothing to resume in ``output``.
        OutputExistsError: ``output`` exists and neither ``overwrite`` nor ``resume`` is set.
    """
    from ..models import as_loaded
    from .stage import check_resumable, finetune

    if resume:
        check_resumable(output)
    else:
        check_writable(output, overwrite=overwrite, folder=True)
    _, record = finetune(as_loaded(output if resume else student), config, output=output, resume=resume,
                         overwrite=overwrite, progress=progress)
    return record


def run(run: StageRun) -> StageRecord:
    """A compressed checkpoint, as ``compress finetune`` writes it; an unfinished run continues
    from its last saved step (``--resume``). The teacher is the original the student records."""
    from .stage import STATE

    resume = run.resume and (run.output / STATE).is_file()
    record = run_finetune(run.model, run.config, run.output, resume=resume, overwrite=run.overwrite,
                          progress=run.progress)
    if record.metrics["stopped_by"] == "interrupted":
        # Ctrl-C: the checkpoint is saved and resumable, but the stage is not done.
        raise KeyboardInterrupt
    return record


STAGE = Stage("finetune", FinetuneConfig, run, writes="model", resumable=True,
                  key_metrics=("metrics.steps", "metrics.loss_last"), own_command=True)
