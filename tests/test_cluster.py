"""`compress batch` on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and
worker nodes as separate processes on this machine, each with its own CPUs and custom
resources), driven by `compress batch` in a process of its own as a user runs it.

Every test that starts the cluster is slow (`make test-all` runs them); the checks of a
manifest's resources and of a job's folder run by default."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_same_metrics

from compressor.pipeline import load_manifest
from compressor.pipeline.executors import RayOptions, describe_demand, fits

ray = pytest.importorskip("ray")

QUICK = Path(__file__).parent.parent / "recipes" / "quick.yaml"
DATA = QUICK.parent / "data" / "sample.csv"
COMPRESS = Path(sys.executable).parent / "compress"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs (it schedules, runs no job) and two worker nodes of one CPU each,
    node_a and node_b (custom resources naming them); the Ray client server on the head."""
    from ray.cluster_utils import Cluster

    port = free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "ray_client_server_port": port})
    c.client_port = port
    c.workers = {name: c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")}
    c.wait_for_nodes()
    yield c
    c.shutdown()


def start_batch(manifest: Path, out: Path, address: str, *extra: str, env: dict | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """`compress batch` on the cluster, in a process of its own (JSON-lines events on stderr)."""
    command = [str(COMPRESS), "--log-format", "jsonl", "batch", str(manifest), "-o", str(out), "--executor", "ray",
               "--address", address, *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def run_batch(manifest: Path, out: Path, address: str, *extra: str, env: dict | None = None, timeout: float = 300,
              cwd: Path | None = None):
    proc = start_batch(manifest, out, address, *extra, env=env, cwd=cwd)
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def summary(out: Path) -> dict[str, dict]:
    return {j["job"]: j for j in json.loads((out / "summary.json").read_text())["jobs"]}


def error_lines(stderr: str) -> list[str]:
    return [e["message"] for e in map(json.loads, filter(None, stderr.splitlines())) if e["event"] == "error"]


@pytest.mark.slow  # starts a multi-node Ray cluster
def test_jobs_spread_over_nodes_wait_for_their_resources_and_bad_clusters_stop_first(cluster, tiny_dirs, tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"models: [{tiny_dirs['bert']}, {tiny_dirs['gpt2']}]\nrecipes: [{QUICK}]\n")
    out = tmp_path / "out"
    # through the Ray client, as a driver off the cluster connects
    rc, _, stderr = run_batch(manifest, out, f"ray://127.0.0.1:{cluster.client_port}")
    assert rc == 0, stderr[-3000:]
    jobs = summary(out)
    assert [j["status"] for j in jobs.values()] == ["done", "done"]
    assert all(j["attempts"] == 1 and len(j["nodes"]) == 1 for j in jobs.values())
    ids = {n.node_id[:8] for n in cluster.workers.values()}
    ran_on = {j["nodes"][0].split("/")[1] for j in jobs.values()}
    assert ran_on == ids  # one job on each worker node, none on the CPU-less head
    table = (out / "summary.md").read_text()
    assert "| node |" in table and all(j["nodes"][0] in table for j in jobs.values())
    assert not list(out.rglob(".compress-probe-*"))  # every node checked the folder, and left nothing

    # a job that asks for what no node has: exit 2 before anything is written ...
    picky = tmp_path / "picky.yaml"
    picky.write_text(f"jobs:\n  - {{model: {tiny_dirs['bert']}, recipe: {QUICK}, name: a}}\n"
                     f"  - {{model: {tiny_dirs['bert']}, recipe: {QUICK}, name: tpu, resources: {{custom: {{tpu_v9: 1}}}}}}\n")
    rc, _, stderr = run_batch(picky, tmp_path / "picky", cluster.address)
    [message] = error_lines(stderr)
    assert rc == 2 and message.startswith("no node of the Ray cluster has what job tpu asks for (CPU 1, tpu_v9 1)")
    assert "--placement-timeout" in message and "node_a 1" in message
    assert not (tmp_path / "picky").exists()
    # ... unless the batch is told to wait for such a node: then that job alone fails, after the timeout
    # (`--address auto` finds the cluster RAY_ADDRESS names, as on a node `ray start` set up; `-o` relative
    # to the driver's folder, which the nodes' probe must read as the same absolute folder)
    rc, _, stderr = run_batch(picky, Path("picky"), "auto", "--placement-timeout", "3",
                              env={"RAY_ADDRESS": cluster.address}, cwd=tmp_path)
    jobs = summary(tmp_path / "picky")
    assert rc == 1 and jobs["a"]["status"] == "done" and jobs["tpu"]["status"] == "failed", stderr[-3000:]
    assert jobs["tpu"]["error"].startswith("no node of the Ray cluster can run it: it asks for CPU 1, tpu_v9 1")
    assert "3 s (--placement-timeout)" in jobs["tpu"]["error"]
    times = {e["event"] + e.get("job", ""): e["time"] for e in map(json.loads, filter(None, stderr.splitlines()))}
    assert times["job_failtpu"] - times["batch_start"] >= 3
    assert not (tmp_path / "picky" / "tpu" / "DONE.json").exists()


@pytest.mark.slow  # starts a multi-node Ray cluster
def test_a_node_that_does_not_see_the_batch_folder_is_named(cluster, tmp_path):
    """The check every node runs before a batch: the driver's marker file must be in the folder
    the node sees at that path (here, a token the driver never wrote: the folder of another machine)."""
    from compressor.pipeline.executors import probe_folder

    ray.init(address=cluster.address, log_to_driver=False)
    try:
        probe = ray.remote(probe_folder)
        node = cluster.workers["node_a"].node_id
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        on_a = probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        (tmp_path / ".compress-probe-abc").write_text("abc")
        assert ray.get(on_a.remote(str(tmp_path), "abc")) is None
        problem = ray.get(on_a.remote(str(tmp_path), "another-machines-token"))
        assert problem == (f"node {problem.split()[1]} does not see the batch folder {tmp_path} the driver writes "
                           "(no marker file there)") and node[:8] in problem
        assert sorted(p.name for p in tmp_path.iterdir()) == [".compress-probe-abc"]  # the probe's own file is gone
    finally:
        ray.shutdown()


def test_resources_in_a_manifest(tmp_path):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"resources: {{custom: {{big_ram: 1}}}}\njobs:\n  - {{model: bundled, recipe: {QUICK}, name: a}}\n"
                        f"  - {{model: bundled, recipe: {QUICK}, name: b, resources: {{num_cpus: 2, custom: {{fast: 0.5}}}}}}\n")
    a, b = load_manifest(manifest, tmp_path / "out")
    assert a.resources == {"num_cpus": 1, "num_gpus": 0, "custom": {"big_ram": 1}}
    assert b.resources == {"num_cpus": 2, "num_gpus": 0, "custom": {"big_ram": 1, "fast": 0.5}}
    assert describe_demand(b.resources) == "CPU 2, big_ram 1, fast 0.5"
    node = {"Resources": {"CPU": 2.0, "big_ram": 1.0, "fast": 1.0, "memory": 1e9}}
    assert fits(b.resources, node) and not fits(b.resources, {"Resources": {"CPU": 2.0, "big_ram": 1.0}})
    from compressor.errors import ConfigError

    for bad, message in (("{custom: {CPU: 1}}", "custom resource 'CPU' is one of Ray's own"),
                         ("{custom: {fast: 0}}", "custom resource 'fast' must be a number above 0"),
                         ("{num_cpus: 0.00001}", "num_cpus must be a number above 0 in steps of 0.0001"),
                         ("{custom: {object_store_memory: 1}}", "is one of Ray's own"),
                         ("{custom: [fast]}", "custom resources must be a mapping")):
        manifest.write_text(f"resources: {bad}\njobs:\n  - {{model: bundled, recipe: {QUICK}}}\n")
        with pytest.raises(ConfigError, match=message):
            load_manifest(manifest, tmp_path / "out")
    with pytest.raises(ConfigError, match="--retries must be at least 0"):
        RayOptions(retries=-1)
    with pytest.raises(ConfigError, match="--placement-timeout must be a positive number"):
        RayOptions(placement_timeout=0)
    with pytest.raises(ConfigError, match="--placement-timeout must be a finite number"):
        RayOptions(placement_timeout=float("nan"))


def test_a_job_done_where_the_driver_cannot_see_it_is_not_done(tmp_path):
    """A result that says done while the driver sees no DONE.json in the job's folder (a node that
    joined after the storage check wrote it to a disk of its own) is failed, not trusted."""
    from compressor.pipeline.batch import check_output
    from compressor.pipeline.events import EventLog
    from compressor.pipeline.executors import confirm_done
    from compressor.pipeline.job import Job, JobResult

    job = Job(name="j", model="m", recipe="r", stages=[], folder=tmp_path / "j")
    done = JobResult.for_job(job, "done", seconds=2.0, nodes=["10.0.0.7/abcd1234"])
    result = confirm_done(done, job, EventLog(keep=True))
    assert result.status == "failed" and result.error.startswith("node 10.0.0.7/abcd1234 finished the job, but its folder")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "DONE.json").write_text("{}")
    assert confirm_done(done, job, EventLog(keep=True)).status == "done"
    # a driver killed during the storage check leaves only its marker: the folder is still a new batch's
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / ".compress-probe-0123").write_text("x")
    check_output(tmp_path / "new")


LONG = ("stages:\n  - share: {{plan: \"0-1,2-3\", lora_rank: 4, fidelity: false}}\n"
        "  - finetune: {{data: {data}, max_steps: {steps}, save_every: 10, batch_size: 8, max_length: 32}}\n"
        "  - evaluate: {{data: {data}, train_size: 80, test_size: 40, max_length: 32}}\n")


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear in {seconds} s"
        time.sleep(0.05)


@pytest.mark.slow  # fine-tunes twice, kills a node: ~1 minute
def test_a_node_lost_mid_finetune_retries_on_another_and_resumes_from_its_checkpoint(cluster, tiny_dirs, tmp_path):
    (tmp_path / "long.yaml").write_text(LONG.format(data=DATA, steps=300))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"jobs:\n  - {{model: {tiny_dirs['bert']}, recipe: long.yaml, name: long}}\n"
                        f"  - {{model: {tiny_dirs['gpt2']}, recipe: {QUICK}, name: other}}\n")
    # the same job, never interrupted, on this machine: the numbers a retry must reproduce
    straight = subprocess.run([str(COMPRESS), "batch", str(manifest), "-o", str(tmp_path / "straight"), "--json", "-"],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "out"
    proc = start_batch(manifest, out, cluster.address)
    try:
        wait_for(out / "long" / "02-finetune" / "trainer_state.pt", proc)
        first = json.loads((out / "long" / "job.json").read_text())["nodes"][0]
        victim = next(name for name, n in cluster.workers.items() if first.endswith(n.node_id[:8]))
        cluster.remove_node(cluster.workers.pop(victim), allow_graceful=False)  # the node and its processes die
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        cluster.workers[victim] = cluster.add_node(num_cpus=1, resources={victim: 1})  # the fixture's two nodes again
    assert proc.returncode == 0, stderr[-3000:]
    jobs, expected = summary(out), summary(tmp_path / "straight")
    assert jobs["long"]["status"] == "done" and jobs["long"]["attempts"] == 2
    assert jobs["long"]["nodes"][0] == first and jobs["long"]["nodes"][1] != first
    assert jobs["other"]["status"] == "done" and jobs["other"]["attempts"] == 1
    finetuned = json.loads((out / "long" / "02-finetune" / "stage.json").read_text())["record"]["metrics"]
    assert finetuned["steps"] == 300 and 0 < finetuned["steps_this_run"] < 300  # resumed, not from zero
    for name in ("long", "other"):  # as if nothing had happened
        assert_same_metrics(expected[name]["metrics"], jobs[name]["metrics"])
    assert "(2 attempts)" in (out / "summary.md").read_text()


@pytest.mark.slow  # SIGKILLs a driver mid-batch and reruns it: ~1 minute
def test_a_killed_driver_rerun_completes_only_what_was_missing(cluster, tiny_dirs, tmp_path):
    (tmp_path / "long.yaml").write_text(LONG.format(data=DATA, steps=200))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"jobs:\n  - {{model: {tiny_dirs['gpt2']}, recipe: {QUICK}, name: quick}}\n"
                        f"  - {{model: {tiny_dirs['bert']}, recipe: long.yaml, name: long}}\n")
    out = tmp_path / "out"
    proc = start_batch(manifest, out, cluster.address)
    try:
        wait_for(out / "quick" / "DONE.json", proc)
        wait_for(out / "long" / "02-finetune" / "trainer_state.pt", proc)
        proc.send_signal(signal.SIGKILL)  # the driver dies; Ray ends the tasks it owned
        proc.wait()
    finally:
        proc.kill()
    assert not (out / "long" / "DONE.json").exists()
    rc, _, stderr = run_batch(manifest, out, cluster.address)
    assert rc == 0, stderr[-3000:]
    events = [json.loads(line) for line in stderr.splitlines() if line]
    assert [e["job"] for e in events if e["event"] == "job_skip"] == ["quick"]
    assert [e["stage"] for e in events if e["event"] == "stage_skip"] == ["01-share"]
    jobs = summary(out)
    assert jobs["quick"]["status"] == "skipped" and jobs["long"]["status"] == "done"
    finetuned = json.loads((out / "long" / "02-finetune" / "stage.json").read_text())["record"]["metrics"]
    assert finetuned["steps"] == 200 and 0 < finetuned["steps_this_run"] < 200


@pytest.mark.slow  # kills the only node a job fits: ~30 s
def test_a_job_whose_only_node_died_fails_after_the_placement_timeout(cluster, tiny_dirs, tmp_path):
    (tmp_path / "long.yaml").write_text(LONG.format(data=DATA, steps=300))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"jobs:\n  - {{model: {tiny_dirs['bert']}, recipe: long.yaml, name: pinned, "
                        "resources: {custom: {node_b: 1}}}\n")
    out = tmp_path / "out"
    proc = start_batch(manifest, out, cluster.address, "--placement-timeout", "4")
    try:
        wait_for(out / "pinned" / "02-finetune" / "trainer_state.pt", proc)
        cluster.remove_node(cluster.workers.pop("node_b"), allow_graceful=False)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        cluster.workers["node_b"] = cluster.add_node(num_cpus=1, resources={"node_b": 1})
    [job] = summary(out).values()
    assert proc.returncode == 1 and job["status"] == "failed", stderr[-3000:]
    assert job["error"].startswith("no node of the Ray cluster can run it: it asks for CPU 1, node_b 1")
    assert not (out / "pinned" / "DONE.json").exists() and not (out / "pinned" / "03-evaluate").exists()
