"""Executors: where a batch's jobs run, each yielding results as jobs finish.

``local`` runs jobs one after another in this process, or with ``workers > 1`` in that many
processes (`concurrent.futures.ProcessPoolExecutor`, each with its share of the CPU threads);
``ray`` sends each job to a Ray cluster as a task that declares ``num_cpus`` and, when a stage
runs on CUDA, ``num_gpus`` (Ray then places it on a node that has them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from ..errors import CompressError, first_line
from .events import EventLog
from .job import Job, JobPlan, JobResult, run_job

EXECUTORS = ("local", "ray")


def executor_name(executor: str, workers: int) -> str:
    """The executor as the summary shows it: ``local``, ``local x N`` or ``ray``."""
    if executor == "ray":
        return "ray"
    return "local" if workers == 1 else f"local x {workers}"


def execute(plans: list[JobPlan], *, executor: str, workers: int, log: EventLog,
            progress: bool) -> Iterator[JobResult]:
    """Run ``plans`` on ``executor``; results as jobs finish (Ray must be connected first,
    with `ray_connection`)."""
    if not plans:
        return
    if executor == "ray":
        yield from run_on_ray(plans, log)
    elif workers == 1:
        yield from run_in_sequence(plans, log, progress)
    else:
        yield from run_in_processes(plans, workers, log)


def run_in_worker(job: Job, keys: list[str], reason: str, log_format: str, threads: int,
                  keep_events: bool) -> tuple[JobResult, list[dict[str, Any]]]:
    """A job in a worker process (a pool process or a Ray task): its result and, with
    ``keep_events``, its events for the driver to replay."""
    import torch

    torch.set_num_threads(max(1, threads))  # parallel jobs share the cores instead of fighting for them
    log = EventLog(log_format, keep=keep_events)
    result = run_job(job, keys, log=log, reason=reason)
    return result, log.kept


# ---- local ------------------------------------------------------------------------------------


def run_in_sequence(plans: list[JobPlan], log: EventLog, progress: bool) -> Iterator[JobResult]:
    """Every job in this process, one after another."""
    for p in plans:
        yield run_job(p.job, p.keys, log=log, reason=p.reason, progress=progress)


def run_in_processes(plans: list[JobPlan], workers: int, log: EventLog) -> Iterator[JobResult]:
    """Up to ``workers`` jobs at once, each in a process of its own."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a fork of a process that has run torch can hang in its thread pool
    with ProcessPoolExecutor(max_workers=min(workers, len(plans)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_in_worker, p.job, p.keys, p.reason, log.format, threads, False): p for p in plans}
        try:
            for future in as_completed(futures):
                p = futures[future]
                try:
                    result, _ = future.result()
                except Exception as e:  # noqa: BLE001  (the worker process died: killed, out of memory)
                    result = JobResult.for_job(p.job, "failed", error=f"the worker process died: {type(e).__name__}: {e}")
                    log.emit("job_fail", job=p.job.name, error=result.error)
                yield result
        finally:
            for future in futures:
                future.cancel()


# ---- Ray --------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_connection(address: str | None, log: EventLog) -> Iterator[None]:
    """Ray connected for the block (`connect_ray`), and shut down after it if it connected now."""
    connected = connect_ray(address, log)
    try:
        yield
    finally:
        if connected:
            import ray

            ray.shutdown()


def connect_ray(address: str | None, log: EventLog) -> bool:
    """Join or start Ray unless this process already has; returns whether it connected now.

    Args:
        address: The Ray cluster (``ray://host:10001``, ``host:6379``, ``auto``); ``None``
            joins the cluster ``RAY_ADDRESS`` names, else starts a local Ray instance.
        log: Where progress events go; in JSON lines, Ray's own output is kept off it.

    Raises:
        CompressError: Ray is not installed, or the cluster cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise CompressError("--executor ray needs Ray: pip install 'compress[ray]'") from None
    if ray.is_initialized():
        return False
    # "local" starts a new instance even where a `ray start` left its address behind
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {}
    if address == "local":
        kwargs["include_dashboard"] = False
    if not address.startswith("ray://"):  # Ray Client takes none of these
        jsonl = log.format == "jsonl"  # Ray's own lines and the workers' output would break the JSON lines
        kwargs.update(log_to_driver=not jsonl, logging_level=logging.ERROR if jsonl else logging.WARNING)
    _check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CompressError(f"cannot reach the Ray cluster at {address}: {first_line(e)}") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``host:port`` nobody answers at (``ray.init`` retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray finds them
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CompressError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def run_on_ray(plans: list[JobPlan], log: EventLog) -> Iterator[JobResult]:
    """Every job a Ray task on the cluster `connect_ray` joined; the tasks' events are replayed
    here as each finishes."""
    import ray

    refs = _submit_to_ray(plans, log)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                p = refs[ref]
                try:
                    result, events = ray.get(ref)
                except ray.exceptions.RayError as e:
                    error = f"the Ray task failed: {first_line(e)}"
                    result, events = JobResult.for_job(p.job, "failed", error=error), []
                    log.emit("job_fail", job=p.job.name, error=result.error)
                log.replay(events)
                yield result
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _submit_to_ray(plans: list[JobPlan], log: EventLog) -> dict[Any, JobPlan]:
    """A Ray task for every job, asking for the job's resources; ``task ref -> plan``."""
    import ray

    task = ray.remote(run_in_worker)
    refs = {}
    for p in plans:
        r = p.job.resources
        ref = task.options(num_cpus=r.get("num_cpus", 1), num_gpus=r.get("num_gpus", 0), max_retries=1,
                           name=f"compress:{p.job.name}").remote(p.job, p.keys, p.reason, log.format,
                                                                  int(max(1, r.get("num_cpus", 1))), True)
        refs[ref] = p
    return refs
