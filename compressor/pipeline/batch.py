"""Batches: many models through many recipes, each job in its own folder, locally or on Ray.

A manifest::

    models: [./models/bert, ./models/gpt2]      # every model ...
    recipes: [recipes/quick.yaml]               # ... through every recipe
    jobs:                                       # and/or jobs one by one
      - model: bundled
        recipe: recipes/demo.yaml
        name: minilm-demo                       # default: <model>-<recipe>
        resources: {num_cpus: 2}                # what a Ray job asks for
    resources: {num_cpus: 1}                    # the default for every job

Paths are relative to the manifest's folder. A recipe is a file or a mapping written in place.
Every recipe is validated before any job runs. ``OUT/summary.json`` and ``OUT/summary.md`` list
every job (done, skipped, failed) with its key metrics; they are rewritten as jobs finish.

Executors: ``local`` runs jobs one after another in this process, or with ``workers > 1`` in
that many processes (`concurrent.futures.ProcessPoolExecutor`, each with its share of the CPU
threads); ``ray`` sends each job to a Ray cluster as a task that declares ``num_cpus`` and, when
a stage runs on CUDA, ``num_gpus`` (Ray then places it on a node that has them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import check_int
from ..errors import CompressError, ConfigError, OutputExistsError
from .events import EventLog
from .job import DISK_ERRNOS, Job, JobPlan, JobResult, format_value, plan_job, record_failure, run_job
from .recipe import (
    Recipe,
    check_keys,
    line_of,
    mapping_items,
    parse_recipe,
    plain,
    read_yaml_file,
    resolve_path,
)

MANIFEST_KEYS = ("models", "recipes", "jobs", "resources")
JOB_KEYS = ("name", "model", "recipe", "resources")
RESOURCE_KEYS = ("num_cpus", "num_gpus")
EXECUTORS = ("local", "ray")
BATCH_FILE, SUMMARY_JSON, SUMMARY_MD = "batch.json", "summary.json", "summary.md"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---- manifests --------------------------------------------------------------------------------


def load_manifest(path: str | Path, output: str | Path) -> list[Job]:
    """Read a manifest and validate it and every recipe it names; nothing runs.

    Args:
        path: The manifest (YAML).
        output: The batch's output folder; job ``name`` goes to ``output/name``.

    Returns:
        The jobs, in manifest order (``models`` x ``recipes`` first, then ``jobs``).

    Raises:
        ConfigError: a manifest or recipe that does not parse, an unknown key, stage or option
            (with its file and line), a missing recipe file, or two jobs of one name.
    """
    path = Path(path)
    source, base = str(path), path.resolve().parent
    node = read_yaml_file(path, "manifest")
    if node is None:
        raise ConfigError(f"{source}: the manifest is empty; list jobs, or models and recipes")
    items = mapping_items(node, source, "manifest")
    check_keys(items, MANIFEST_KEYS, source, "manifest")
    defaults = _resources(items["resources"][1], source, {}) if "resources" in items else {}
    recipes: dict[str, Recipe] = {}

    entries: list[tuple[Any, dict[str, Any]]] = []  # (node for messages, job fields)
    if ("models" in items) != ("recipes" in items):
        key = "models" if "models" in items else "recipes"
        raise ConfigError(f"{source}:{line_of(items[key][0])}: 'models' and 'recipes' go together (every model "
                          "through every recipe); for single jobs use 'jobs'")
    if "models" in items:
        models = _sequence(items["models"][1], source, "models")
        recipe_nodes = _sequence(items["recipes"][1], source, "recipes")
        for m in models:
            for r in recipe_nodes:
                entries.append((m, {"model": m, "recipe": r}))
    if "jobs" in items:
        for job_node in _sequence(items["jobs"][1], source, "jobs"):
            fields = mapping_items(job_node, source, "a job")
            check_keys(fields, JOB_KEYS, source, "job")
            if "recipe" not in fields:
                raise ConfigError(f"{source}:{line_of(job_node)}: the job has no recipe")
            entry = {k: v for k, (_, v) in fields.items()}
            entries.append((job_node, entry))
    if not entries:
        raise ConfigError(f"{source}: the manifest has no jobs")

    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for at, entry in entries:
        recipe = _recipe(entry["recipe"], source, base, recipes)
        model_node = entry.get("model")
        model = _model_spec(model_node, source, base) if model_node is not None else (recipe.model or "bundled")
        shown = str(plain(model_node)) if model_node is not None else (recipe.model or "bundled")
        name = _string(entry["name"], source, "name") if "name" in entry else f"{_slug(shown)}-{recipe.name}"
        if not _NAME.match(name) or name in (BATCH_FILE, SUMMARY_JSON, SUMMARY_MD):
            raise ConfigError(f"{source}:{line_of(at)}: job name {name!r} must be letters, digits, '.', '_' or '-', "
                              "and not the name of a batch file")
        if name in seen:
            raise ConfigError(f"{source}:{line_of(at)}: two jobs are called {name!r} (the first on line {seen[name]}); "
                              "give one a 'name'")
        seen[name] = line_of(at)
        resources = {"num_cpus": 1, "num_gpus": 1 if _uses_cuda(recipe) else 0, **defaults}
        if "resources" in entry:
            resources = _resources(entry["resources"], source, resources)
        jobs.append(Job(name=name, model=model, recipe=recipe.name, stages=recipe.normalized(),
                        folder=Path(output).resolve() / name, shown_model=shown, resources=resources))
    return jobs


def job_for_recipe(recipe: Recipe, folder: str | Path, model: str | None = None) -> Job:
    """The single job of ``compress run``: ``model`` (or the recipe's, or the bundled MiniLM)
    through ``recipe``, in ``folder``."""
    spec = model or recipe.model or "bundled"
    return Job(name=recipe.name, model=spec, recipe=recipe.name, stages=recipe.normalized(), folder=Path(folder).resolve(),
               shown_model=model or recipe.model or "bundled",
               resources={"num_cpus": 1, "num_gpus": 1 if _uses_cuda(recipe) else 0})


def _sequence(node, source: str, what: str) -> list:
    import yaml

    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise ConfigError(f"{source}:{line_of(node)}: '{what}' must be a non-empty list")
    return node.value


def _string(node, source: str, what: str) -> str:
    value = plain(node)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}:{line_of(node)}: {what} must be a string, got {value!r}")
    return value


def _model_spec(node, source: str, base: Path) -> str:
    """A model as written; a relative path is read from the manifest's folder."""
    spec = _string(node, source, "model")
    if spec.startswith(("./", "../")):
        return str((base / spec).resolve())
    return resolve_path(spec, base)


def _recipe(node, source: str, base: Path, cache: dict[str, Recipe]) -> Recipe:
    """A recipe file (read once however many jobs use it) or a recipe written in place."""
    import yaml

    from .recipe import load_recipe

    if isinstance(node, yaml.MappingNode):
        return parse_recipe(node, source=source, base=base, default_name=f"recipe-line{line_of(node)}")
    path = base / _string(node, source, "recipe")
    key = str(path.resolve())
    if key not in cache:
        if not path.is_file():
            raise ConfigError(f"{source}:{line_of(node)}: recipe file {path} does not exist")
        cache[key] = load_recipe(path)
    return cache[key]


def _resources(node, source: str, base: dict[str, float]) -> dict[str, float]:
    items = mapping_items(node, source, "resources")
    check_keys(items, RESOURCE_KEYS, source, "resources")
    out = dict(base)
    for key, (_, value_node) in items.items():
        value = plain(value_node)
        low = 0 if key == "num_gpus" else 1e-9
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise ConfigError(f"{source}:{line_of(value_node)}: {key} must be a number "
                              f"{'of 0 or more' if key == 'num_gpus' else 'above 0'}, got {value!r}")
        out[key] = value
    return out


def _uses_cuda(recipe: Recipe) -> bool:
    from .stages import uses_cuda

    return any(uses_cuda(s.config) for s in recipe.stages)


def _slug(model: str) -> str:
    name = Path(model.rstrip("/")).name or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


# ---- the batch --------------------------------------------------------------------------------


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
        lines = ["| job | model | recipe | status | seconds | unique params | key metrics | error |",
                 "|---|---|---|---|---:|---|---|---|"]
        for r in self.results:
            params = f"{r.params_before:,} -> {r.params_after:,}" if r.params_before is not None else ""
            shown = ", ".join(f"{k} {format_value(v)}" for k, v in r.metrics.items())
            error = (r.error or "").replace("|", "\\|")
            lines.append(f"| {r.job} | {r.model} | {r.recipe} | {r.status} | {r.seconds:.1f} | {params} | {shown} | {error} |")
        c = self.counts
        tail = f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed" + (f", {c['pending']} not run" if c["pending"] else "")
        return "\n".join(lines) + f"\n\n{tail} in {self.seconds:.1f} s ({self.executor}).\n"


def plan_batch(jobs: list[Job]) -> list[JobPlan]:
    """What a batch would do for each job (``--dry-run``); writes nothing."""
    return [plan_job(j) for j in jobs]


def run_batch(jobs: list[Job], output: str | Path, *, executor: str = "local", workers: int = 1,
              address: str | None = None, log: EventLog | None = None, progress: bool = False) -> BatchSummary:
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

    Returns:
        The summary, also written to ``output/summary.json`` and ``output/summary.md``.

    Raises:
        CompressError: an output folder that is not writable, is not a batch folder, or whose
            disk fills up (the jobs still to run are left to a later run), or Ray that cannot
            be reached.
    """
    log = log or EventLog()
    output = Path(output)
    start = time.perf_counter()
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    check_int("jobs", workers, 1)
    check_output(output)
    shown_executor = "ray" if executor == "ray" else ("local" if workers == 1 else f"local x {workers}")

    plans = plan_batch(jobs)
    runnable = [p for p in plans if p.action in ("run", "continue")]
    # Reach the cluster before anything is written: an address nobody answers at is bad input
    # and leaves no batch folder behind.
    ray_started = _connect_ray(address, log) if executor == "ray" and runnable else False
    try:
        return _run_planned(jobs, plans, runnable, output, executor=executor, workers=workers, log=log,
                            progress=progress, shown_executor=shown_executor, start=start)
    finally:
        if ray_started:
            import ray

            ray.shutdown()


def _run_planned(jobs: list[Job], plans: list[JobPlan], runnable: list[JobPlan], output: Path, *, executor: str,
                 workers: int, log: EventLog, progress: bool, shown_executor: str, start: float) -> BatchSummary:
    mark_batch(output, [j.name for j in jobs])
    results: dict[str, JobResult] = {}
    for p in plans:
        if p.action == "skip":
            results[p.job.name] = p.result
        elif p.action == "fail":
            results[p.job.name] = _failed(p.job, p.reason)
            record_failure(p.job, p.reason)
        else:
            results[p.job.name] = JobResult(p.job.name, p.job.shown_model, p.job.recipe, "pending", folder=str(p.job.folder))
    log.emit("batch_start", jobs=len(jobs), to_run=len(runnable), executor=shown_executor)
    for p in plans:
        if p.action == "skip":
            log.emit("job_skip", job=p.job.name, reason=p.reason)
        elif p.action == "fail":
            log.emit("job_fail", job=p.job.name, error=p.reason)

    def summary() -> BatchSummary:
        return BatchSummary([results[j.name] for j in jobs], time.perf_counter() - start, shown_executor)

    write_summary(output, summary())
    fatal = None
    for result in _execute(runnable, executor=executor, workers=workers, log=log, progress=progress):
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


def check_output(output: Path) -> None:
    """Fail before any work if ``output`` cannot be the batch's folder."""
    from ..io import check_writable

    check_writable(output, overwrite=True, folder=True)
    if output.is_dir() and any(output.iterdir()) and not (output / BATCH_FILE).is_file():
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


def _failed(job: Job, error: str) -> JobResult:
    return JobResult(job.name, job.shown_model, job.recipe, "failed", error=error, folder=str(job.folder))


# ---- executors --------------------------------------------------------------------------------


def _execute(plans: list[JobPlan], *, executor: str, workers: int, log: EventLog,
             progress: bool) -> Iterator[JobResult]:
    """Results as jobs finish."""
    if not plans:
        return
    if executor == "ray":
        yield from _on_ray(plans, log)
    elif workers == 1:
        for p in plans:
            yield run_job(p.job, p.keys, log=log, reason=p.reason, progress=progress)
    else:
        yield from _in_processes(plans, workers, log)


def run_in_worker(job: Job, keys: list[str], reason: str, log_format: str, threads: int,
                  keep_events: bool) -> tuple[JobResult, list[dict[str, Any]]]:
    """A job in a worker process (a pool process or a Ray task): its result and, with
    ``keep_events``, its events for the driver to replay."""
    import torch

    torch.set_num_threads(max(1, threads))  # parallel jobs share the cores instead of fighting for them
    log = EventLog(log_format, keep=keep_events)
    result = run_job(job, keys, log=log, reason=reason)
    return result, log.kept


def _in_processes(plans: list[JobPlan], workers: int, log: EventLog) -> Iterator[JobResult]:
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
                    result = _failed(p.job, f"the worker process died: {type(e).__name__}: {e}")
                    log.emit("job_fail", job=p.job.name, error=result.error)
                yield result
        finally:
            for future in futures:
                future.cancel()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a ``host:port`` nobody answers at (``ray.init`` retries for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray finds them
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CompressError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def _connect_ray(address: str | None, log: EventLog) -> bool:
    """Join or start Ray unless this process already has; returns whether it connected now."""
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
        raise CompressError(f"cannot reach the Ray cluster at {address}: {(str(e).splitlines() or [''])[0]}") from None
    return True


def _on_ray(plans: list[JobPlan], log: EventLog) -> Iterator[JobResult]:
    """Every job a Ray task on the cluster `_connect_ray` joined."""
    import ray

    task = ray.remote(run_in_worker)
    refs = {}
    for p in plans:
        r = p.job.resources
        ref = task.options(num_cpus=r.get("num_cpus", 1), num_gpus=r.get("num_gpus", 0), max_retries=1,
                           name=f"compress:{p.job.name}").remote(p.job, p.keys, p.reason, log.format,
                                                                  int(max(1, r.get("num_cpus", 1))), True)
        refs[ref] = p
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                p = refs[ref]
                try:
                    result, events = ray.get(ref)
                except ray.exceptions.RayError as e:
                    result, events = _failed(p.job, f"the Ray task failed: {(str(e).strip().splitlines() or [''])[0]}"), []
                    log.emit("job_fail", job=p.job.name, error=result.error)
                log.replay(events)
                yield result
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref)
