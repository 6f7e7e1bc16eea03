"""The fine-tuning stage on folders: a compressed model in, a fine-tuned checkpoint out.

`compress finetune` and a recipe's ``finetune`` stage both run `run_finetune`.
"""

from __future__ import annotations

from pathlib import Path

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
