"""Reading calibration text from the files users have."""

import json

import pytest

from compressor.data import default_calibration_texts, read_texts
from compressor.errors import DataError


def test_txt_skips_blank_lines(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first line\n\n  second line  \n\n")
    assert read_texts(f) == ["first line", "second line"]


def test_csv_guesses_text_column_and_honours_named_one(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text('id,label,sentence,note\n1,pos,"Great film, really",x\n2,neg,Dull and slow,y\n')
    assert read_texts(f) == ["Great film, really", "Dull and slow"]
    assert read_texts(f, text_column="note") == ["x", "y"]
    with pytest.raises(DataError, match="no column 'body'"):
        read_texts(f, text_column="body")


def test_tsv_without_conventional_name_takes_longest_column(tmp_path):
    f = tmp_path / "a.tsv"
    f.write_text("id\tsnippet\n1\ta rather long piece of text\n2\tanother long piece\n")
    assert read_texts(f) == ["a rather long piece of text", "another long piece"]


def test_jsonl_and_limit(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i}) for i in range(5)) + "\n")
    assert read_texts(f, limit=3) == ["t0", "t1", "t2"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"b.jsonl:2 is not valid JSON"):
        read_texts(bad)


def test_encoding(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8 text"):
        read_texts(f)
    assert read_texts(f, encoding="latin-1") == ["café crème"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.txt", "", "contains no text"),
        ("blank.txt", "\n \n", "contains no text"),
        ("data.parquet", "x", "unknown data format"),
        ("bin.txt", "a\x00b", "looks binary"),
        ("empty.csv", "text\n", "contains no text"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DataError, match=message):
        read_texts(f)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="is not a file"):
        read_texts(tmp_path)


def test_default_calibration_texts():
    texts = default_calibration_texts()
    assert len(texts) >= 60
    assert not any(t.startswith("#") for t in texts)
    assert len(set(texts)) == len(texts)


# ---- labels that are not classes ---------------------------------------------------------------


@pytest.mark.parametrize("labels", [
    ["0", "1"] * 50,                                  # class ids
    [str(i % 6) for i in range(120)],                 # 0..5
    [f"{i % 20}.0" for i in range(200)],              # 20 numeric classes, written as floats
    ["pos", "neg", "x", "y"],                         # a tiny file: each row its own class is fine
    [f"HUM:{i % 50}" for i in range(5000)],           # 50 fine TREC-like labels
])
def test_class_labels_are_accepted(labels):
    from compressor.data.text import check_classes

    check_classes(labels, "label", "data.csv")


def test_ratings_and_ids_are_not_classes():
    from compressor.data.text import check_classes

    ratings = [f"{(i % 1041) / 130 - 4:.3f}" for i in range(10_605)]
    with pytest.raises(DataError) as e:
        check_classes(ratings, "rating", "snippets.tsv")
    assert str(e.value) == ("snippets.tsv: column 'rating' looks like numbers, not classes (1,041 distinct values "
                            "in 10,605 rows); pass --label-column with a class column, or bin the values first")
    with pytest.raises(DataError, match="looks like numbers"):
        check_classes([str(i % 21) for i in range(1000)], "stars", "x.csv")  # 21 integer values: a score
    with pytest.raises(DataError, match=r"column 'id' looks like ids or free text, not classes \(100 distinct values in 120"):
        check_classes([f"doc{i % 100}" for i in range(120)], "id", "x.csv")
    check_classes([f"doc{i % 30}" for i in range(120)], "topic", "x.csv")  # 30 classes of 4: still classes


def test_read_labelled_checks_classes_only_when_asked(tmp_path):
    from compressor.data import read_labelled

    f = tmp_path / "raw.tsv"
    f.write_text("id\tsentiment\ttext\n" + "".join(f"{i}\t{i / 7 - 3:.4f}\tsnippet {i}\n" for i in range(50)))
    assert len(read_labelled(f)[1]) == 50
    with pytest.raises(DataError, match="column 'sentiment' looks like numbers, not classes"):
        read_labelled(f, classes=True)
