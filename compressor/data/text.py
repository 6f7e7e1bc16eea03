"""Reading text (calibration and training data) from the files users have.

Formats by extension: ``.txt`` (one text a line), ``.csv`` / ``.tsv`` (a header row; the text
column is named or guessed), ``.jsonl`` (one JSON object a line; the text key is named or
guessed). Anything unreadable raises `DataError` with one line that says what is wrong.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

from ..errors import DataError

#: Column / key names tried, in order, when no text column is named.
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "body", "prompt", "question")
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


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
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" if not path.exists() else f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data format {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    try:
        raw = path.read_text(encoding=encoding)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not valid {encoding} text; pass the file's encoding (--encoding)") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if "\x00" in raw:
        raise DataError(f"{path} looks binary, not text")

    if suffix == ".txt":
        texts = [line.strip() for line in raw.splitlines()]
    elif suffix in (".csv", ".tsv"):
        texts = _read_table(path, raw, "\t" if suffix == ".tsv" else ",", text_column)
    else:
        texts = _read_jsonl(path, raw, text_column)
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path} contains no text")
    return texts[:limit] if limit else texts


def _read_table(path: Path, raw: str, delimiter: str, column: str | None) -> list[str]:
    reader = csv.DictReader(raw.splitlines(), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{path} is not valid {'TSV' if delimiter == chr(9) else 'CSV'}: {e}") from None
    header = reader.fieldnames or []
    column = _pick_column(path, header, column, rows)
    return [(row.get(column) or "").strip() for row in rows]


def _read_jsonl(path: Path, raw: str, key: str | None) -> list[str]:
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
    keys = list(dict.fromkeys(k for r in records for k in r))
    key = _pick_column(path, keys, key, records)
    return [str(r.get(key) or "").strip() for r in records]


def _pick_column(path: Path, names: list[str], wanted: str | None, rows: list[dict]) -> str:
    """The named column, else a conventional name, else the column with the longest strings."""
    if wanted is not None:
        if wanted not in names:
            raise DataError(f"{path} has no column {wanted!r}; it has: {', '.join(names) or 'none'}")
        return wanted
    lowered = {n.lower(): n for n in names if n}
    for name in TEXT_COLUMNS:
        if name in lowered:
            return lowered[name]
    string_cols = [n for n in names if n and any(isinstance(r.get(n), str) and r.get(n) for r in rows)]
    if not string_cols:
        raise DataError(f"{path} has no text column; name one with --text-column")
    return max(string_cols, key=lambda n: sum(len(str(r.get(n) or "")) for r in rows))
