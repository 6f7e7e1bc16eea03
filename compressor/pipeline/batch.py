"""Batches: many models through many recipes, each job in its own folder, locally or on Ray.

`manifest` reads a manifest into jobs; `executors` runs them (in this process, in a process
pool, on Ray); this module runs a batch's jobs with an executor and keeps its summary.
``OUT/summary.json`` and ``OUT/summary.md`` list every job (done, skipped, failed) with its key
metrics; they are rewritten as jobs finish.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import check_int
from ..errors import CompressError, ConfigError, OutputExistsError
from .events import EventLog
from .executors import (
    EXECUTORS,
    PROBE_PREFIX,
    RayOptions,
    check_placement,
    check_shared_output,
    execute,
    executor_name,
    ray_connection,
)
from .job import (
    DISK_ERRNOS,
    Job,
    JobPlan,
    JobResult,
    format_value,
    plan_job,
    record_failure,
)
from .manifest import (
    BATCH_FILE,
    SUMMARY_JSON,
    SUMMARY_MD,
    job_for_recipe,
    load_manifest,
)

__all__ = [
    "BatchSummary",
    "check_output",
    "job_for_recipe",
    "load_manifest",
    "mark_batch",
    "plan_batch",
    "run_batch",
    "write_summary",
]


@dataclass
class BatchSummary:
    """The results of a batch.

    Attributes:
        results: One per job, in manifest order.
        seconds: Wall-clock time of the batch.
        executor: ``local``, ``local x N`` or ``ray``.
    """

    results: list[JobResult]
    seconds: float
    executor: str

    @property
    def counts(self) -> dict[str, int]:
        statuses = ("done", "skipped", "failed", "pending")
        return {s: sum(r.status == s for r in self.results) for s in statuses}

    @property
    def exit_code(self) -> int:
        """0 when every job is done or skipped, else 1 (documented)."""
        return 0 if all(r.status in ("done", "skipped") for r in self.results) else 1

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": [r.to_dict() for r in self.results], "counts": self.counts, "seconds": round(self.seconds, 3),
                "executor": self.executor, "exit_code": self.exit_code}

    def markdown(self) -> str:
        """The summary table."""
        on_nodes = any(r.nodes for r in self.results)  # Ray: where each job ran, and its retries
        node_head, node_rule = ("node | ", "---|") if on_nodes else ("", "")
        lines = [f"| job | model | recipe | status | {node_head}seconds | unique params | key metrics | error |",
                 f"|---|---|---|---|{node_rule}---:|---|---|---|"]
        for r in self.results:
            params = f"{r.params_before:,} -> {r.params_after:,}" if r.params_before is not None else ""
            shown = ", ".join(f"{k} {format_value(v)}" for k, v in r.metrics.items())
            error = (r.error or "").replace("|", "\\|")
            node = ""
            if on_nodes:
                node = " -> ".join(r.nodes) + (f" ({r.attempts} attempts)" if r.attempts > 1 else "") + " | "
            lines.append(f"| {r.job} | {r.model} | {r.recipe} | {r.status} | {node}{r.seconds:.1f} | {params} | {shown} | {error} |")
        c = self.counts
        tail = f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed" + (f", {c['pending']} not run" if c["pending"] else "")
        return "\n".join(lines) + f"\n\n{tail} in {self.seconds:.1f} s ({self.executor}).\n"


def plan_batch(jobs: list[Job]) -> list[JobPlan]:
    """What a batch would do for each job (``--dry-run``); writes nothing."""
    return [plan_job(j) for j in jobs]


def run_batch(jobs: list[Job], output: str | Path, *, executor: str = "local", workers: int = 1,
              address: str | None = None, log: EventLog | None = None, progress: bool = False,
              ray_options: RayOptions | None = None) -> BatchSummary:
    """Run every job that is not done yet; a failed job is recorded and the others go on.

    Args:
        jobs: From `load_manifest`.
        output: The batch folder: empty, absent, or the folder of an earlier run of a batch.
        executor: ``local`` or ``ray``.
        workers: Parallel processes for the ``local`` executor.
        address: The Ray cluster (``ray://host:10001``, ``host:6379``, ``auto``); ``None``
            joins the cluster ``RAY_ADDRESS`` names, else starts a local Ray instance. Inside
            a process that has already called ``ray.init``, that connection is used.
        log: Where progress events go (stderr, text, by default).
        progress: Progress bars (only sensible for one local worker).
        ray_options: Retries and the placement timeout on Ray.

    Returns:
        The summary, also written to ``output/summary.json`` and ``output/summary.md``.

    Raises:
        CompressError: an output folder that is not writable, is not a batch folder, or whose
            disk fills up (the jobs still to run are left to a later run); on Ray, a cluster
            that cannot be reached, that has no node for a job's resources, or whose nodes
            cannot write the output folder (all before any job starts).
    """
    log = log or EventLog()
    output = Path(output)
    start = time.perf_counter()
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    check_int("jobs", workers, 1)
    check_output(output)

    plans = plan_batch(jobs)
    runnable = [p for p in plans if p.action in ("run", "continue")]
    # Reach the cluster before anything is written: an address nobody answers at is bad input
    # and leaves no batch folder behind.
    on_ray = executor == "ray" and bool(runnable)
    ray_options = ray_options or RayOptions()
    with ray_connection(address, log) if on_ray else contextlib.nullcontext():
        if on_ray:
            check_placement(runnable, ray_options)
            check_shared_output(output, runnable)
        return _run_planned(jobs, plans, runnable, output, executor=executor, workers=workers, log=log,
                            progress=progress, start=start, ray_options=ray_options)


def _run_planned(jobs: list[Job], plans: list[JobPlan], runnable: list[JobPlan], output: Path, *, executor: str,
                 workers: int, log: EventLog, progress: bool, start: float, ray_options: RayOptions) -> BatchSummary:
    """The batch after planning: the folder marked, then the summary rewritten as each job ends."""
    shown_executor = executor_name(executor, workers)
    mark_batch(output, [j.name for j in jobs])
    results = _planned_results(plans)
    _log_plans(plans, log, to_run=len(runnable), executor=shown_executor)

    def summary() -> BatchSummary:
        return BatchSummary([results[j.name] for j in jobs], time.perf_counter() - start, shown_executor)

    write_summary(output, summary())
    fatal = None
    finished = execute(runnable, executor=executor, workers=workers, log=log, progress=progress, ray_options=ray_options)
    with contextlib.closing(finished):  # on a stop: cancel the jobs not started (local: wait for the running ones; Ray: cancel them too)
        for result in finished:
            results[result.job] = result
            write_summary(output, summary())
            if result.fatal:
                fatal = result.error
                break  # a full or read-only disk fails every job after it; leave them to a later run
    final = summary()
    write_summary(output, final)
    c = final.counts
    log.emit("batch_end", done=c["done"], skipped=c["skipped"], failed=c["failed"], seconds=round(final.seconds, 3),
             exit_code=final.exit_code)
    if fatal:
        raise CompressError(f"{fatal}; {c['pending']} job(s) not run, run the batch again when there is room")
    return final


def _planned_results(plans: list[JobPlan]) -> dict[str, JobResult]:
    """``job name -> result`` before anything runs: skipped jobs as done earlier, jobs that
    cannot start failed (their ``error.json`` written), the others pending."""
    results: dict[str, JobResult] = {}
    for p in plans:
        if p.action == "skip":
            results[p.job.name] = p.result
        elif p.action == "fail":
            results[p.job.name] = JobResult.for_job(p.job, "failed", error=p.reason)
            record_failure(p.job, p.reason)
        else:
            results[p.job.name] = JobResult.for_job(p.job, "pending")
    return results


def _log_plans(plans: list[JobPlan], log: EventLog, *, to_run: int, executor: str) -> None:
    """The ``batch_start`` event, then one for every job skipped or failed before the run."""
    log.emit("batch_start", jobs=len(plans), to_run=to_run, executor=executor)
    for p in plans:
        if p.action == "skip":
            log.emit("job_skip", job=p.job.name, reason=p.reason)
        elif p.action == "fail":
            log.emit("job_fail", job=p.job.name, error=p.reason)


def check_output(output: Path) -> None:
    """Fail before any work if ``output`` cannot be the batch's folder."""
    from ..io import check_writable

    check_writable(output, overwrite=True, folder=True)
    # a probe marker is all a driver killed during `check_shared_output` leaves in a new folder
    if output.is_dir() and not (output / BATCH_FILE).is_file() and any(
            not p.name.startswith(PROBE_PREFIX) for p in output.iterdir()):
        raise OutputExistsError(f"{output} is not empty and holds no batch of compress; use another -o")


def mark_batch(output: Path, names: list[str]) -> None:
    """Mark ``output`` as a batch folder (the first write of a run)."""
    from ..io import write_text_atomic

    try:
        write_text_atomic(output / BATCH_FILE, json.dumps({"jobs": names}, indent=2) + "\n")
    except OSError as e:
        raise CompressError(f"cannot write to {output}: {e.strerror or e}") from None


def write_summary(output: Path, summary: BatchSummary) -> None:
    """``summary.json`` and ``summary.md``, each written atomically."""
    from ..io import write_text_atomic

    try:
        write_text_atomic(output / SUMMARY_JSON, json.dumps(summary.to_dict(), indent=2) + "\n")
        write_text_atomic(output / SUMMARY_MD, summary.markdown())
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise CompressError(f"cannot write the summary to {output}: {e.strerror}") from None
        raise
