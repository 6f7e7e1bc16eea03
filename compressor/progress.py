"""Progress of the long steps (a layer, a pair of layers, a projection at a time) on stderr, so
that no command is silent for more than about half a minute, whatever stderr is.

* On a terminal: a progress bar (tqdm) with the time left.
* Elsewhere (a log file, a pipeline, CI): a line when another tenth is done or `EVERY_SECONDS`
  have passed, with the rate and the time left::

      compress: weight similarity: 120/435 layer pairs (28%), 14.2 s, about 37 s left

* With ``--log-format jsonl``: the same as ``progress`` events (`pipeline.events`), one JSON
  object a line: ``{"event": "progress", "step": ..., "done": ..., "total": ..., "unit": ...,
  "seconds": ..., "left_s": ...}``.

The command line sets the format once (`set_format`); a library user gets the text lines, or
none with ``set_format("off")``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

#: Formats `set_format` takes: ``off`` writes nothing.
FORMATS = ("text", "jsonl", "off")
#: At most this long between two lines when stderr is not a terminal.
EVERY_SECONDS = 20.0
#: A step that ends sooner writes nothing (a small model's step is not news), unless nothing
#: has been written for that long: several short steps in a row speak up as one long one would.
MIN_SECONDS = 10.0

_format = "text"
_last_line = time.perf_counter()  # when this process last wrote a progress line (or started)


def set_format(format: str) -> None:
    """How progress is written from now on: ``text``, ``jsonl`` or ``off``; a command calls it as
    it starts, which is also where its silence starts counting."""
    global _format, _last_line
    if format not in FORMATS:
        raise ValueError(f"progress format must be one of {FORMATS}, got {format!r}")
    _format = format
    _last_line = time.perf_counter()


class Progress:
    """One long step's progress: ``update`` as each item is done, ``close`` at the end (or use
    it as a context manager).

    Args:
        step: What is being done, as the line names it (``weight similarity``).
        total: How many items there are (0: not known, as in a run bounded by time).
        unit: What an item is, in the plural (``layer pairs``).
        min_seconds: Write nothing for a step that ends sooner (`MIN_SECONDS` when not given).
        stream: Where lines go (stderr by default).
    """

    def __init__(self, step: str, total: int, unit: str = "layers", *, min_seconds: float | None = None,
                 stream=None):
        self.step, self.total, self.unit = step, max(int(total), 0), unit
        self.min_seconds = MIN_SECONDS if min_seconds is None else min_seconds
        self.done = 0
        self.start = time.perf_counter()
        self._last_line, self._last_done = self.start, 0
        self._bar = None
        self._stream = stream or sys.stderr
        self._spoken = False

    def update(self, n: float = 1) -> None:
        """``n`` more items done (a fraction where one item is long: a layer of a forward pass)."""
        done = self.done + n
        # fractions that add up to an item make it whole (1/28 added 28 times is 0.99999...)
        self.done = round(done) if abs(done - round(done)) < 1e-6 * max(1.0, abs(done)) + 1e-9 else done
        now = time.perf_counter()
        short = now - self.start < self.min_seconds and now - _last_line < self.min_seconds
        finished = self.total and self.done >= self.total
        if _format == "off" or short and not finished:
            return
        if shows_bar(self._stream):
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=self.total, desc=self.step, unit=self.unit.split()[-1], file=self._stream,
                                 leave=False, initial=self.done - n)
            self._bar.update(n)
            return
        tenth = self.total and (self.done - self._last_done) * 10 >= self.total
        first = self._last_line == self.start  # the first line comes once the step is known to be long
        quiet = now - self._last_line
        # a line now when the next item, at the rate so far, would come past EVERY_SECONDS of silence:
        # items of 15 s each otherwise speak every other item, 30 s and more apart
        late = self.done and quiet + (now - self.start) / self.done > EVERY_SECONDS
        if finished or tenth or first or quiet >= EVERY_SECONDS or late:
            if finished and short:
                return
            self._write(now)

    def heartbeat(self) -> None:
        """Work on the current item goes on: a line (the count unchanged) if stderr has been
        quiet for `EVERY_SECONDS`, for an item that takes minutes (a self-check's pass over an
        8 B model's blocks)."""
        now = time.perf_counter()
        if _format == "off" or shows_bar(self._stream) or now - self.start < self.min_seconds:
            return
        if now - max(self._last_line, _last_line) >= EVERY_SECONDS:
            self._write(now)

    @contextlib.contextmanager
    def heartbeat_on(self, modules) -> Iterator[None]:
        """`heartbeat` each time one of ``modules`` (a model's blocks) finishes a forward pass."""
        hooks = [m.register_forward_hook(lambda *_: self.heartbeat()) for m in modules]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def close(self) -> None:
        """The step ended (all items done or not)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def left_seconds(self, now: float | None = None) -> float | None:
        """The time left at the rate so far (``None`` before the first item)."""
        elapsed = (now or time.perf_counter()) - self.start
        return elapsed / self.done * (self.total - self.done) if self.done and self.total else None

    def _write(self, now: float) -> None:
        global _last_line
        elapsed, left = now - self.start, self.left_seconds(now)
        self._last_line, self._last_done = now, self.done
        _last_line = now
        if _format == "jsonl":  # as `pipeline.events.EventLog` writes its events
            self._stream.write(json.dumps({"event": "progress", "time": round(time.time(), 3), "step": self.step,
                                           "done": math.floor(self.done), "total": self.total, "unit": self.unit,
                                           "seconds": round(elapsed, 1),
                                           "left_s": None if left is None else round(left, 1)}) + "\n")
            self._stream.flush()
            return
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        tail = ("" if not self.total else ", done" if self.done >= self.total
                else f", about {_duration(left)} left" if left is not None else "")
        count = f"{math.floor(self.done)}/{self.total}" if self.total else f"{math.floor(self.done)}"
        self._stream.write(f"compress: {self.step}: {count} {self.unit}{share}, {_duration(elapsed)}{tail}\n")
        self._stream.flush()


def shows_bar(stream=None) -> bool:
    """Whether progress on ``stream`` (stderr) is a bar: text on a terminal; lines or events otherwise."""
    return _format == "text" and _is_terminal(stream or sys.stderr)


def track(items: Iterable[T], step: str, total: int | None = None, unit: str = "layers") -> Iterator[T]:
    """``items``, with a `Progress` updated as each is taken."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(step, len(items) if total is None else total, unit) as progress:
        for item in items:
            yield item
            progress.update()


class TokenTicks:
    """A logits processor for transformers' ``generate`` that changes nothing and calls
    ``on_token()`` each time a token's logits are there: a `Progress` counted in tokens, or the
    moment the prefill ends (the report's time to first token)."""

    def __init__(self, on_token: Callable[[], object]):
        self.on_token = on_token

    def __call__(self, input_ids, scores):
        self.on_token()
        return scores


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
