"""Recovery fine-tuning on tiny models: loss goes down, resume continues, runs repeat exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.errors import ConfigError
from compressor.fidelity import fidelity
from compressor.finetune import FinetuneConfig, finetune
from compressor.models import load_model
from compressor.sharing import ShareConfig, save_checkpoint, share

TEXTS = [f"the {w} of sentence {i} is {w[::-1]}" for i, w in enumerate(["cat", "dog", "river", "music", "film", "tree"] * 12)]


@pytest.fixture()
def student_dir(tiny_dirs, tmp_path):
    """A tiny BERT shared 4 -> 1 group (plain mean) with rank-4 LoRA, saved as a checkpoint."""
    loaded, _ = share(load_model(tiny_dirs["bert"]), ShareConfig(plan="0-3", init="mean", lora_rank=4, fidelity=False))
    return save_checkpoint(loaded, tmp_path / "student")


@pytest.fixture()
def data_file(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("\n".join(TEXTS))
    return f


def config(data_file, tiny_dirs, **kw):
    base = dict(teacher=str(tiny_dirs["bert"]), data=str(data_file), max_steps=6, batch_size=8, max_length=32, lr=5e-3, save_every=0)
    return FinetuneConfig(**{**base, **kw})


def weights(loaded):
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def test_a_few_steps_lower_the_distillation_loss(student_dir, data_file, tiny_dirs, tmp_path):
    teacher = load_model(tiny_dirs["bert"])
    before = fidelity(load_model(student_dir), teacher, TEXTS[:24])
    student, record = finetune(load_model(student_dir), config(data_file, tiny_dirs, max_steps=40, lr=1e-2),
                               output=tmp_path / "out", teacher=teacher, progress=False)
    after = fidelity(student, teacher, TEXTS[:24])
    assert sum(after["hidden_state_error"]) < 0.7 * sum(before["hidden_state_error"])
    assert record.metrics["loss_last"] < record.metrics["loss_first"]
    # the output is a compressed checkpoint that keeps the sharing
    reloaded = load_model(tmp_path / "out")
    blocks = reloaded.adapter.blocks(reloaded.model)
    assert blocks[0].attention.self.query.weight is blocks[3].attention.self.query.weight
    assert json.loads((tmp_path / "out" / "finetune_report.json").read_text())["metrics"]["steps"] == 40


def test_lora_mode_trains_only_the_deltas(student_dir, data_file, tiny_dirs, tmp_path):
    start = load_model(student_dir)
    frozen = {k: v for k, v in weights(start).items() if "lora_" not in k}
    student, record = finetune(start, config(data_file, tiny_dirs, train="lora"), output=tmp_path / "o", progress=False)
    after = weights(student)
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(not torch.equal(after[k], v) for k, v in weights(load_model(student_dir)).items() if "lora_" in k)
    assert record.metrics["trainable_params"] == sum(v.numel() for k, v in after.items() if "lora_" in k)


def test_same_seed_same_result_and_resume_continues(student_dir, data_file, tiny_dirs, tmp_path):
    straight, rec = finetune(load_model(student_dir), config(data_file, tiny_dirs), output=tmp_path / "a", progress=False)
    again, _ = finetune(load_model(student_dir), config(data_file, tiny_dirs), output=tmp_path / "b", progress=False)
    w_straight = weights(straight)
    assert all(torch.equal(w_straight[k], v) for k, v in weights(again).items())
    # stop after 3 steps, then resume to 6: the same weights as 6 steps in one go
    finetune(load_model(student_dir), config(data_file, tiny_dirs, max_steps=3), output=tmp_path / "c", progress=False)
    resumed, rec2 = finetune(load_model(tmp_path / "c"), config(data_file, tiny_dirs), output=tmp_path / "c",
                             resume=True, progress=False)
    assert rec2.metrics["steps"] == 6 and rec2.metrics["steps_this_run"] == 3
    assert [h["step"] for h in rec2.metrics["history"]] == list(range(1, 7))
    w_resumed = weights(resumed)
    for k, v in w_straight.items():
        torch.testing.assert_close(w_resumed[k], v, rtol=0, atol=1e-6)


def test_teacher_defaults_to_the_recorded_original(student_dir, data_file, tiny_dirs, tmp_path, monkeypatch):
    original = str(tiny_dirs["bert"].resolve())
    assert json.loads((student_dir / "compress.json").read_text())["source"] == original
    monkeypatch.chdir(tmp_path)  # the recorded path is absolute: it works from anywhere
    _, record = finetune(load_model(student_dir), config(data_file, tiny_dirs, teacher=None, max_steps=1),
                         output=tmp_path / "o", progress=False)
    assert record.metrics["steps"] == 1
    # a tuned checkpoint still names the original, not the student it was tuned from
    assert json.loads((tmp_path / "o" / "compress.json").read_text())["source"] == original
    assert load_model(tmp_path / "o").origin == original


def test_zero_steps_and_changed_options_on_resume(student_dir, data_file, tiny_dirs, tmp_path):
    result = run(student_dir, "--teacher", tiny_dirs["bert"], "--data", data_file, "-o", tmp_path / "z",
                 "--max-minutes", "0.0000001", "--quiet")
    assert result.exit_code == 0, result.output
    assert "0 steps" in result.output and "no step ran" in result.output
    finetune(load_model(student_dir), config(data_file, tiny_dirs, max_steps=2), output=tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--train \\(was 'lora\\+norms'\\)"):
        finetune(load_model(tmp_path / "r"), config(data_file, tiny_dirs, max_steps=4, train="all"),
                 output=tmp_path / "r", resume=True, progress=False)


def run(*args):
    return CliRunner().invoke(cli, ["finetune", *map(str, args)])


def test_cli_bad_input(student_dir, data_file, tiny_dirs, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    labelled = tmp_path / "l.csv"
    labelled.write_text("text,label\nfine,pos\nbad,neg\n")
    cases = [
        ([student_dir, "--teacher", tiny_dirs["gpt2"]], "the teacher is a gpt2 model"),
        ([student_dir, "--teacher", tiny_dirs["distilbert"]], "the teacher is a distilbert model"),
        ([student_dir, "--teacher", tiny_dirs["bert"], "--data", empty], "contains no text"),
        ([student_dir, "--teacher", tiny_dirs["bert"], "--data", labelled, "--label-column", "stars"], "no column 'stars'"),
        ([student_dir, "--teacher", tiny_dirs["bert"], "--max-steps", "0"], "--max-steps must be at least 1"),
        ([student_dir, "--teacher", tiny_dirs["bert"], "--device", "cuda"], "CUDA is not available"),
        ([tiny_dirs["bert"], "--teacher", tiny_dirs["bert"], "--train", "lora"], "has no LoRA deltas"),
        ([student_dir, "--resume"], "nothing to resume"),
        ([student_dir, "--teacher", tiny_dirs["bert"], "--data", labelled, "--label-column", "label"],
         "the student has none"),
    ]
    for args, message in cases:
        if "--data" not in args:
            args = [*args, "--data", data_file]
        result = run(*args, "-o", out, "--quiet")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, (args, result.stderr)
        assert not out.exists()


@pytest.mark.slow  # a fresh process, interrupted mid-training: ~5 s
def test_ctrl_c_leaves_a_usable_checkpoint(student_dir, data_file, tiny_dirs, tmp_path):
    exe = Path(sys.executable).parent / "compress"
    out = tmp_path / "out"
    proc = subprocess.Popen([str(exe), "finetune", str(student_dir), "--teacher", str(tiny_dirs["bert"]), "--data",
                             str(data_file), "-o", str(out), "--max-minutes", "2", "--save-every", "5", "--batch-size", "4",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 60
    while not (out / "trainer_state.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (out / "trainer_state.pt").exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint yet"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "interrupted" in stdout
    report = json.loads((out / "finetune_report.json").read_text())
    assert report["metrics"]["stopped_by"] == "interrupted" and report["metrics"]["steps"] >= 5
    load_model(out)  # usable


def distil_cut_student(student, teacher, tmp_path, *, steps: int):
    """Save the cut ``student`` to tmp_path/cut and distil it into tmp_path/out on texts half of
    which the cut leaves alone ("jazz quiz" is outside TEXTS' characters); the stage record."""
    save_checkpoint(student, tmp_path / "cut")
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(t for i, w in enumerate(TEXTS) for t in (w, f"jazz quiz {i} {w[:9]}")))
    _, record = finetune(load_model(tmp_path / "cut"), FinetuneConfig(
        data=str(data), max_steps=steps, batch_size=8, max_length=32, lr=1e-2, save_every=0, train="all"),
        output=tmp_path / "out", teacher=teacher, progress=False)
    return record


def test_a_vocabulary_cut_student_distils_from_its_full_vocabulary_teacher(tiny_dirs, tmp_path):
    from compressor.fidelity import check_teacher
    from compressor.finetune import distillation_loss, same_tokens, teacher_ids
    from compressor.pruning.vocab import prune_vocabulary

    teacher, student = load_model(tiny_dirs["bert"]), load_model(tiny_dirs["bert"])
    prune_vocabulary(student, TEXTS)  # character-level: j, q, z ... are not in TEXTS and go
    own, theirs = student.tokenizer.get_vocab(), teacher.tokenizer.get_vocab()
    table = teacher_ids(student.tokenizer, teacher.tokenizer)
    assert len(own) < len(theirs) and all(int(table[i]) == theirs[tok] for tok, i in own.items())
    assert teacher_ids(teacher.tokenizer, teacher.tokenizer) is None
    texts = [TEXTS[0], "jazz quiz 7"]
    s_enc, t_enc = (m.tokenizer(texts, padding=True, return_tensors="pt") for m in (student, teacher))
    rows = same_tokens(s_enc["input_ids"], s_enc["attention_mask"], t_enc["input_ids"], t_enc["attention_mask"], table)
    assert rows.tolist() == [True, False]
    with torch.no_grad():
        s_out = student.model(**s_enc, output_hidden_states=True)
        t_out = teacher.model(**t_enc, output_hidden_states=True)
    cfg = FinetuneConfig(teacher=str(tiny_dirs["bert"]), max_steps=1)
    _, parts = distillation_loss(s_out, t_out, s_enc["attention_mask"], cfg, "mean", is_encoder=True,
                                 teacher_mask=t_enc["attention_mask"], rows=rows, vocab_map=table)
    # the cut leaves the text it covers exact (token terms on it alone); the other text differs
    assert parts["hidden"] < 1e-10 and parts["embedding"] > 1e-4
    # finetune runs on the cut student, each model reading with its own tokenizer, and learns
    record = distil_cut_student(student, teacher, tmp_path, steps=30)
    assert record.metrics["loss_last"] < 0.8 * record.metrics["loss_first"]
    assert load_model(tmp_path / "out").tokenizer.get_vocab() == own
    # a student with tokens the teacher lacks is no cut of it
    other = load_model(tiny_dirs["bert"])
    other.tokenizer.add_tokens(["zzqq"])
    with pytest.raises(ConfigError, match="not a cut of the teacher's"):
        check_teacher(other, teacher)


def test_a_vocabulary_cut_student_resumes_to_the_same_weights(tiny_dirs, tmp_path):
    from compressor.pruning.vocab import prune_vocabulary

    teacher, student = load_model(tiny_dirs["bert"]), load_model(tiny_dirs["bert"])
    prune_vocabulary(student, TEXTS)
    save_checkpoint(student, tmp_path / "cut")
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(t for i, w in enumerate(TEXTS) for t in (w, f"jazz quiz {i} {w[:9]}")))

    def run(steps, out, resume=False):
        start = load_model(out if resume else tmp_path / "cut")
        return finetune(start, FinetuneConfig(data=str(data), max_steps=steps, batch_size=8, max_length=32, lr=1e-2,
                                              save_every=0, train="all"),
                        output=out, teacher=teacher, resume=resume, progress=False)

    straight, _ = run(6, tmp_path / "a")
    run(3, tmp_path / "b")
    resumed, record = run(6, tmp_path / "b", resume=True)
    assert record.metrics["steps"] == 6 and record.metrics["steps_this_run"] == 3
    assert resumed.tokenizer.get_vocab() == student.tokenizer.get_vocab()  # still the cut vocabulary
    w_resumed = weights(resumed)
    for k, v in weights(straight).items():
        torch.testing.assert_close(w_resumed[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_vocabulary_cut_decoder_distils_with_kl_over_its_kept_tokens(family, tiny_dirs, tmp_path):
    from compressor.pruning.vocab import prune_vocabulary

    teacher, student = load_model(tiny_dirs[family]), load_model(tiny_dirs[family])
    prune_vocabulary(student, TEXTS)
    record = distil_cut_student(student, teacher, tmp_path, steps=20)
    history = record.metrics["history"]
    # every batch mixes texts the cut leaves alone with ones it changes: KL and hidden on the
    # first, where the cut student starts exact (KL over the kept tokens 0: the teacher's
    # distribution renormalized over them is the student's)
    assert all("kl" in h and "hidden" in h for h in history)
    assert history[0]["kl"] < 1e-6 and history[0]["hidden"] < 1e-9


def test_both_tokenizations_share_one_width_on_each_padding_side(tiny_dirs):
    from compressor.finetune import common_width

    model = load_model(tiny_dirs["gpt2"])
    model.model.eval()
    tok = model.tokenizer
    for side in ("left", "right"):
        tok.padding_side = side
        short = tok(["the cat"], return_tensors="pt", padding=True)
        wide = tok(["the cat", "the dog of sentence 3 is god"], return_tensors="pt", padding=True)
        a, b = common_width(short, tok, wide, tok)
        assert a["input_ids"].shape[1] == b["input_ids"].shape[1] == wide["input_ids"].shape[1]
        assert torch.equal(a["input_ids"][0], b["input_ids"][0]) and torch.equal(a["attention_mask"][0], b["attention_mask"][0])
        with torch.no_grad():  # so the same text gets the same outputs from a model with absolute positions
            ha, hb = (model.model(input_ids=e["input_ids"], attention_mask=e["attention_mask"],
                                  output_hidden_states=True).hidden_states[-1][0][e["attention_mask"][0].bool()]
                      for e in (a, b))
        torch.testing.assert_close(ha, hb, atol=1e-5, rtol=1e-5)


def test_fidelity_of_a_cut_model_compares_hidden_states_only_on_the_same_tokens(tiny_dirs):
    from compressor.pruning.vocab import prune_vocabulary

    teacher, student = load_model(tiny_dirs["bert"]), load_model(tiny_dirs["bert"])
    prune_vocabulary(student, TEXTS)
    assert fidelity(student, teacher, TEXTS[:8])["hidden_state_error"] == [0.0] * 4  # the cut is exact here
    # "jazz" becomes [UNK]s one for one: same lengths, other tokens, so no per-layer error is claimed
    assert fidelity(student, teacher, TEXTS[:7] + ["jazz quiz"])["hidden_state_error"] is None


def test_config_always_has_a_budget():
    # The CLI and recipes read the same default: 200 steps, unless a time budget alone is given.
    assert FinetuneConfig(max_steps=None, max_minutes=None).max_steps == 200
    assert FinetuneConfig(max_minutes=3).max_steps is None
    with pytest.raises(ConfigError, match="max-steps"):
        FinetuneConfig(max_steps=0)


def test_classifier_distils_with_labels_and_evaluates_with_its_head(tmp_path):
    import transformers
    from tiny_models import make_tokenizer

    from compressor.evaluation import EvaluateConfig, evaluate

    torch.manual_seed(0)
    config_ = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=128, max_position_embeddings=128, pad_token_id=0, num_labels=2,
                                      id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    teacher_dir = tmp_path / "clf"
    transformers.BertForSequenceClassification(config_).save_pretrained(teacher_dir)
    make_tokenizer().save_pretrained(teacher_dir)
    data = tmp_path / "labelled.csv"
    data.write_text("text,label\n" + "\n".join(f"text number {i},{'pos' if i % 2 else 'neg'}" for i in range(40)) + "\n")

    student, _ = share(load_model(teacher_dir), ShareConfig(plan="0-3", lora_rank=4, fidelity=False))
    student, record = finetune(student, FinetuneConfig(teacher=str(teacher_dir), data=str(data), max_steps=3, batch_size=8),
                               output=tmp_path / "out", progress=False)
    assert {"hidden", "kl", "label"} <= set(record.metrics["history"][0])
    assert "embedding" not in record.metrics["history"][0]  # classifiers are judged by their head
    tuned = load_model(tmp_path / "out")
    cfg = EvaluateConfig(data=str(data), train_size=20, test_size=20)
    _, ev = evaluate(tuned, cfg)
    assert ev.metrics["task"] == "classification"
    # the same accuracy computed by hand from the head's logits on the same split
    from compressor.evaluation import load_split

    _, _, te_x, te_y = load_split(cfg, need_labels=True)
    enc = tuned.tokenizer(te_x, padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = tuned.model(**enc).logits.argmax(-1).tolist()
    gold = [{"neg": 0, "pos": 1}[y] for y in te_y]
    assert ev.metrics["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / len(gold))


def test_the_neighbour_loss_reads_only_how_each_text_ranks_and_spaces_its_neighbours():
    """Zero for the teacher's own embeddings at any scale (cosines do not see it) and after a
    rotation (which keeps every cosine); positive once the neighbours change, and larger the more
    they do."""
    from compressor.finetune.stage import neighbour_loss

    teacher = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    assert float(neighbour_loss(3 * teacher, teacher)) < 1e-6
    assert float(neighbour_loss(teacher @ rotation, teacher)) < 1e-5
    noisy = teacher + 0.3 * torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    shuffled = teacher[torch.randperm(16, generator=torch.Generator().manual_seed(3))]
    assert 0 < float(neighbour_loss(noisy, teacher)) < float(neighbour_loss(shuffled, teacher))


def test_data_from_several_sources_interleaves_them_and_leaves_out_the_holdout(tiny_dirs, tmp_path):
    from compressor.finetune.data import load_training_data

    a, b, held = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "held.txt"
    a.write_text("\n".join(TEXTS[:10]))
    b.write_text("\n".join(TEXTS[10:14]))
    held.write_text("\n".join([TEXTS[1], TEXTS[11], "a text the data does not hold"]))
    student = load_model(tiny_dirs["bert"])
    data = load_training_data(student, FinetuneConfig(data=f"{a},{b}", holdout=str(held)))
    assert data.texts == [TEXTS[0], TEXTS[10], TEXTS[2], TEXTS[12], TEXTS[3], TEXTS[13], *TEXTS[4:10]]
    assert data.held_out == 2
    # max_samples counts the texts trained on, after the holdout
    assert load_training_data(student, FinetuneConfig(data=f"{a},{b}", holdout=str(held), max_samples=3)).texts == \
        [TEXTS[0], TEXTS[10], TEXTS[2]]
    with pytest.raises(ConfigError, match="the training data is empty once the 4 texts of --holdout are left out"):
        load_training_data(student, FinetuneConfig(data=str(b), holdout=str(b)))
    # the command says what it trained on, and the record keeps it
    result = run(tiny_dirs["bert"], "--teacher", tiny_dirs["bert"], "--data", f"{a},{b}", "--holdout", held,
                 "--train", "all", "--max-steps", 1, "--batch-size", 4, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "12 training texts, 2 held out" in result.output
    metrics = json.loads((tmp_path / "out" / "finetune_report.json").read_text())["metrics"]
    assert (metrics["texts"], metrics["held_out"]) == (12, 2)


def test_holdout_suite_leaves_out_exactly_the_test_splits_the_suite_scores(tiny_dirs, tmp_path):
    from compressor.evaluation.suite import SuiteConfig, load_suite
    from compressor.finetune.data import load_training_data

    tasks = []
    for name, n in (("alpha", 60), ("beta", 30)):
        rows = [f"{name} text number {i} about {TEXTS[i % len(TEXTS)]}" for i in range(n)]
        path = tmp_path / f"{name}.csv"
        path.write_text("text,label\n" + "".join(f"{t},{'xy'[i % 2]}\n" for i, t in enumerate(rows)))
        tasks.append(str(path))
    config = FinetuneConfig(data=",".join(tasks), holdout="suite", suite_tasks=",".join(tasks), suite_train_size=30,
                            suite_test_size=10)
    data = load_training_data(load_model(tiny_dirs["bert"]), config)
    suite = load_suite(SuiteConfig(suite_tasks=tasks, suite_train_size=30, suite_test_size=10, pool_size=10,
                                   neighbours=3))
    test_texts = {t for task in suite.tasks for t in task.test_texts}
    assert len(test_texts) == 10 + 8  # beta's 30 rows split in the suite's proportion: 22 / 8
    assert data.held_out == 18 and len(data.texts) == 90 - 18
    assert not test_texts & set(data.texts)
    assert {t for task in suite.tasks for t in task.train_texts} <= set(data.texts)


def test_finetune_config_refusals():
    with pytest.raises(ConfigError, match="--holdout names nothing"):
        FinetuneConfig(holdout=" , ")
    with pytest.raises(ConfigError, match="--label-column reads the labels of one data set"):
        FinetuneConfig(data="a.csv,b.csv", label_column="label")
    with pytest.raises(ConfigError, match="unknown suite task 'nonesuch'"):
        FinetuneConfig(holdout="suite", suite_tasks=["nonesuch"])


def test_holdout_refusals_and_a_resume_that_changes_it(student_dir, data_file, tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="--holdout suite stands alone"):
        FinetuneConfig(holdout="suite,extra.txt")
    with pytest.raises(ConfigError, match="--suite-test-size chooses the texts --holdout suite leaves out"):
        FinetuneConfig(suite_test_size=500)
    assert FinetuneConfig(holdout=" Suite ").holdout == "suite"
    held = tmp_path / "held.txt"
    held.write_text(TEXTS[0])
    finetune(load_model(student_dir), config(data_file, tiny_dirs, max_steps=2, holdout=str(held)),
             output=tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="--holdout"):
        finetune(load_model(tmp_path / "out"), config(data_file, tiny_dirs, max_steps=4), output=tmp_path / "out",
                 resume=True, progress=False)


def test_the_learning_rate_schedules(student_dir, data_file, tiny_dirs, tmp_path):
    """--lr-schedule: the warm-up, then the rate held, or decayed to 0 at --max-steps (linear,
    half cosine); the optimizer follows it step by step; a decay needs --max-steps, and a resume
    that moves --max-steps (where the decay ends) is refused."""
    from compressor.finetune.state import lr_factor

    def factors(schedule):
        c = FinetuneConfig(lr_schedule=schedule, max_steps=110, warmup_steps=10)
        return [lr_factor(c, s) for s in range(110)]

    const, linear, cosine = factors("constant"), factors("linear"), factors("cosine")
    assert linear[:10] == const[:10] == cosine[:10] == [(s + 1) / 10 for s in range(10)]
    assert const[10:] == [1.0] * 100
    assert linear[10] == 1.0 and linear[60] == pytest.approx(0.5) and linear[-1] == pytest.approx(0.01)
    assert cosine[10] == 1.0 and cosine[60] == pytest.approx(0.5) and 0 < cosine[-1] < linear[-1]
    assert all(a > b for a, b in zip(linear[10:], linear[11:]))

    _, record = finetune(load_model(student_dir), config(data_file, tiny_dirs, lr_schedule="linear", warmup_steps=2),
                         output=tmp_path / "lin", progress=False)
    with pytest.raises(ConfigError, match="lr-schedule linear decays to 0 at --max-steps"):
        FinetuneConfig(lr_schedule="linear", max_steps=None, max_minutes=1.0)
    with pytest.raises(ConfigError, match="lr-schedule"):
        FinetuneConfig(lr_schedule="step")
    with pytest.raises(ConfigError, match="--max-steps \\(was 6\\)"):
        finetune(load_model(tmp_path / "lin"), config(data_file, tiny_dirs, lr_schedule="linear", warmup_steps=2,
                                                      max_steps=12), output=tmp_path / "lin", resume=True, progress=False)
    state = torch.load(tmp_path / "lin" / "trainer_state.pt", weights_only=False)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(5e-3 * lr_factor(FinetuneConfig(
        lr_schedule="linear", max_steps=6, warmup_steps=2), 6))


def test_length_grouped_batches_hold_each_epochs_texts_with_less_padding(student_dir, tiny_dirs, tmp_path):
    """--group-by-length: an epoch holds exactly the texts an ungrouped epoch holds, each once;
    a batch's texts are of about one length (sorted within runs of 50 batches), so padded
    tokens fall; batches are reproducible per step, and a grouped run resumes to the weights
    of one run straight through (the epoch's order is recomputed, not saved)."""
    from compressor.finetune.data import MEGABATCH, batch_indices, grouped_batches

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 65, (3000,), generator=rng).tolist()
    batch = 16
    per_epoch = len(lengths) // batch
    for epoch in (0, 1):
        grouped = grouped_batches(lengths, batch, epoch, seed=0)
        plain = [batch_indices(len(lengths), batch, epoch * per_epoch + k, seed=0) for k in range(per_epoch)]
        assert len(grouped) == per_epoch and all(len(b) == batch for b in grouped)
        assert sorted(i for b in grouped for i in b) == sorted(i for b in plain for i in b)
        padded = lambda batches: sum(len(b) * max(lengths[i] for i in b) for b in batches)
        assert padded(grouped) < 0.65 * padded(plain)  # uniform lengths 3-64: about 0.53 left
        # long and short batches alternate: not sorted through the epoch
        widths = [max(lengths[i] for i in b) for b in grouped]
        assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    assert grouped_batches(lengths, batch, 1, seed=0) == grouped
    assert grouped_batches(lengths, batch, 1, seed=1) != grouped
    assert MEGABATCH * batch < len(lengths)  # the test saw more than one megabatch

    texts = [("word " * (1 + i % 20)).strip() + f" {i}" for i in range(96)]
    data = tmp_path / "mixed.txt"
    data.write_text("\n".join(texts))
    grouped_config = lambda steps: config(data, tiny_dirs, group_by_length=True, max_steps=steps)
    straight, _ = finetune(load_model(student_dir), grouped_config(6), output=tmp_path / "g", progress=False)
    finetune(load_model(student_dir), grouped_config(3), output=tmp_path / "h", progress=False)
    resumed, _ = finetune(load_model(tmp_path / "h"), grouped_config(6), output=tmp_path / "h", resume=True, progress=False)
    w_resumed = weights(resumed)
    for k, v in weights(straight).items():
        torch.testing.assert_close(w_resumed[k], v, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="group-by-length"):
        finetune(load_model(tmp_path / "h"), config(data, tiny_dirs, max_steps=8), output=tmp_path / "h", resume=True,
                 progress=False)
