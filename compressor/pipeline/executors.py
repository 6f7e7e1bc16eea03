"""Executors: where a batch's jobs run, each yielding results as jobs finish.

``local`` runs jobs one after another in this process, or with ``workers > 1`` in that many
processes (`concurrent.futures.ProcessPoolExecutor`, each with its share of the CPU threads);
``ray`` sends each job to a Ray cluster as a task that declares ``num_cpus``, ``num_gpus`` (when
a stage runs on CUDA) and the job's ``custom`` resources; Ray places it on a node that has them.

On Ray, a job whose node dies (preempted, out of memory, rebooted) or whose worker process is
killed is run again by Ray on another node (``retries`` times; a job's own error is not
retried), and continues from what the dead attempt left in the job folder: its finished stages
and the last fine-tuning checkpoint. That needs the batch folder on storage every node and
the driver see at the same path, which `check_shared_output` checks before any job starts.
A job that no node of the cluster could run (its resources are on no node, or the only node
that had them died) waits ``placement_timeout`` seconds for such a node to join, then fails.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import check_int, check_positive
from ..errors import CompressError, ConfigError, first_line
from .events import EventLog
from .job import Job, JobPlan, JobResult, run_job

EXECUTORS = ("local", "ray")
#: Names of the probe's files in a batch folder (`check_shared_output`).
PROBE_PREFIX = ".compress-probe-"
#: Seconds every node has to answer the probe, together.
PROBE_TIMEOUT = 120.0
#: Seconds a job waits, once the batch runs, for a node that can run it (when none is alive).
PLACEMENT_TIMEOUT = 120.0
#: Seconds a Ray attempt waits for its job's lock, held by a killed attempt being torn down (on
#: NFSv4 the server frees a dead client's lock when its lease ends: 90 s by default).
LOCK_WAIT = 150.0


@dataclass(frozen=True)
class RayOptions:
    """How a batch runs on Ray.

    Attributes:
        retries: Times Ray runs a job again after its node or worker process died.
        placement_timeout: Seconds a job may wait for a node that has its resources when no
            node of the cluster has them; ``None``: such a job is bad input before the batch
            starts (exit 2), and a job whose node died waits `PLACEMENT_TIMEOUT`. Given, the
            batch starts anyway and waits that long (nodes an autoscaler adds).
    """

    retries: int = 2
    placement_timeout: float | None = None

    def __post_init__(self):
        check_int("retries", self.retries, 0)
        check_positive("placement_timeout", self.placement_timeout, allow_none=True)
        if self.placement_timeout is not None and not math.isfinite(self.placement_timeout):
            raise ConfigError(f"--placement-timeout must be a finite number of seconds, got {self.placement_timeout!r}",
                              option="placement_timeout")

    @property
    def wait(self) -> float:
        return PLACEMENT_TIMEOUT if self.placement_timeout is None else self.placement_timeout


def executor_name(executor: str, workers: int) -> str:
    """The executor as the summary shows it: ``local``, ``local x N`` or ``ray``."""
    if executor == "ray":
        return "ray"
    return "local" if workers == 1 else f"local x {workers}"


def execute(plans: list[JobPlan], *, executor: str, workers: int, log: EventLog,
            progress: bool, ray_options: RayOptions | None = None) -> Iterator[JobResult]:
    """Run ``plans`` on ``executor``; results as jobs finish (Ray must be connected first,
    with `ray_connection`)."""
    if not plans:
        return
    if executor == "ray":
        yield from run_on_ray(plans, log, ray_options or RayOptions())
    elif workers == 1:
        yield from run_in_sequence(plans, log, progress)
    else:
        yield from run_in_processes(plans, workers, log)


def run_in_worker(job: Job, keys: list[str], reason: str, log_format: str, threads: int,
                  keep_events: bool, run_id: str | None = None) -> tuple[JobResult, list[dict[str, Any]]]:
    """A job in a worker process (a pool process or a Ray task): its result and, with
    ``keep_events``, its events for the driver to replay. ``run_id`` (Ray) records the
    attempt and its node in the job folder."""
    import torch

    torch.set_num_threads(max(1, threads))  # parallel jobs share the cores instead of fighting for them
    log = EventLog(log_format, keep=keep_events)
    node = this_ray_node() if run_id is not None else None
    result = run_job(job, keys, log=log, reason=reason, run_id=run_id, node=node,
                     lock_wait=LOCK_WAIT if run_id is not None else 0.0)
    return result, log.kept


def this_ray_node() -> str:
    """The Ray node this process runs on, as the summary shows it: ``ip/node id prefix``."""
    import ray

    return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"


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
    for attempt in (1, 2):
        try:
            ray.init(address=address, **kwargs)
            return True
        except (ConnectionError, RuntimeError, ValueError) as e:
            # the client server starts a process per client; on a loaded head that can fail once
            if attempt == 1 and address.startswith("ray://") and "Initialization failure" in str(e):
                time.sleep(2.0)
                continue
            raise CompressError(f"cannot reach the Ray cluster at {address}: {_ray_message(e)}") from None
    return True


def _ray_message(e: BaseException) -> str:
    """A Ray error in one line: its first, or where it carries a traceback, the traceback's last."""
    text = str(e)
    if "Traceback (most recent call last)" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return f"{first_line(e).split(': Traceback')[0]}: {lines[-1]}"
    return first_line(e)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``host:port`` nobody answers at (``ray.init`` retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray finds them
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CompressError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def run_on_ray(plans: list[JobPlan], log: EventLog, options: RayOptions) -> Iterator[JobResult]:
    """Every job a Ray task on the cluster `connect_ray` joined; the tasks' events are replayed
    here as each finishes. A job that no alive node can run fails after ``options.wait`` s."""
    import ray

    run_id = uuid.uuid4().hex
    refs = _submit_to_ray(plans, log, options, run_id)
    pending = list(refs)
    unplaceable_since: dict[Any, float] = {}
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in ready:
                p = refs[ref]
                try:
                    result, events = ray.get(ref)
                except ray.exceptions.RayError as e:
                    result, events = _task_failure(p.job, e, run_id), []
                    log.emit("job_fail", job=p.job.name, error=result.error)
                log.replay(events)
                yield confirm_done(result, p.job, log)
            if not ready:
                for ref, result in _unplaceable(pending, refs, unplaceable_since, options.wait, log):
                    pending.remove(ref)
                    yield result
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _task_failure(job: Job, e: Exception, run_id: str) -> JobResult:
    """A job whose Ray task ended without a result (its worker or node died past the retries,
    or it was cancelled), with the nodes its attempts recorded in the job folder."""
    from .job import recorded_nodes

    return JobResult.for_job(job, "failed", error=f"the Ray task failed: {first_line(e)}",
                             nodes=recorded_nodes(job, run_id))


def confirm_done(result: JobResult, job: Job, log: EventLog) -> JobResult:
    """``result``, unless it says done and the driver cannot see the job's ``DONE.json``: then
    the job wrote its folder where this machine does not see it (a node without the shared
    storage, one that joined after `check_shared_output`), and it is failed."""
    from .job import DONE_FILE, read_json

    if result.status != "done" or read_json(job.folder / DONE_FILE) is not None:
        return result
    error = (f"node {(result.nodes or ['?'])[-1]} finished the job, but its folder {job.folder} is not where the driver "
             "sees it: the batch folder must be on storage every Ray node mounts at the same path")
    log.emit("job_fail", job=job.name, error=error)
    return JobResult.for_job(job, "failed", seconds=result.seconds, error=error, nodes=result.nodes)


def _unplaceable(pending: list, refs: dict[Any, JobPlan], since: dict[Any, float], wait: float,
                 log: EventLog) -> list[tuple[Any, JobResult]]:
    """The pending jobs that no alive node could run for ``wait`` seconds, cancelled and failed.
    (A job no alive node fits is not running: the node it ran on would fit it.)"""
    import ray

    nodes = alive_nodes()
    now = time.monotonic()
    failed = []
    for ref in pending:
        job = refs[ref].job
        if any(fits(job.resources, n) for n in nodes):
            since.pop(ref, None)
            continue
        if now - since.setdefault(ref, now) < wait:
            continue
        with contextlib.suppress(Exception):
            ray.cancel(ref)
        error = (f"no node of the Ray cluster can run it: it asks for {describe_demand(job.resources)} and no node "
                 f"that has it was alive for {wait:g} s (--placement-timeout); the nodes have: {describe_nodes(nodes)}")
        log.emit("job_fail", job=job.name, error=error)
        failed.append((ref, JobResult.for_job(job, "failed", error=error)))
    return failed


def _submit_to_ray(plans: list[JobPlan], log: EventLog, options: RayOptions, run_id: str) -> dict[Any, JobPlan]:
    """A Ray task for every job, asking for the job's resources; ``task ref -> plan``."""
    import ray

    task = ray.remote(run_in_worker)
    refs = {}
    for p in plans:
        r = p.job.resources
        ref = task.options(num_cpus=r.get("num_cpus", 1), num_gpus=r.get("num_gpus", 0), resources=r.get("custom") or None,
                           max_retries=options.retries, retry_exceptions=False,
                           name=f"compress:{p.job.name}").remote(p.job, p.keys, p.reason, log.format,
                                                                  int(max(1, r.get("num_cpus", 1))), True, run_id)
        refs[ref] = p
    return refs


# ---- the cluster's nodes: what they have, what they see -----------------------------------------


def demand(resources: dict[str, Any]) -> dict[str, float]:
    """A job's resources in Ray's names (``CPU``, ``GPU``, custom names), zeros left out."""
    need = {"CPU": resources.get("num_cpus", 1), "GPU": resources.get("num_gpus", 0), **resources.get("custom", {})}
    return {k: float(v) for k, v in need.items() if v}


def fits(resources: dict[str, Any], node: dict[str, Any]) -> bool:
    """Whether a node (from `alive_nodes`) has, in total, what a job asks for."""
    have = node["Resources"]
    return all(have.get(k, 0.0) >= v - 1e-9 for k, v in demand(resources).items())


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes, as `ray.nodes` gives them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def describe_demand(resources: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in demand(resources).items()) or "nothing"


def describe_nodes(nodes: list[dict[str, Any]]) -> str:
    """The alive nodes' CPUs, GPUs and custom resources, one ``;``-separated entry each."""
    if not nodes:
        return "no node is alive"
    shown = []
    for n in nodes:
        have = {k: v for k, v in n["Resources"].items()
                if not k.startswith("node:") and k not in ("memory", "object_store_memory") and "_group_" not in k}
        shown.append(", ".join(f"{k} {v:g}" for k, v in sorted(have.items())) or "nothing")
    return "; ".join(shown)


def check_placement(plans: list[JobPlan], options: RayOptions) -> None:
    """Before any job starts: every job fits some alive node (unless the batch was told to wait
    for nodes with ``placement_timeout``).

    Raises:
        CompressError: a job whose resources no node has (exit 2).
    """
    if options.placement_timeout is not None:
        return
    nodes = alive_nodes()
    for p in plans:
        if not any(fits(p.job.resources, n) for n in nodes):
            raise CompressError(
                f"no node of the Ray cluster has what job {p.job.name} asks for ({describe_demand(p.job.resources)}); "
                f"the nodes have: {describe_nodes(nodes)}. Fix the job's resources, add such a node, or pass "
                "--placement-timeout SECONDS to wait for one to join")


def check_shared_output(output: Path, plans: list[JobPlan]) -> None:
    """Before any job starts: every node that could run a job sees the batch folder the driver
    writes, at the same path, and can write to it (jobs write there; a retried job continues
    from there).

    The driver writes a marker file into ``output``; a small task on each node reads it and
    writes one of its own. The folder is left as it was.

    Raises:
        CompressError: a node that does not see the folder or cannot write to it (exit 2).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in alive_nodes() if any(fits(p.job.resources, n) for p in plans)]
    if not nodes:
        return  # nothing fits yet (placement_timeout given): the jobs wait, nothing is written here
    token = uuid.uuid4().hex
    output = output.resolve()  # a node reads a relative path from its own working folder
    created = [p for p in (output, *output.parents) if not p.exists()]
    marker = output / f"{PROBE_PREFIX}{token}"
    try:
        output.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as e:
        _remove(marker, created)
        raise CompressError(f"cannot write to {output}: {e.strerror or e}") from None
    try:
        probe = ray.remote(probe_folder)
        refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(output), token) for n in nodes]
        problems = [e for e in _probe_answers(refs, PROBE_TIMEOUT) if e]
        if problems:
            raise CompressError(f"{problems[0]}; the batch folder must be on storage every Ray node mounts at the same path")
    finally:
        _remove(marker, created)


def _remove(marker: Path, created: list[Path]) -> None:
    """The probe's marker, then the folders the probe made, innermost first, if still empty."""
    with contextlib.suppress(OSError):
        marker.unlink()
    for p in created:
        with contextlib.suppress(OSError):
            p.rmdir()


def _probe_answers(refs: list, timeout: float) -> list[str | None]:
    """Every node's answer to `probe_folder` within one deadline; a node that died since it was
    listed has none (it runs no job either); a probe still out at the deadline is cancelled.
    (One ``ray.get`` per answer: through the Ray client, ``ray.wait`` with a timeout waits it out.)"""
    import ray

    deadline = time.monotonic() + timeout
    answers: list[str | None] = []
    for ref in refs:
        try:
            answers.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
            answers.append(f"a node did not answer within {timeout:g} s whether it can write the batch folder")
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError):
            answers.append(None)
        except ray.exceptions.RayError as e:
            answers.append(f"a node could not run the check that it sees the batch folder: {first_line(e)}")
    return answers


def probe_folder(folder: str, token: str) -> str | None:
    """On a node: ``None`` when ``folder`` holds the driver's marker and this node can write
    there, else what is wrong, in words."""
    node = this_ray_node()
    marker = Path(folder) / f"{PROBE_PREFIX}{token}"
    try:
        if marker.read_text() != token:
            raise FileNotFoundError
    except OSError:
        return f"node {node} does not see the batch folder {folder} the driver writes (no marker file there)"
    mine = Path(folder) / f"{PROBE_PREFIX}{token}-{uuid.uuid4().hex[:8]}"
    try:
        mine.write_text(token)
    except OSError as e:
        return f"node {node} cannot write to the batch folder {folder}: {e.strerror or e}"
    finally:
        with contextlib.suppress(OSError):
            mine.unlink()
    return None
