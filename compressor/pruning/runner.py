"""The pruning stage on folders: a model in, a pruned checkpoint with its report out.

`compress prune` and a recipe's ``prune`` stage both run `run_prune`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import check_writable, write_text_atomic
from ..record import StageRecord
from .config import PruneConfig


def run_prune(model, config: PruneConfig, output: str | Path, *, overwrite: bool = False,
              trust_remote_code: bool = False) -> StageRecord:
    """Prune ``model`` and write the checkpoint, with ``prune_report.json``/``.md``, to ``output``.

    Raises:
        OutputExistsError: ``output`` exists and ``overwrite`` is not set (before any work).
    """
    from ..models import as_loaded
    from ..models.checkpoint import save_checkpoint
    from .render import prune_markdown
    from .stage import prune

    check_writable(output, overwrite=overwrite, folder=True)
    loaded, record = prune(as_loaded(model, trust_remote_code=trust_remote_code), config)

    def reports(staged: Path) -> None:
        write_text_atomic(staged / "prune_report.json", json.dumps(record.to_dict(), indent=2))
        write_text_atomic(staged / "prune_report.md", prune_markdown(record, loaded.name))

    save_checkpoint(loaded, output, overwrite=overwrite, extra_files=reports)
    return record
