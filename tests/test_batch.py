"""`compress batch`: failed jobs, re-runs, changed recipes, a killed run, --jobs 2, Ray, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import assert_same_metrics

from cli.main import cli
from compressor.config import devices_elsewhere
from compressor.pipeline import load_manifest, plan_job

QUICK = Path(__file__).parent.parent / "recipes" / "quick.yaml"


def batch(*args, log_format="jsonl"):
    result = CliRunner().invoke(cli, ["--log-format", log_format, "batch", *map(str, args)])
    return result


def events(result) -> list[dict]:
    return [json.loads(line) for line in result.stderr.splitlines() if line]


def summary(out: Path) -> dict[str, dict]:
    return {j["job"]: j for j in json.loads((out / "summary.json").read_text())["jobs"]}


@pytest.fixture(scope="module")
def manifest(tiny_dirs, tmp_path_factory) -> Path:
    """Three jobs through the shipped quick recipe: tiny BERT, tiny GPT-2, and a model that does not exist."""
    root = tmp_path_factory.mktemp("manifest")
    path = root / "manifest.yaml"
    path.write_text(f"models: [{tiny_dirs['bert']}, {tiny_dirs['gpt2']}, ./no-such-model]\nrecipes: [{QUICK}]\n")
    return path


@pytest.fixture(scope="module")
def first_run(manifest, tmp_path_factory):
    """The manifest run once, one job after another in this process."""
    out = tmp_path_factory.mktemp("batch") / "out"
    return out, batch(manifest, "-o", out, "--json", "-")


def test_a_failed_job_is_reported_and_a_rerun_does_only_it(manifest, first_run):
    out, result = first_run
    assert result.exit_code == 1, result.output
    jobs = summary(out)
    assert json.loads(result.stdout)["counts"] == {"done": 2, "skipped": 0, "failed": 1, "pending": 0}
    assert {k: j["status"] for k, j in jobs.items()} == {"bert-quick": "done", "gpt2-quick": "done",
                                                          "no-such-model-quick": "failed"}
    assert jobs["no-such-model-quick"]["error"] == f"model folder {manifest.parent / 'no-such-model'} does not exist"
    assert jobs["bert-quick"]["metrics"]["finetune.steps"] == 5 and "evaluate.accuracy" in jobs["bert-quick"]["metrics"]
    assert "evaluate.perplexity" in jobs["gpt2-quick"]["metrics"]
    for name in ("bert-quick", "gpt2-quick"):
        done = json.loads((out / name / "DONE.json").read_text())
        assert done["result"]["metrics"] == jobs[name]["metrics"]
        assert all((out / name / s / "stage.json").is_file() for s in ("01-analyze", "02-share", "03-finetune", "04-evaluate"))
    assert not (out / "no-such-model-quick" / "DONE.json").exists()
    assert "does not exist" in json.loads((out / "no-such-model-quick" / "error.json").read_text())["error"]
    assert "| no-such-model-quick |" in (out / "summary.md").read_text()

    marks = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.parent != out}
    again = batch(manifest, "-o", out)
    assert again.exit_code == 1
    jobs2 = summary(out)
    assert [j["status"] for j in jobs2.values()] == ["skipped", "skipped", "failed"]
    assert jobs2["bert-quick"]["metrics"] == jobs["bert-quick"]["metrics"]
    kinds = [e["event"] for e in events(again)]
    assert kinds.count("job_skip") == 2 and kinds.count("job_fail") == 1 and "stage_start" not in kinds
    changed = [p for p, t in marks.items() if p.stat().st_mtime_ns != t]
    assert set(changed) <= {out / "no-such-model-quick" / "error.json"}  # nothing of the done jobs was touched

    dry = batch(manifest, "-o", out, "--dry-run", "--json", "-")
    assert [(p["job"], p["action"]) for p in json.loads(dry.stdout)] == [
        ("bert-quick", "skip"), ("gpt2-quick", "skip"), ("no-such-model-quick", "fail")]


@pytest.mark.slow  # a process pool: ~7 s
def test_two_processes_give_the_same_results(manifest, first_run, tmp_path):
    out = tmp_path / "parallel"
    result = batch(manifest, "-o", out, "--jobs", "2")
    assert result.exit_code == 1, result.output
    sequential, parallel = summary(first_run[0]), summary(out)
    assert [j["status"] for j in parallel.values()] == ["done", "done", "failed"]
    for name in ("bert-quick", "gpt2-quick"):
        assert_same_metrics(sequential[name]["metrics"], parallel[name]["metrics"])
    assert json.loads((out / "summary.json").read_text())["executor"] == "local x 2"


def batch_on_unreachable_ray(manifest, out: Path):
    result = batch(manifest, "-o", out, "--executor", "ray", "--address", "127.0.0.1:1", log_format="text")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1  # one line, and nothing written: no batch folder, no summary
    assert result.stderr.startswith("compress: error: cannot reach the Ray cluster at 127.0.0.1:1: ")
    assert not out.exists()


def test_an_unreachable_ray_cluster_fails_before_ray_init(manifest, tmp_path, monkeypatch):
    # before the tests that share a local Ray: inside a process connected to one, that connection is used
    ray = pytest.importorskip("ray")
    calls = []

    def init(*args, **kwargs):
        calls.append(kwargs.get("address", args[:1]))
        raise ConnectionError("ray.init called")

    monkeypatch.setattr(ray, "init", init)
    batch_on_unreachable_ray(manifest, tmp_path / "out")
    assert calls == []  # refused by the socket check: ray.init retries for minutes where nobody answers


@pytest.mark.slow  # a wall-clock bound: the default suite asserts none
def test_an_unreachable_ray_cluster_fails_fast(manifest, tmp_path):
    pytest.importorskip("ray")
    start = time.perf_counter()
    batch_on_unreachable_ray(manifest, tmp_path / "out")
    assert time.perf_counter() - start < 10


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_results(manifest, first_run, tmp_path, local_ray):
    out = tmp_path / "ray"
    result = batch(manifest, "-o", out, "--executor", "ray")
    assert result.exit_code == 1, result.output
    local, on_ray = summary(first_run[0]), summary(out)
    assert [j["status"] for j in on_ray.values()] == ["done", "done", "failed"]
    for name in ("bert-quick", "gpt2-quick"):
        assert_same_metrics(local[name]["metrics"], on_ray[name]["metrics"])
    # the workers' stage events come back to the driver's log
    ends = [e for e in events(result) if e["event"] == "stage_end"]
    assert sorted({e["job"] for e in ends}) == ["bert-quick", "gpt2-quick"] and len(ends) == 8
    assert json.loads((out / "summary.json").read_text())["executor"] == "ray"


def test_job_resources_for_ray(tmp_path):
    recipe = tmp_path / "gpu.yaml"
    recipe.write_text("stages:\n  - finetune: {max_steps: 5, device: cuda}\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"resources: {{num_cpus: 4}}\njobs:\n  - {{model: bundled, recipe: gpu.yaml}}\n"
                        f"  - {{model: bundled, recipe: {QUICK}, resources: {{num_cpus: 2}}}}\n")
    with devices_elsewhere():  # validated here, run on a cluster node that has the GPU
        gpu, cpu = load_manifest(manifest, tmp_path / "out")
    assert gpu.resources == {"num_cpus": 4, "num_gpus": 1}
    assert cpu.resources == {"num_cpus": 2, "num_gpus": 0}


def test_a_changed_recipe_reruns_from_the_first_changed_stage(tiny_dirs, tmp_path):
    recipe = tmp_path / "r.yaml"
    text = QUICK.read_text().replace("data/sample.csv", str(QUICK.parent / "data" / "sample.csv"))
    recipe.write_text(text)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"jobs:\n  - {{model: {tiny_dirs['bert']}, recipe: r.yaml, name: bert}}\n")
    out = tmp_path / "out"
    assert batch(manifest, "-o", out).exit_code == 0

    recipe.write_text(text.replace("test_size: 40", "test_size: 30"))
    dry = batch(manifest, "-o", out, "--dry-run", "--json", "-")
    assert json.loads(dry.stdout)[0]["action"] == "continue"
    result = batch(manifest, "-o", out)
    assert result.exit_code == 0 and summary(out)["bert"]["status"] == "done"
    stages = [(e["event"], e["stage"]) for e in events(result) if e["event"].startswith("stage_")]
    assert stages == [("stage_skip", "01-analyze"), ("stage_skip", "02-share"), ("stage_skip", "03-finetune"),
                      ("stage_start", "04-evaluate"), ("stage_end", "04-evaluate")]
    assert json.loads((out / "bert" / "04-evaluate" / "evaluate.json").read_text())["metrics"]["test_size"] == 30

    recipe.write_text(text.replace("lora_rank: 4", "lora_rank: 2"))
    result = batch(manifest, "-o", out)
    ran = [e["stage"] for e in events(result) if e["event"] == "stage_start"]
    assert ran == ["02-share", "03-finetune", "04-evaluate"]
    assert json.loads((out / "bert" / "02-share" / "stage.json").read_text())["record"]["config"]["lora_rank"] == 2


def test_a_job_that_could_not_start_runs_once_its_model_exists(tiny_dirs, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"jobs:\n  - {{model: ./later, recipe: {QUICK}}}\n")
    out = tmp_path / "out"
    assert batch(manifest, "-o", out).exit_code == 1
    assert sorted(p.name for p in (out / "later-quick").iterdir()) == ["error.json"]
    shutil.copytree(tiny_dirs["bert"], tmp_path / "later")
    result = batch(manifest, "-o", out)
    assert result.exit_code == 0 and summary(out)["later-quick"]["status"] == "done"
    assert not (out / "later-quick" / "error.json").exists()


@pytest.mark.slow  # kills and reruns a batch process: ~11 s
def test_a_killed_run_continues_and_never_looked_done(tiny_dirs, tmp_path):
    data = QUICK.parent / "data" / "sample.csv"
    (tmp_path / "long.yaml").write_text(
        "stages:\n  - share: {plan: \"0-1,2-3\", lora_rank: 4, fidelity: false}\n"
        f"  - finetune: {{data: {data}, max_steps: 300, save_every: 10, batch_size: 8, max_length: 32}}\n"
        f"  - evaluate: {{data: {data}, train_size: 80, test_size: 40, max_length: 32}}\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"jobs:\n  - {{model: {tiny_dirs['bert']}, recipe: long.yaml, name: long}}\n")
    out = tmp_path / "out"
    job = out / "long"
    exe = Path(sys.executable).parent / "compress"
    proc = subprocess.Popen([str(exe), "--log-format", "jsonl", "batch", str(manifest), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 90
        while not (job / "02-finetune" / "trainer_state.pt").exists() and time.time() < deadline and proc.poll() is None:
            assert not (job / "DONE.json").exists()
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)  # no handler runs: whatever is on disk now is all there is
    finally:
        proc.kill()
        proc.wait()
    assert not (job / "DONE.json").exists() and not (job / "02-finetune" / "stage.json").exists()
    assert (job / "01-share" / "stage.json").is_file()
    assert json.loads((out / "summary.json").read_text())["jobs"][0]["status"] == "pending"
    [loaded] = load_manifest(manifest, out)
    plan = plan_job(loaded)
    assert plan.action == "continue" and plan.reason == "unfinished; keeps 01-share; continues 02-finetune from its last checkpoint"

    result = batch(manifest, "-o", out)
    assert result.exit_code == 0, result.output
    assert [e["stage"] for e in events(result) if e["event"] == "stage_skip"] == ["01-share"]
    finetuned = json.loads((job / "02-finetune" / "stage.json").read_text())["record"]
    assert finetuned["metrics"]["steps"] == 300
    assert 0 < finetuned["metrics"]["steps_this_run"] < 300  # it went on from the last checkpoint
    assert summary(out)["long"]["status"] == "done" and (job / "DONE.json").is_file()
    assert not [p for p in job.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no leftovers


def test_bad_input_stops_before_any_job(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("jobs:\n  - model: x\n    recipe: [unclosed\n")
    result = batch(bad_yaml, "-o", out, log_format="text")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"compress: error: {bad_yaml}:4: not valid YAML")
    cases = [
        ("jobs:\n  - model: x\n    recipe: missing.yaml\n", "m.yaml:3: recipe file"),
        ("jobs:\n  - model: x\n    recipe:\n      stages: [{sharre: {groups: 2}}]\n", "m.yaml:4: unknown stage 'sharre'; known stages:"),
        ("jobs:\n  - model: x\n    recipe: {stages: [evaluate]}\n    nmae: y\n", "m.yaml:4: job: unknown key 'nmae'"),
        (f"models: [x]\nrecipes: [{QUICK}, {QUICK}]\n", "two jobs are called 'x-quick'"),
        ("jobs: []\n", "'jobs' must be a non-empty list"),
        ("models: [x]\n", "'models' and 'recipes' go together"),
    ]
    for text, message in cases:
        manifest = tmp_path / "m.yaml"
        manifest.write_text(text)
        result = batch(manifest, "-o", out, log_format="text")
        assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, (text, result.stderr)
    assert not out.exists()

    good = tmp_path / "good.yaml"
    good.write_text(f"jobs:\n  - {{model: {tiny_dirs['bert']}, recipe: {QUICK}, name: a}}\n"
                    f"  - {{model: {tiny_dirs['gpt2']}, recipe: {QUICK}, name: b}}\n")
    (tmp_path / "a-file").write_text("")
    assert "is a file, not a folder" in batch(good, "-o", tmp_path / "a-file" / "out", log_format="text").stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    busy = batch(good, "-o", tmp_path / "busy", log_format="text")
    assert busy.exit_code == 2 and "holds no batch of compress" in busy.stderr
    usage = batch(good, "-o", out, "--address", "auto", log_format="text")
    assert usage.exit_code == 2 and "--address is for --executor ray" in usage.stderr

    # the disk fills up while the first job runs: it fails, the batch stops, nothing looks done
    import compressor.io

    real = compressor.io.write_text_atomic

    def full_disk(path, text):
        if Path(path).name == "stage.json":
            raise OSError(28, "No space left on device")
        return real(path, text)

    monkeypatch.setattr(compressor.io, "write_text_atomic", full_disk)
    result = batch(good, "-o", out, log_format="text")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == (f"compress: error: cannot write to {out.resolve() / 'a'}: No space left on device; "
                                              "1 job(s) not run, run the batch again when there is room")
    assert [(j["status"]) for j in summary(out).values()] == ["failed", "pending"]
    assert not (out / "a" / "DONE.json").exists() and not (out / "b").exists()
    monkeypatch.setattr(compressor.io, "write_text_atomic", real)
    shutil.rmtree(out)
