"""`compress finetune` under torchrun (issue 35): 2 processes on CPUs (gloo) take the steps one
process takes, with the student sharded (FSDP2) or replicated (DDP), a shared group and LoRA
deltas included; a 2-process checkpoint resumes in one process; the bad launches get one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.models import load_model

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["the cat sat on the mat.", "a quick brown fox jumps over the lazy dog!", "hello world, again and again;",
         "numbers 1 2 3 and more text here", "short one", "the last text of the calibration set is this one.",
         "rain in the hills", "an old film with a slow start"] * 2
#: The run every launch below shares: a global batch of 4 texts, 4 steps, a checkpoint every 2.
RUN = ["--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--save-every", "2", "--train", "lora+norms",
       "--quiet"]


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``compress`` under the documented launcher, on CPUs, one thread a process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(Path(sys.executable).parent / "compress"), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def shared(tiny_dirs, tmp_path_factory):
    """The tiny Llama with layers 0-1 sharing one base (2-3 too), rank-2 deltas, and its texts."""
    folder = tmp_path_factory.mktemp("dist")
    data = folder / "texts.txt"
    data.write_text("\n".join(TEXTS))
    assert invoke("share", tiny_dirs["llama"], "--plan", "0-1,2-3", "--lora-rank", "2", "--no-fidelity", "-o",
                  folder / "shared").exit_code == 0
    return folder / "shared", tiny_dirs["llama"], data


@pytest.fixture(scope="module")
def single(shared, tmp_path_factory):
    """The same run in one process: its per-step losses and final checkpoint."""
    student, teacher, data = shared
    out = tmp_path_factory.mktemp("single") / "tuned"
    result = invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN, "-o", out)
    assert result.exit_code == 0, result.output
    return out


def _history(folder: Path) -> list[dict]:
    return json.loads((folder / "finetune_report.json").read_text())["metrics"]["history"]


def _assert_same_run(folder: Path, reference: Path) -> None:
    got, want = _history(folder), _history(reference)
    assert [h["step"] for h in got] == [h["step"] for h in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # a term far smaller than the loss (the KL of a student already close to its teacher) is
        # a difference of near-equal numbers: its float32 rounding is judged against the loss
        assert [a[k] for k in a] == pytest.approx([b[k] for k in b], rel=1e-5, abs=1e-5 * b["loss"])
    x, y = load_model(folder).model, load_model(reference).model
    for name, p in y.named_parameters():
        assert torch.allclose(x.get_parameter(name), p, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_processes_take_the_steps_one_process_takes(shared, single, tmp_path, strategy):
    """Each rank holds 2 of the 4 texts; the losses of every step and the final weights are the
    one-process run's (relative 1e-5). Rank 0 alone writes a checkpoint every other command
    loads, and the record says how the run was spread."""
    student, teacher, data = shared
    out = tmp_path / "tuned"
    result = torchrun(2, "finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN,
                      "--strategy", strategy, "-o", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 1  # rank 0 speaks for the run
    _assert_same_run(out, single)
    how = json.loads((out / "finetune_report.json").read_text())["metrics"]["distributed"]
    assert how["world_size"] == 2 and how["backend"] == "gloo" and how["strategy"] == strategy
    assert how["batch_per_rank"] == 2
    assert how["student"].startswith("sharded" if strategy == "fsdp" else "replicated")
    loaded = load_model(out).model  # the shared base is one tensor again, as written
    assert loaded.model.layers[0].mlp.down_proj.base_layer is loaded.model.layers[1].mlp.down_proj.base_layer


def test_a_two_process_checkpoint_resumes_in_one_process_on_the_same_trajectory(shared, single, tmp_path):
    """2 steps sharded over 2 processes, then 2 more resumed in one: the 4 steps of one process."""
    student, teacher, data = shared
    out = tmp_path / "tuned"
    first = torchrun(2, "finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "2", *RUN,
                     "--strategy", "fsdp", "-o", out)
    assert first.returncode == 0, first.stderr[-3000:]
    result = invoke("finetune", out, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN, "--resume",
                    "-o", out)
    assert result.exit_code == 0, result.output
    _assert_same_run(out, single)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two(shared, single, tmp_path):
    """The other way: 2 steps in one process, 2 more on 2 ranks with DDP."""
    student, teacher, data = shared
    out = tmp_path / "tuned"
    assert invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "2", *RUN,
                  "-o", out).exit_code == 0
    result = torchrun(2, "finetune", out, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN,
                      "--strategy", "ddp", "--resume", "-o", out)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(out, single)


def test_bad_launches_are_one_line_and_write_nothing(shared, tmp_path):
    """A global batch the world size does not divide; NCCL on a machine without CUDA."""
    student, teacher, data = shared
    out = tmp_path / "tuned"
    odd = torchrun(2, "finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "1", "--batch-size",
                   "3", "-o", out)
    assert odd.returncode != 0 and not out.exists()
    assert "--batch-size 3 is the global batch, split over 2 processes" in odd.stderr
    few = tmp_path / "few.txt"
    few.write_text("one text\ntwo texts\n")
    short = torchrun(2, "finetune", student, "--teacher", teacher, "--data", few, "--max-steps", "1", "--batch-size",
                     "4", "-o", out)
    assert short.returncode != 0 and not out.exists()
    assert "the training data has 2 texts, fewer than --batch-size 4 split over 2 processes" in short.stderr
    if torch.cuda.is_available():
        return
    nccl = torchrun(2, "finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "1", "--backend",
                    "nccl", "-o", out)
    assert nccl.returncode != 0 and not out.exists()
    assert "--backend nccl needs CUDA devices" in nccl.stderr


def test_a_run_torchrun_restarts_continues_from_its_last_checkpoint(shared, single, tmp_path, monkeypatch):
    """After a process dies, ``torchrun --max-restarts`` starts the same command again: it picks
    up the checkpoint its first life left (here 2 of 4 steps) instead of refusing the folder."""
    student, teacher, data = shared
    out = tmp_path / "tuned"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "tune-1")  # torchrun's id of the run, the same in every life
    assert invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "2", *RUN,
                  "-o", out).exit_code == 0
    again = invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN, "-o", out)
    assert again.exit_code != 0 and "exists" in again.output  # a plain second run still refuses the folder
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "tune-2")  # another run's restart does not take this one's state
    other = invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN, "-o", out)
    assert other.exit_code != 0 and "exists" in other.output
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "tune-1")
    restarted = invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN, "-o", out)
    assert restarted.exit_code == 0, restarted.output
    _assert_same_run(out, single)


def test_processes_launches_torchrun_for_the_user(shared, single, tmp_path):
    """``--processes 2``: the same run on 2 processes of this machine, started for the user."""
    student, teacher, data = shared
    out = tmp_path / "tuned"
    result = invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "4", *RUN,
                    "--processes", "2", "--strategy", "fsdp", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "finetune_report.json").read_text())["metrics"]["distributed"]["world_size"] == 2
    _assert_same_run(out, single)
    odd = invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "1", "--batch-size", "3",
                 "--processes", "2", "-o", tmp_path / "odd")
    assert odd.exit_code != 0 and not (tmp_path / "odd").exists()  # refused before any process starts
    assert "--processes 2: --batch-size 3 is the global batch, split over 2 processes" in odd.output


@pytest.mark.slow
def test_a_batch_job_that_declares_two_gpus_fine_tunes_on_two_processes(shared, tmp_path):
    """A job's ``num_gpus: 2`` reaches its finetune stage as 2 processes (on CPUs here, gloo)."""
    from compressor.contract import StageRun
    from compressor.finetune import FinetuneConfig
    from compressor.finetune.runner import run

    student, teacher, data = shared
    config = FinetuneConfig(teacher=str(teacher), data=str(data), max_steps=2, batch_size=4, device="cpu")
    record = run(StageRun(config=config, model=str(student), output=tmp_path / "tuned", devices=2))
    assert record.metrics["distributed"]["world_size"] == 2 and record.metrics["steps"] == 2


def test_a_resume_from_another_models_training_state_is_one_line(shared, tiny_dirs, tmp_path):
    """A trainer state whose parameters this student does not train (another model's): refused."""
    import shutil

    student, teacher, data = shared
    out = tmp_path / "tuned"
    assert invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "1", *RUN,
                  "-o", out).exit_code == 0
    other = tmp_path / "other"
    assert invoke("share", tiny_dirs["llama"], "--plan", "0-1,2,3", "--lora-rank", "2", "--no-fidelity", "-o",
                  other).exit_code == 0
    shutil.copy(out / "trainer_state.pt", other / "trainer_state.pt")
    result = invoke("finetune", other, "--teacher", teacher, "--data", data, "--max-steps", "2", *RUN, "--resume",
                    "-o", other)
    assert result.exit_code != 0
    assert "belongs to another model" in result.output.strip().splitlines()[-1], result.output


@pytest.mark.slow
def test_a_bf16_student_sharded_trains_its_deltas_as_one_process_does(tiny_dirs, tmp_path):
    """The large-model path sharded: a bf16 student's frozen bf16 base and float32 deltas in one
    FSDP2 unit per sharing group (mixed precision), on 2 processes, step for step as one process."""
    teacher = tmp_path / "bf16"
    model = load_model(tiny_dirs["llama"], dtype="float32").model.to(torch.bfloat16)
    model.save_pretrained(teacher)
    load_model(tiny_dirs["llama"]).tokenizer.save_pretrained(teacher)
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS))
    student = tmp_path / "shared"
    assert invoke("share", teacher, "--plan", "0-1,2-3", "--lora-rank", "2", "--no-fidelity", "-o",
                  student).exit_code == 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert invoke("finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "3", *RUN,
                  "-o", one).exit_code == 0
    result = torchrun(2, "finetune", student, "--teacher", teacher, "--data", data, "--max-steps", "3", *RUN,
                      "--strategy", "fsdp", "-o", two)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((two / "finetune_report.json").read_text())["metrics"]
    assert metrics["precision"] == "mixed" and metrics["distributed"]["strategy"] == "fsdp"
    got, want = _history(two), _history(one)
    # bf16 matmuls over 2 rows or 4 round differently: the batch's loss agrees to bf16's precision
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-2)


def test_a_jobs_gpus_that_cannot_split_the_run_leave_it_in_one_process(shared, tmp_path, capsys):
    """A job's ``num_gpus: 2`` with an option only one process trains (here --quantize-aware):
    the stage runs as before, in one process, and says why."""
    from compressor.contract import StageRun
    from compressor.finetune import FinetuneConfig
    from compressor.finetune.runner import run

    student, teacher, data = shared
    config = FinetuneConfig(teacher=str(teacher), data=str(data), max_steps=1, batch_size=4, device="cpu",
                            quantize_aware=True, block_size=16)
    record = run(StageRun(config=config, model=str(student), output=tmp_path / "tuned", devices=2))
    assert record.metrics["distributed"]["world_size"] == 1 and record.metrics["steps"] == 1
    assert "finetune in one process, not on the job's 2 GPUs: --quantize-aware trains in one process" in \
        capsys.readouterr().err
