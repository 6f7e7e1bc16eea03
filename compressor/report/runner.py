"""The report stage on folders: variants in, ``report.md``/``.json``/``.png`` out.

`compress report` and a recipe's ``report`` stage both run `run_report`; `STAGE` declares the stage
(its command, which measures several variants, is written in ``cli/report.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..contract import StageRun, Stage
from ..errors import ConfigError
from ..io import check_writable, staged_folder, write_text_atomic
from ..record import StageRecord
from .config import ReportConfig


def run_report(original, variants: list[tuple[str, str]], config: ReportConfig, output: str | Path, *,
               title: str | None = None, command: str | None = None, overwrite: bool = False,
               log=None) -> tuple[dict[str, Any], str]:
    """Measure ``variants`` (``(label, folder)``) against ``original`` and optimum's baselines,
    and write the report into ``output``.

    Returns:
        The report as data (what ``report.json`` holds) and its title.

    Raises:
        ConfigError: a variant that is not a folder.
        OutputExistsError: ``output`` exists and ``overwrite`` is not set (before any work).
    """
    from ..models import as_loaded
    from .stage import report
    from .render import chart, markdown

    for _, folder in variants:
        if not Path(folder).is_dir():
            raise ConfigError(f"variant {folder} is not a folder")
    check_writable(output, overwrite=overwrite, folder=True)
    original = as_loaded(original)
    title = title or f"{original.name}: size, speed and accuracy"
    with staged_folder(output, overwrite=overwrite) as tmp:
        result = report(original, variants, config, work=tmp, log=log)
        result["command"] = command
        write_text_atomic(tmp / "report.json", json.dumps(result, indent=2))
        write_text_atomic(tmp / "report.md", markdown(result, title=title, command=command))
        chart(result, tmp / "report.png", title=title)
    return result, title


def report_record(original, config: ReportConfig, result: dict[str, Any]) -> StageRecord:
    """The report as a stage record: the original's size before, the last row's after, and the
    last row's ratios as the metrics a batch summary shows."""
    from ..models import unique_parameters

    final = result["rows"][-1]
    summary = {k: final.get(k) for k in ("label", "size_bytes", "value", "of_original", "fidelity",
                                         "speedup_vs_optimum_int8", "size_vs_optimum_int8",
                                         "speedup_vs_optimum_o2_int8", "size_vs_optimum_o2_int8") if k in final}
    if "suite" in final:
        summary.update(suite_retained=final["suite"]["retained"],
                       neighbour_agreement=final["suite"]["neighbour_agreement"])
    if "generation" in final:
        summary.update(decode_tokens_per_s=final["generation"]["decode_tokens_per_s"])
    record = StageRecord.build("report", config, before=unique_parameters(original.model),
                               after=(final["parameters"], final["size_bytes"]),
                               metrics={"metric": result["metric"], "last_row": summary, "rows": len(result["rows"])})
    record.seconds = result["seconds"]
    return record


def run(run: StageRun) -> StageRecord:
    """``report.md``/``.json``/``.png`` as ``compress report`` writes them: the job's exports
    (every earlier stage folder holding a model.onnx) or, with none, the job's last model,
    against the original the model records and optimum's baselines."""
    from ..models import load_model

    exports = sorted(p for p in run.job_folder.iterdir() if p.is_dir() and (p / "model.onnx").is_file()
                     and p.name < run.output.name)
    last = load_model(run.model)
    original = load_model(last.origin) if last.origin and last.origin != last.source else last
    variants = [(p.name, str(p)) for p in exports] or ([] if original is last else [(Path(run.model).name, run.model)])
    # the report takes minutes: its steps go where the job's progress goes
    result, _ = run_report(original, variants, run.config, run.output, overwrite=run.overwrite, log=run.log)
    return report_record(original, run.config, result)


STAGE = Stage("report", ReportConfig, run, own_command=True,
                  key_metrics=("metrics.last_row.of_original", "metrics.last_row.speedup_vs_optimum_int8",
                               "metrics.last_row.size_vs_optimum_int8", "metrics.last_row.speedup_vs_optimum_o2_int8",
                               "metrics.last_row.size_vs_optimum_o2_int8", "metrics.last_row.suite_retained",
                               "metrics.last_row.neighbour_agreement", "metrics.last_row.decode_tokens_per_s"))
