"""Reading text (calibration and training data) from the files users have.

Formats by extension: ``.txt`` (one text a line), ``.csv`` / ``.tsv`` (a header row; the text
column is named or guessed), ``.jsonl`` (one JSON object a line; the text key is named or
guessed). Anything unreadable raises `DataError` with one line that says what is wrong.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from ..errors import DataError

#: Column / key names tried, in order, when no text column is named.
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "body", "prompt", "question")
#: Column / key names tried, in order, when no label column is named.
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "target", "y")
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


def fit_length(tokenizer, max_length: int) -> int:
    """``max_length`` capped at what the model's positions hold (``tokenizer.model_max_length``,
    which loading sets from the adapter): BioGPT or OPT index learned positions and fail past them."""
    limit = getattr(tokenizer, "model_max_length", None)
    return min(max_length, limit) if isinstance(limit, int) and 0 < limit < 1_000_000 else max_length


def default_calibration_texts() -> list[str]:
    """The small built-in calibration set: varied English sentences shipped with the package."""
    text = resources.files(__package__).joinpath("calibration.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_texts(
    path: str | Path,
    *,
    text_column: str | None = None,
    encoding: str = "utf-8",
    limit: int | None = None,
) -> list[str]:
    """Read the texts of a data file.

    Args:
        path: A ``.txt``, ``.csv``, ``.tsv`` or ``.jsonl`` file.
        text_column: The column (csv/tsv) or key (jsonl) that holds the text; guessed if ``None``.
        encoding: The file's text encoding.
        limit: Keep at most this many texts (the first ones).

    Returns:
        The non-empty texts, stripped.

    Raises:
        DataError: the file is missing, unreadable, of an unknown kind, or holds no text.
    """
    path = Path(path)
    raw = _read_raw(path, encoding)
    if path.suffix.lower() == ".txt":
        if text_column is not None:
            raise DataError(f"{path}: a .txt file has one text a line and no columns; drop --text-column")
        texts = [line.strip() for line in raw.splitlines()]
    else:
        rows, names = _records(path, raw)
        column = _pick_column(path, names, text_column, rows, TEXT_COLUMNS)
        texts = [_as_text(path, row.get(column), column) for row in rows]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path} contains no text")
    return texts[:limit] if limit else texts


def read_labelled(
    path: str | Path,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    encoding: str = "utf-8",
    classes: bool = False,
) -> tuple[list[str], list[str]]:
    """Read ``(texts, labels)`` from a csv, tsv or jsonl file; rows without text are dropped.

    Args:
        classes: The labels must be classes (`check_classes`): for a probe or a classifier.

    Raises:
        DataError: as `read_texts`, no label column (a ``.txt`` file has none), or (with
            ``classes``) labels that are not classes.
    """
    path = Path(path)
    raw = _read_raw(path, encoding)
    if path.suffix.lower() == ".txt":
        raise DataError(f"{path}: a .txt file has no labels; use a csv, tsv or jsonl file with a label column")
    rows, names = _records(path, raw)
    text_col = _pick_column(path, names, text_column, rows, TEXT_COLUMNS)
    label_col = _pick_column(path, names, label_column, rows, LABEL_COLUMNS, guess_longest=False, what="label")
    pairs = [(_as_text(path, r.get(text_col), text_col), r.get(label_col)) for r in rows]
    pairs = [(t, str(lab).strip()) for t, lab in pairs if t and lab is not None and str(lab).strip()]
    if not pairs:
        raise DataError(f"{path} contains no labelled text")
    texts, labels = zip(*pairs)
    if classes:
        check_classes(labels, label_col, path)
    return list(texts), list(labels)


#: A label column is taken as classes up to this many distinct values whatever they look like
#: (class ids are small integers, 0/1 or 0..5; 20 Newsgroups has 20; a tiny file may give each of
#: its few rows a class of its own). Past it, numeric labels are refused: they are ratings or
#: scores (the movie snippets' mean ratings hold 1,041 values), not classes.
MAX_NUMERIC_CLASSES = 20
#: Past `MAX_NUMERIC_CLASSES`, labels of any kind are refused when more than this share of the
#: rows have a distinct label: most classes then hold one example (a column of ids, or of text),
#: a probe learns nothing and every model scores near zero, so a ratio of two such numbers
#: means nothing. TREC's 50 fine labels in 5,381 rows (1%) pass.
MAX_DISTINCT_SHARE = 0.5


def check_classes(labels, column: str | None, source) -> None:
    """Labels must be a set of classes, not numbers to regress on or one value a row.

    Called wherever labels are read for a probe or a classifier (`read_labelled` and hub
    datasets with ``classes=True``).

    Args:
        labels: The labels, as read.
        column: The column they came from (named in the message).
        source: The file or dataset (named in the message).

    Raises:
        DataError: more than `MAX_NUMERIC_CLASSES` distinct labels that are all numbers, or
            more distinct labels than `MAX_DISTINCT_SHARE` of the rows; one line naming the column.
    """
    labels = [str(v).strip() for v in labels]
    distinct, rows = len(set(labels)), len(labels)
    if distinct <= MAX_NUMERIC_CLASSES:
        return
    counts = f"{distinct:,} distinct values in {rows:,} rows"
    fix = "pass --label-column with a class column"
    if all(_is_number(v) for v in labels):
        raise DataError(f"{source}: column {column!r} looks like numbers, not classes ({counts}); {fix}, "
                        "or bin the values first")
    if distinct > MAX_DISTINCT_SHARE * rows:
        raise DataError(f"{source}: column {column!r} looks like ids or free text, not classes ({counts}: "
                        f"most classes would hold one example); {fix}")


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _read_raw(path: Path, encoding: str) -> str:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data format {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    if encoding.lower().replace("-", "").replace("_", "") == "utf8":
        encoding = "utf-8-sig"  # the same, but drops the byte-order mark spreadsheets write
    try:
        with open(path, encoding=encoding, newline="") as f:  # newline="": csv sees quoted newlines as they are
            raw = f.read()
    except UnicodeDecodeError:
        shown = "utf-8" if encoding == "utf-8-sig" else encoding
        raise DataError(f"{path} is not valid {shown} text; pass the file's encoding (--encoding)") from None
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if "\x00" in raw:
        raise DataError(f"{path} looks binary, not text")
    return raw


def _records(path: Path, raw: str) -> tuple[list[dict], list[str]]:
    """Rows of a csv/tsv/jsonl file as dicts, and the column names."""
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{number} is not valid JSON") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number} is not a JSON object")
            records.append(obj)
        return records, list(dict.fromkeys(k for r in records for k in r))
    tsv = path.suffix.lower() == ".tsv"
    delimiter = "\t" if tsv else ","
    csv.field_size_limit(2**31 - 1)  # long documents are fine
    # TSV files do not quote: a text that starts with a quote mark is still one field.
    reader = csv.DictReader(io.StringIO(raw), delimiter=delimiter, quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{path} is not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    return rows, list(reader.fieldnames or [])


def _pick_column(path: Path, names: list[str], wanted: str | None, rows: list[dict], conventional: tuple[str, ...],
                 *, guess_longest: bool = True, what: str = "text") -> str:
    """The named column, else a conventional name, else (for text) the column with the longest strings."""
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{path} has no column {wanted!r}; it has: {', '.join(n for n in names if n) or 'none'}")
        return wanted
    lowered = {n.lower(): n for n in names if n}
    for name in conventional:
        if name in lowered:
            return lowered[name]
    flag = "--text-column" if what == "text" else "--label-column"
    string_cols = [n for n in names if n and any(_is_words(r.get(n)) for r in rows)]
    if not guess_longest or not string_cols:
        raise DataError(f"{path} has no {what} column; name one with {flag}")
    return max(string_cols, key=lambda n: sum(len(str(r.get(n) or "")) for r in rows))


def _is_words(value) -> bool:
    """A string that is not just a number (ids and scores are not text to calibrate on)."""
    if not isinstance(value, str) or not value.strip():
        return False
    try:
        float(value)
    except ValueError:
        return True
    return False


def _as_text(path: Path, value, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: column {column!r} holds {type(value).__name__} values, not text")
    return value.strip()


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int, device: str):
    """``texts`` tokenized ``batch_size`` at a time, padded, truncated to what the model takes,
    on ``device``."""
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                        max_length=fit_length(tokenizer, max_length), return_tensors="pt").to(device)


def embed_by_length(embed_batch, tokenizer, texts: list[str], batch_size: int, max_length: int,
                    device: str = "cpu") -> list:
    """``embed_batch(encoding)`` over ``texts`` batched shortest first, its outputs (one row per
    text) back in the order of ``texts``: a batch is padded to its longest text, so batches of
    similar lengths compute far fewer padding tokens (the padding is masked out either way)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = [None] * len(texts)
    done = 0
    for enc in batches(tokenizer, [texts[i] for i in order], batch_size, max_length, device):
        for row in embed_batch(enc):
            rows[order[done]] = row
            done += 1
    return rows
