"""The sharing stage on folders: a model in, a compressed checkpoint with its report out.

`compress share` and a recipe's ``share`` stage both run `run_share`.
"""

from __future__ import annotations

from pathlib import Path

from ..io import check_writable
from ..record import StageRecord
from .config import ShareConfig


def run_share(model, config: ShareConfig, output: str | Path, *, overwrite: bool = False,
              trust_remote_code: bool = False) -> StageRecord:
    """Share ``model``'s layers and write the checkpoint, with ``share_report.json``/``.md``, to
    ``output``.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is not set (before any work).
    """
    from ..models import as_loaded
    from ..models.checkpoint import save_checkpoint
    from .stage import share
    from .render import share_reports

    check_writable(output, overwrite=overwrite, folder=True)
    loaded, record = share(as_loaded(model, trust_remote_code=trust_remote_code), config)
    save_checkpoint(loaded, output, overwrite=overwrite, extra_files=share_reports(record, loaded.name))
    return record
