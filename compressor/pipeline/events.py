"""Progress events of `compress run` and `compress batch`, one line each on stderr.

With ``--log-format jsonl`` every line is one JSON object, for a pipeline to read::

    {"event": "stage_end", "time": 1763800000.123, "job": "bert-quick", "stage": "02-share", "seconds": 1.2, ...}

Events and their fields (besides ``event`` and ``time``, Unix seconds):

* ``batch_start``: ``jobs``, ``to_run``, ``executor``;
* ``job_start``: ``job``, ``model``, ``recipe``, ``reason`` (why it runs);
* ``stage_start``: ``job``, ``stage`` (its folder name, ``02-share``);
* ``stage_end``: ``job``, ``stage``, ``seconds``, ``metrics`` (the stage's summary numbers);
* ``stage_skip``: ``job``, ``stage``, ``reason`` (done in an earlier run);
* ``job_end``: ``job``, ``seconds``, ``metrics``;
* ``job_skip``: ``job``, ``reason``;
* ``job_fail``: ``job``, ``error`` (one line);
* ``batch_end``: ``done``, ``skipped``, ``failed``, ``seconds``, ``exit_code``;
* ``error``: ``message``, ``exit_code`` (the command stops: 2 bad input, 1 a failed result);
* ``report_step``: ``step`` (`compress report`, as each long step starts);
* ``evaluate_step``: ``model``, ``step`` (`compress evaluate`, as each model's long step starts).
* ``progress``: ``step``, ``done``, ``total``, ``unit``, ``seconds``, ``left_s`` (any command, as a
  long step goes: `compressor.progress`).

The default ``text`` format writes the same events as short readable lines.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

LOG_FORMATS = ("text", "jsonl")


class EventLog:
    """Writes events to a stream (stderr by default), or keeps them to be replayed elsewhere.

    Args:
        format: ``text`` or ``jsonl``.
        stream: Where lines go; ``None``: ``sys.stderr`` at the time of each event.
        keep: Keep the events in ``kept`` instead of writing them (a Ray worker's events travel
            back with its result, since a worker's stderr is not the driver's).
    """

    def __init__(self, format: str = "text", stream: TextIO | None = None, *, keep: bool = False):
        if format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {LOG_FORMATS}, got {format!r}")
        self.format = format
        self.stream = stream
        self.keep = keep
        self.kept: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event; returns it."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.keep:
            self.kept.append(record)
        else:
            self._write(record)
        return record

    def replay(self, events: list[dict[str, Any]]) -> None:
        """Write events that were kept by another `EventLog` (their times are kept)."""
        for record in events:
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        stream = self.stream or sys.stderr
        line = json.dumps(record, default=str) if self.format == "jsonl" else render_text(record)
        stream.write(line + "\n")  # one write per line: lines from parallel workers do not interleave
        stream.flush()


def render_text(e: dict[str, Any]) -> str:
    """An event as a short readable line."""
    kind, job = e["event"], e.get("job")
    if kind == "batch_start":
        return f"batch: {e['jobs']} job(s), {e['to_run']} to run, on {e['executor']}"
    if kind == "batch_end":
        return f"batch: {e['done']} done, {e['skipped']} skipped, {e['failed']} failed in {e['seconds']:.1f} s"
    if kind == "job_start":
        return f"[{job}] start: {e['reason']}"
    if kind == "stage_start":
        return f"[{job}] {e['stage']} ..."
    if kind == "stage_end":
        return f"[{job}] {e['stage']} done in {e['seconds']:.1f} s"
    if kind == "stage_skip":
        return f"[{job}] {e['stage']} kept: {e['reason']}"
    if kind == "job_end":
        return f"[{job}] done in {e['seconds']:.1f} s"
    if kind == "job_skip":
        return f"[{job}] skipped: {e['reason']}"
    if kind == "job_fail":
        return f"[{job}] FAILED: {e['error']}"
    if kind == "error":
        return f"compress: error: {e['message']}"
    if kind == "report_step":
        return f"report: {e['step']}"
    if kind == "evaluate_step":
        return f"evaluate: {e['model']}: {e['step']}"
    rest = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("event", "time"))
    return f"{kind}: {rest}"
