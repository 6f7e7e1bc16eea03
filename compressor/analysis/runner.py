"""The analysis stage on folders: a model in, ``analysis.json``, ``analysis.md`` and heatmaps out.

`compress analyze` and a recipe's ``analyze`` stage both run `run_analyze`; `STAGE` declares the stage
(its command, with ``--markdown`` and ``--plots``, is written in ``cli/analyze.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..contract import StageRun, Stage
from ..io import check_distinct, check_writable, staged_folder, write_text_atomic
from ..record import StageRecord
from .config import AnalyzeConfig


def run_analyze(model, config: AnalyzeConfig, output: str | Path | None = None, *, json_path: str | None = None,
                markdown_path: str | None = None, plots_dir: str | None = None, plots: bool = True,
                overwrite: bool = False, trust_remote_code: bool = False,
                dtype="auto") -> tuple[StageRecord, list[str]]:
    """Analyze ``model`` (a `LoadedModel`, folder, hub id or alias) and write what was asked.

    Args:
        output: A folder for ``analysis.json``, ``analysis.md`` and, with ``plots``, the heatmaps.
        json_path: Also the JSON alone here (``-``: nowhere; the caller prints it).
        markdown_path: Also the Markdown report alone here.
        plots_dir: Also the heatmaps alone in this folder.
        dtype: The dtype ``model`` is read in (see `compressor.models.load_model`); the
            similarities are computed in float32 whatever it is.

    Returns:
        The record and the paths written, in that order.

    Raises:
        OutputExistsError: an output exists and ``overwrite`` is not set (checked before the
            slow part, not after it).
    """
    from ..models import as_loaded
    from .stage import analyze
    from .render import markdown_report, save_heatmaps

    json_file = json_path if json_path != "-" else None
    check_distinct(output, json_file, markdown_path, plots_dir)
    for path, folder in ((output, True), (json_file, False), (markdown_path, False), (plots_dir, True)):
        if path:
            check_writable(path, overwrite=overwrite, folder=folder)
    _, record = analyze(as_loaded(model, trust_remote_code=trust_remote_code, dtype=dtype), config)
    result = json.dumps(record.to_dict(), indent=2)
    written = []
    if output:
        with staged_folder(output, overwrite=overwrite) as tmp:
            write_text_atomic(tmp / "analysis.json", result)
            write_text_atomic(tmp / "analysis.md", markdown_report(record.metrics))
            if plots:
                save_heatmaps(record.metrics, tmp)
        written.append(str(Path(output)))
    if json_file:
        written.append(str(write_text_atomic(json_file, result)))
    if markdown_path:
        written.append(str(write_text_atomic(markdown_path, markdown_report(record.metrics))))
    if plots_dir:
        with staged_folder(plots_dir, overwrite=overwrite) as tmp:
            save_heatmaps(record.metrics, tmp)
        written.append(str(Path(plots_dir)))
    return record, written


def run(run: StageRun) -> StageRecord:
    """``analysis.json`` and ``analysis.md``, as ``compress analyze -o`` writes them (no heatmaps)."""
    record, _ = run_analyze(run.model, run.config, run.output, plots=False, overwrite=run.overwrite,
                            trust_remote_code=run.trust_remote_code, dtype=run.dtype)
    return record


STAGE = Stage("analyze", AnalyzeConfig, run, key_metrics=("metrics.grouping.plan",), own_command=True)
