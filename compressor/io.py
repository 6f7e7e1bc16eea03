"""Writing outputs so that nothing is half-written and nothing is overwritten by surprise.

Files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on
one file system); folders are built in a temporary sibling and renamed as a whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import CompressError, OutputExistsError, Terminated

#: Set when the process is asked to stop (the command line's SIGTERM handler). The exception
#: that handler raises is lost where it lands in a ``__del__`` (Python prints and ignores it),
#: so `staged_folder` checks this too before it renames: a stopped command commits nothing.
stop_requested = threading.Event()


def check_writable(path: str | Path, *, overwrite: bool, folder: bool = False) -> Path:
    """Fail early, before any work, if ``path`` would overwrite something without ``overwrite``.

    An empty existing folder counts as free. Raises `OutputExistsError` or `CompressError`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        if not (folder and path.is_dir() and not any(path.iterdir())):
            raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")
    if path.exists() and folder and not path.is_dir():
        raise CompressError(f"{path} exists and is not a folder")
    if path.exists() and not folder and path.is_dir():
        raise CompressError(f"{path} is a folder, not a file")
    ancestor = path.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CompressError(f"cannot write {path}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK):
        raise CompressError(f"cannot write to {ancestor}: permission denied")
    return path


def check_distinct(*paths: str | Path | None) -> None:
    """Two outputs of one command must not be the same path (one would clobber the other)."""
    seen: dict[Path, str] = {}
    for p in paths:
        if p is None or str(p) == "-":
            continue
        key = Path(p).resolve()
        if key in seen:
            raise CompressError(f"{p} is given for two outputs; give each its own path")
        seen[key] = str(p)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it open()'s mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def staged_folder(path: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_writable(path, overwrite=overwrite, folder=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; give it mkdir()'s mode
    try:
        yield tmp
        if stop_requested.is_set():
            raise Terminated
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):
        if f.is_file():  # some writers (safetensors) create private files; give them open()'s mode
            os.chmod(f, 0o666 & ~_umask())
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def scratch(folder: str | Path) -> Iterator[Path]:
    """A temporary folder inside ``folder``, removed after the block: for tools that read and
    write files (onnxruntime's optimizers and quantizers) while the output is staged, so that
    nothing is left anywhere else."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        yield Path(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def quiet(*loggers: str):
    """Only errors from these loggers while the block runs (optimum's progress lines, the
    exporter's and transformers' warnings say nothing a user can act on)."""
    import logging

    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB.

    ``VmHWM`` from ``/proc/self/status``, not ``getrusage``'s ``ru_maxrss``: Linux carries
    ``ru_maxrss`` across ``execve``, so a child started from a big parent would report the
    parent's peak (a 5 GB report process made every row's "peak" 4,977 MiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss (bytes on macOS)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def available_memory_bytes() -> int | None:
    """Memory this process can still take, in bytes: the kernel's ``MemAvailable``, lowered to
    what the cgroup (a container's limit) has left; ``None`` where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            # the cgroup counts the page cache (model files just read or written), which it gives back
            for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines():
                if line.startswith("inactive_file "):
                    used -= int(line.split()[1])
            found.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


#: glibc's mallopt parameter for the size above which an allocation is its own memory map.
_M_MMAP_THRESHOLD = -3
#: Tensors of this size or more get their own map (see `return_freed_memory`).
MMAP_THRESHOLD = 2**20


def return_freed_memory() -> None:
    """Make freed tensors of a MiB or more go back to the system at once (glibc only; elsewhere
    nothing changes).

    glibc raises its map threshold to the largest block freed so far (up to 32 MiB), so the
    per-layer tensors of a large model (features, float32 copies, 6-30 MB each) land in the heap
    after the first few, and a heap fragmented by them keeps its peak: a 1.7 B model's analysis
    peaked at 4.9 GiB, 4.4 GiB with the threshold fixed at 1 MiB (the kernel zeroes new maps,
    which costs about as much as the heap's reuse saved, within this machine's noise).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator as it is
        pass
