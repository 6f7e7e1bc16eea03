"""A job: one model through one recipe, in its own folder, resumable stage by stage.

A job folder::

    job.json        what this run does: model, stages, the hash of every stage (written first)
    01-analyze/     one folder per stage; the stage's output, then stage.json (its record and
    02-share/       hash), written atomically after the output is complete
    ...
    report.json     the job's stage records; report.md, a table of them
    DONE.json       written last, atomically: the job's hash and result
    error.json      the last failure, with a traceback for bugs (removed when a run starts)
    .lock           held while a process runs the job

Only a ``DONE.json`` whose hash is the hash of the current inputs makes a job done; a run that is
killed at any moment leaves no such file (files are written to a temporary name and renamed).
A stage is kept from an earlier run when its ``stage.json`` holds the current hash of the stage
and of every stage before it; the first stage that is not kept, and every stage after it, runs
again. A resumable stage (``finetune``) left unfinished with the same options continues from its
last checkpoint.

The hash of stage *i* covers: the model's identity, the options of stages 1..i (every option,
defaults included) and the identity of every file an option names. Identity of a local folder
or file: the names, sizes and modification times of its files (the quick check of rsync and
make: reading multi-GB weights on every run would cost more than it saves; a copy with new
modification times runs again, which is safe). A hub id is identified by its name only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CompressError, first_line
from ..record import StageRecord
from .events import EventLog

if TYPE_CHECKING:
    from .recipe import StageSpec
    from .stages import Stage, StageRun

#: Version of the job folder layout and of the hash; a change reruns every job.
FORMAT = 1
JOB_FILE, DONE_FILE, ERROR_FILE, STAGE_FILE = "job.json", "DONE.json", "error.json", "stage.json"
REPORT_JSON, REPORT_MD, LOCK_FILE = "report.json", "report.md", ".lock"
#: Errors of a full or read-only disk: every later job would hit them too.
DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


@dataclass
class Job:
    """One model through one recipe.

    Attributes:
        name: The job's name, and its folder's.
        model: The model as `compressor.models.load_model` takes it (``bundled`` for the
            bundled MiniLM).
        recipe: The recipe's name.
        stages: The recipe's stages as plain data (`Recipe.normalized`).
        folder: The job's folder.
        shown_model: The model as the user wrote it, for reports.
        resources: What a job asks a Ray cluster for: ``num_cpus``, ``num_gpus`` and
            ``custom`` (Ray's custom resources, ``name -> amount``).
    """

    name: str
    model: str
    recipe: str
    stages: list[dict[str, Any]]
    folder: Path
    shown_model: str = ""
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobResult:
    """How a job went (a row of the batch summary).

    Attributes:
        job: The job's name.
        model: The model as the user wrote it.
        recipe: The recipe's name.
        status: ``done`` (ran now), ``skipped`` (done earlier with the same inputs), ``failed``,
            or ``pending`` (not run: the batch stopped first).
        seconds: Time the job's stages took when it ran (for a skipped job: then).
        metrics: The stages' summary numbers (``evaluate.accuracy``, ...).
        params_before: Unique parameters of the job's input model.
        params_after: Unique parameters of its output model.
        error: One line, for a failed job.
        folder: The job's folder.
        fatal: The failure was a full or read-only disk, which stops the batch.
        nodes: The Ray node of every attempt of this run, in order (more than one: Ray ran
            the job again after its node or worker process died); empty off Ray.
    """

    job: str
    model: str
    recipe: str
    status: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    params_before: int | None = None
    params_after: int | None = None
    error: str | None = None
    folder: str = ""
    fatal: bool = False
    nodes: list[str] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        """How many times the job was started in this run (1 unless Ray retried it)."""
        return max(1, len(self.nodes))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attempts": self.attempts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def for_job(cls, job: Job, status: str, **values: Any) -> JobResult:
        """A result of ``job`` (its name, model, recipe and folder) with ``status`` and ``values``."""
        return cls(job.name, job.shown_model, job.recipe, status, folder=str(job.folder), **values)


@dataclass
class JobPlan:
    """What running a job would do now.

    Attributes:
        job: The job.
        action: ``run`` (from the start), ``continue`` (keeps finished stages), ``skip``
            (done with the same inputs) or ``fail`` (cannot start: e.g. no such model).
        reason: Why, in words.
        keys: The hash of every recipe stage (empty for ``fail``).
        result: For ``skip``, the result recorded when the job was done.
    """

    job: Job
    action: str
    reason: str
    keys: list[str] = field(default_factory=list)
    result: JobResult | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job.name, "model": self.job.shown_model, "recipe": self.job.recipe,
                "folder": str(self.job.folder), "action": self.action, "reason": self.reason}


# ---- identity and hashes ----------------------------------------------------------------------


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a file, or of every file under a folder (hidden ones
    left out), hashed."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts))
    for f in files:
        st = f.stat()
        rel = f.name if f == path else f.relative_to(path).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def model_identity(spec: str) -> dict[str, str]:
    """What identifies a model for the job hash.

    Raises:
        ModelLoadError: a folder that does not exist (or a name that is no valid hub id).
    """
    from ..models import resolve

    location, local = resolve(spec)
    if local:
        return {"folder": location, "fingerprint": fingerprint(Path(location))}
    return {"hub": location}


def named_paths(value: Any) -> list[str]:
    """The existing absolute paths an option names: itself, its comma-separated items or its list items."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = [value, *value.split(",")]
    else:
        items = []
    return [v for v in dict.fromkeys(x.strip() for x in items if isinstance(x, str))
            if v and os.path.isabs(v) and os.path.exists(v)]


def stage_keys(model_id: dict[str, str], stages: list[dict[str, Any]]) -> list[str]:
    """The hash of every stage: the model, the options of this stage and all before it, and the
    files those options name."""
    files: dict[str, str] = {}
    keys = []
    for i, item in enumerate(stages):
        for value in item["options"].values():
            for name in named_paths(value):
                files[name] = fingerprint(Path(name))
        content = {"format": FORMAT, "model": model_id, "stages": stages[: i + 1], "files": files}
        keys.append(hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest())
    return keys


def layout(stages: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """``(folder name, recipe index)`` of every stage that runs (``01-share``...); a stage that
    only feeds the next one has no folder."""
    from .stages import get_stage

    places = []
    for i, item in enumerate(stages):
        if get_stage(item["stage"]).run is not None:
            places.append((f"{len(places) + 1:02d}-{item['stage']}", i))
    return places


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when it is missing or unreadable (a marker that
    cannot be read counts as absent: the work runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---- planning ---------------------------------------------------------------------------------


def plan_job(job: Job, *, overwrite: bool = True) -> JobPlan:
    """Decide whether ``job`` runs, continues, is skipped or cannot start; reads, writes nothing.

    With ``overwrite=False`` (``compress run``, whose folder the user names), a folder that
    holds another recipe's job, or the same recipe's on another model, cannot start (an edited
    recipe of the same name on the same model runs again, keeping the stages whose inputs did not
    change). A batch's job folders are the batch's own: it keeps the default."""
    try:
        keys = stage_keys(model_identity(job.model), job.stages)
    except CompressError as e:
        return JobPlan(job, "fail", str(e))
    folder = job.folder
    done = read_json(folder / DONE_FILE)
    if done is not None and done.get("key") == keys[-1]:
        result = JobResult.from_dict(done.get("result", {}))
        result.status = "skipped"
        return JobPlan(job, "skip", f"done with the same model and recipe ({done.get('finished', 'earlier')})", keys, result)
    started = read_json(folder / JOB_FILE)
    if started is not None and not overwrite:
        was = started.get("model_spec") or started.get("model")
        other = [f"recipe '{started.get('recipe')}'" if started.get("recipe") != job.recipe else "",
                 f"model {started.get('model')}" if _location(str(was)) != _location(job.model) else ""]
        if any(other):
            return JobPlan(job, "fail", f"{folder} holds the job of {' on '.join(o for o in other if o)}, not this one "
                                        f"(recipe '{job.recipe}' on {job.shown_model}); use another -o, or --overwrite "
                                        "to replace it")
    if started is None:
        if not is_job_folder(folder):
            return JobPlan(job, "fail", f"{folder} exists and is not a job folder written by compress; move it or use another -o")
        return JobPlan(job, "run", "not run before", keys)
    changed = "the recipe or its inputs changed since it was done" if done is not None else None
    kept = kept_stages(job, keys)
    places = layout(job.stages)
    parts = [f"keeps {', '.join(kept)}"] if kept else []
    if len(kept) < len(places):
        name, index = places[len(kept)]
        if _resumable(job, folder / name, index, keys, started):
            parts.append(f"continues {name} from its last checkpoint")
    if parts:
        return JobPlan(job, "continue", f"{changed or 'unfinished'}; {'; '.join(parts)}", keys)
    return JobPlan(job, "run", changed or "an earlier run did not finish; starts over", keys)


def _location(spec: str) -> str:
    """Where a model spec points (``./m``, ``m`` and its absolute path alike; ``bundled`` and the
    bundled folder alike), or the spec itself where it no longer resolves."""
    from ..models import resolve

    try:
        return resolve(spec)[0]
    except CompressError:
        return spec


def is_job_folder(folder: Path) -> bool:
    """Absent, empty, or written by a job (its ``job.json``, or only the error of a job that
    could not start): a folder a job may write into."""
    if not folder.is_dir() or (folder / JOB_FILE).is_file():
        return True
    return all(p.name in (LOCK_FILE, ERROR_FILE) for p in folder.iterdir())


def kept_stages(job: Job, keys: list[str]) -> list[str]:
    """The leading stages whose ``stage.json`` holds the current hash."""
    kept = []
    for name, index in layout(job.stages):
        marker = read_json(job.folder / name / STAGE_FILE)
        if marker is None or marker.get("key") != keys[index]:
            break
        kept.append(name)
    return kept


def _resumable(job: Job, place: Path, index: int, keys: list[str], started: dict | None) -> bool:
    """An unfinished run of the same stage with the same hash is in ``place``."""
    from .stages import get_stage

    old_keys = (started or {}).get("keys") or []
    return (get_stage(job.stages[index]["stage"]).resumable and place.is_dir()
            and index < len(old_keys) and old_keys[index] == keys[index]
            and read_json(place / STAGE_FILE) is None)


# ---- running ----------------------------------------------------------------------------------


def run_job(job: Job, keys: list[str], *, log: EventLog, reason: str = "", progress: bool = False,
            reraise: bool = False, run_id: str | None = None, node: str | None = None,
            lock_wait: float = 0.0) -> JobResult:
    """Run (or continue) ``job``; a failure is recorded in its folder and returned, not raised.

    Args:
        job: The job.
        keys: Its stage hashes (from `plan_job`).
        log: Where progress events go.
        reason: Why it runs (for the ``job_start`` event).
        progress: Show progress bars (fine-tuning).
        reraise: Raise the error after recording it (``compress run``) instead of returning a
            failed result (``compress batch``, where the other jobs go on).
        run_id: The batch run this is part of: a second start of the job with the same id is
            a retry (Ray ran it again after its node died), recorded as an attempt.
        node: Where it runs (a Ray node), recorded with the attempt.
        lock_wait: Seconds to wait for the job's lock (a retried task may start while the
            killed process of the attempt before it is still being torn down).

    Returns:
        The result: ``done`` or ``failed``. Ctrl-C is recorded and raised.
    """
    start = time.perf_counter()
    nodes = _attempt_nodes(job, run_id, node)
    log.emit("job_start", job=job.name, model=job.shown_model, recipe=job.recipe, reason=reason,
             **({"node": node, "attempt": len(nodes)} if node else {}))
    try:
        with _job_lock(job.folder, wait=lock_wait):
            result = _finished_meanwhile(job, keys) or _run(job, keys, log, progress, start, run_id, nodes)
    except BaseException as e:
        error = one_line(e)
        fatal = isinstance(e, OSError) and e.errno in DISK_ERRNOS
        if fatal:
            error = f"cannot write to {job.folder}: {e.strerror}"
        with contextlib.suppress(OSError):  # on a full disk even this may fail; the job is not done either way
            _write_json(job.folder / ERROR_FILE, {"job": job.name, "error": error, "type": type(e).__name__,
                                                   "traceback": None if isinstance(e, CompressError) else traceback.format_exc()})
        log.emit("job_fail", job=job.name, error=error)
        if reraise or not isinstance(e, Exception):
            if fatal:
                raise CompressError(error) from None
            raise
        return JobResult.for_job(job, "failed", seconds=time.perf_counter() - start, error=error, fatal=fatal, nodes=nodes)
    result.nodes = nodes
    log.emit("job_end", job=job.name, seconds=round(result.seconds, 3), metrics=result.metrics)
    return result


def _attempt_nodes(job: Job, run_id: str | None, node: str | None) -> list[str]:
    """The nodes of this run's attempts, this one last: those ``job.json`` records for the
    same ``run_id``, then ``node``. Empty off Ray."""
    return [] if node is None else [*recorded_nodes(job, run_id), node]


def recorded_nodes(job: Job, run_id: str | None) -> list[str]:
    """The nodes of the attempts ``job.json`` records for the batch run ``run_id`` (none for
    another run's, or without one)."""
    started = read_json(job.folder / JOB_FILE) or {}
    return started.get("nodes", []) if run_id is not None and started.get("run") == run_id else []


def _finished_meanwhile(job: Job, keys: list[str]) -> JobResult | None:
    """The result of a job another process finished with the same inputs while this one waited
    for the lock (an attempt that outlived its driver); ``None`` when it is not done."""
    done = read_json(job.folder / DONE_FILE)
    if done is None or done.get("key") != keys[-1]:
        return None
    return JobResult.from_dict(done.get("result", {}))


def record_failure(job: Job, error: str) -> None:
    """``error.json`` for a job that could not start, in its folder (unless the folder is not a job's)."""
    if is_job_folder(job.folder):
        with contextlib.suppress(OSError):
            _write_json(job.folder / ERROR_FILE, {"job": job.name, "error": error, "type": "not started", "traceback": None})


def _run(job: Job, keys: list[str], log: EventLog, progress: bool, start: float, run_id: str | None,
         nodes: list[str]) -> JobResult:
    from .recipe import rebuild

    specs = rebuild(job.stages)  # checks the options (and devices) on the machine that runs them
    started = read_json(job.folder / JOB_FILE)  # the run before this one, if any
    places = _begin(job, keys, run_id, nodes)
    records = _run_stages(job, specs, keys, places, started, log, progress)
    return _finish(job, keys, records, places, start)


def _begin(job: Job, keys: list[str], run_id: str | None = None, nodes: list[str] | None = None) -> dict[int, str]:
    """Start a run in the job's folder: markers of earlier runs removed, ``job.json`` written,
    folders that are no stage of this recipe removed; returns ``recipe index -> stage folder``."""
    folder = job.folder
    for stale in (DONE_FILE, ERROR_FILE):  # a done marker of other inputs must not outlive this run
        with contextlib.suppress(FileNotFoundError):
            (folder / stale).unlink()
    _write_json(folder / JOB_FILE, {"format": FORMAT, "job": job.name, "model": job.shown_model, "model_spec": job.model,
                                    "recipe": job.recipe, "stages": job.stages, "keys": keys,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run": run_id, "nodes": nodes or []})
    places = {index: name for name, index in layout(job.stages)}
    _remove_strays(folder, set(places.values()))
    return places


def _run_stages(job: Job, specs: list[StageSpec], keys: list[str], places: dict[int, str], started: dict | None,
                log: EventLog, progress: bool) -> list[StageRecord]:
    """Every stage in order, each on the model the last one wrote: the leading stages done with
    the same inputs are kept, the others run. Returns their records."""
    from .stages import StageRun, get_stage

    model, records, fresh, fed = job.model, [], False, {}
    for i, spec in enumerate(specs):
        stage = get_stage(spec.name)
        if stage.run is None:
            fed[spec.name] = spec.config
            continue
        name = places[i]
        place = job.folder / name
        record = None if fresh else _kept_record(job, name, keys[i], log)
        if record is None:
            resume = not fresh and _resumable(job, place, i, keys, started)
            fresh = True  # every stage after one that runs runs too: its input is new
            run = StageRun(config=spec.config, model=model, output=place, job_folder=job.folder, resume=resume,
                           fed=fed, records=list(records), progress=progress, log=EventLog() if progress else None,
                           devices=int(job.resources.get("num_gpus") or 0))
            record = _run_stage(job, stage, run, name, keys[i], log)
        records.append(record)
        if stage.writes_model:
            model = str(place)
        fed = {}
    return records


def _kept_record(job: Job, name: str, key: str, log: EventLog) -> StageRecord | None:
    """The record of stage folder ``name`` when an earlier run finished it with hash ``key``."""
    marker = read_json(job.folder / name / STAGE_FILE)
    if marker is None or marker.get("key") != key:
        return None
    record = StageRecord(**marker["record"])
    log.emit("stage_skip", job=job.name, stage=name, reason="done in an earlier run with the same inputs")
    return record


def _run_stage(job: Job, stage: Stage, run: StageRun, name: str, key: str, log: EventLog) -> StageRecord:
    """Run one stage into ``run.output`` and mark it finished with hash ``key``."""
    from .stages import key_metrics

    if run.output.exists() and not run.resume:
        shutil.rmtree(run.output)
    log.emit("stage_start", job=job.name, stage=name)
    t = time.perf_counter()
    record = stage.run(run)
    run.output.mkdir(parents=True, exist_ok=True)  # a stage may write nothing but its record
    _write_json(run.output / STAGE_FILE, {"key": key, "record": record.to_dict()})
    log.emit("stage_end", job=job.name, stage=name, seconds=round(time.perf_counter() - t, 3),
             metrics=key_metrics(record))
    return record


def _finish(job: Job, keys: list[str], records: list[StageRecord], places: dict[int, str], start: float) -> JobResult:
    """The job's result, its reports, and last ``DONE.json``: from then on the job is done."""
    from ..io import write_text_atomic
    from .stages import key_metrics

    metrics: dict[str, Any] = {}
    for record in records:
        metrics.update(key_metrics(record))
    result = JobResult.for_job(job, "done", seconds=time.perf_counter() - start, metrics=metrics,
                               params_before=records[0].params_before, params_after=records[-1].params_after)
    folder = job.folder
    _write_json(folder / REPORT_JSON, {"job": job.name, "model": job.shown_model, "recipe": job.recipe,
                                        "result": result.to_dict(), "stages": [r.to_dict() for r in records]})
    write_text_atomic(folder / REPORT_MD, report_markdown(job, records, [places[i] for i in sorted(places)]))
    _write_json(folder / DONE_FILE, {"key": keys[-1], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                     "result": result.to_dict()})  # last: from here on the job is done
    return result


def report_markdown(job: Job, records: list[StageRecord], names: list[str]) -> str:
    """The job's stages as a Markdown table."""
    lines = [f"# {job.name}", "", f"Model `{job.shown_model}`, recipe `{job.recipe}`.", "",
             "| stage | seconds | unique params | key metrics |", "|---|---:|---|---|"]
    from .stages import key_metrics

    for name, r in zip(names, records):
        shown = ", ".join(f"{k.split('.', 1)[1]} {format_value(v)}" for k, v in key_metrics(r).items())
        lines.append(f"| {name} | {r.seconds:.1f} | {r.params_before:,} -> {r.params_after:,} | {shown} |")
    return "\n".join(lines) + "\n"


def format_value(v: Any) -> str:
    """A metric for a table: floats to 4 significant places, integers with separators."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def one_line(e: BaseException) -> str:
    """A user error's message; for anything else its type and the first line of its message."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return first_line(e, with_type=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..io import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _remove_strays(folder: Path, expected: set[str]) -> None:
    """Stage folders of another recipe, and temporary files a killed run left behind."""
    for p in folder.iterdir():
        stage_like = p.is_dir() and len(p.name) > 3 and p.name[:2].isdigit() and p.name[2] == "-"
        temporary = p.name.startswith(".") and (p.name.endswith(".tmp") or ".old-" in p.name)
        if (stage_like and p.name not in expected) or temporary:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()


@contextlib.contextmanager
def _job_lock(folder: Path, wait: float = 0.0):
    """Hold ``folder/.lock`` while the job runs: two processes never run one job at once.
    A lock held by another process is waited for up to ``wait`` seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CompressError(f"{folder} is being run by another compress process") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)
