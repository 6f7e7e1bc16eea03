"""Benchmark: batch throughput, one manifest of many small jobs on three executors.

The manifest crosses tiny seeded models of several families (tests/tiny_models) with short
recipes (share, a few fine-tuning steps, evaluate on the labelled sample): at least 24 jobs. It
runs as `compress batch` three times, each into a fresh folder, one after another in one run:

* ``local``: one job after another in the driver;
* ``local x N``: ``--jobs N`` processes;
* ``ray``: a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head with
  no CPUs and N worker nodes of one CPU each, as separate processes), ``--address`` pointing at it.

For each: wall time of the whole command (imports and connection included), the sum of the
jobs' own seconds, the speed-up over ``local``, and the scheduling overhead per job: the slot
time not spent in a job's stages, ``(wall x slots - sum of job seconds) / jobs`` (process
start, imports, Ray placement and the worker's start, writing the summary). Every executor's
metrics are checked equal to ``local``'s.

Run:  python benchmarks/bench_batch_throughput.py [--slots 2] [--repeat 1]
Writes reports/bench_batch_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

FAMILIES = ("bert", "gpt2", "llama", "deberta-v2", "mpnet", "qwen2")
SAMPLE = ROOT / "recipes" / "data" / "sample.csv"
RECIPES = {
    "share2": "  - share: {{groups: 2, lora_rank: 0, max_samples: 16}}\n",
    "share2-lora": "  - share: {{groups: 2, lora_rank: 4, max_samples: 16}}\n",
    "share2-tune": "  - share: {{groups: 2, lora_rank: 4, max_samples: 16}}\n"
                   "  - finetune: {{data: {data}, max_steps: 20, batch_size: 8, max_length: 32, save_every: 0}}\n",
    "prune-ffn-tune": "  - prune: {{ffn: 0.5, max_samples: 16}}\n"
                  "  - finetune: {{data: {data}, train: all, max_steps: 20, batch_size: 8, max_length: 32, save_every: 0}}\n",
}
EVALUATE = "  - evaluate: {{data: {data}, train_size: 80, test_size: 40, max_length: 32}}\n"


def write_manifest(root: Path) -> tuple[Path, int]:
    from tiny_models import save_model

    models = [str(save_model(f, root / "models" / f)) for f in FAMILIES]
    recipes = []
    for name, body in RECIPES.items():
        path = root / f"{name}.yaml"
        path.write_text(f"name: {name}\nstages:\n" + (body + EVALUATE).format(data=SAMPLE))
        recipes.append(str(path))
    manifest = root / "manifest.yaml"
    manifest.write_text(f"models: {json.dumps(models)}\nrecipes: {json.dumps(recipes)}\n")
    return manifest, len(models) * len(recipes)


def run(manifest: Path, out: Path, *extra: str) -> tuple[float, dict]:
    exe = Path(sys.executable).parent / "compress"
    start = time.perf_counter()
    proc = subprocess.run([str(exe), "--log-format", "jsonl", "batch", str(manifest), "-o", str(out), *extra],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        failed = [line for line in proc.stderr.splitlines() if '"job_fail"' in line or '"error"' in line]
        sys.exit(f"{' '.join(extra) or 'local'} failed ({proc.returncode}):\n" + "\n".join(failed or [proc.stderr[-3000:]]))
    return wall, json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=2, help="--jobs N, and the cluster's worker nodes (one CPU each)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    from compressor.pipeline.job import format_value

    rows, metrics = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, n_jobs = write_manifest(root)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for i in range(args.slots):
            cluster.add_node(num_cpus=1, resources={f"worker_{i}": 1})
        cluster.wait_for_nodes()
        try:
            runs = [("local", 1, ()), (f"local x {args.slots}", args.slots, ("--jobs", str(args.slots))),
                    (f"ray, {args.slots} worker nodes", args.slots, ("--executor", "ray", "--address", cluster.address))]
            for name, slots, extra in runs:
                print(f"{name} ...", file=sys.stderr, flush=True)
                wall, summary = run(manifest, root / name.replace(" ", "_").replace(",", ""), *extra)
                jobs = summary["jobs"]
                assert summary["counts"]["done"] == n_jobs, summary["counts"]
                work = sum(j["seconds"] for j in jobs)
                metrics[name] = {j["job"]: j["metrics"] for j in jobs}
                nodes = sorted({j["nodes"][0] for j in jobs if j.get("nodes")})
                rows.append({"executor": name, "slots": slots, "jobs": n_jobs, "wall_s": round(wall, 2),
                             "job_seconds": round(work, 2), "overhead_per_job_s": round((wall * slots - work) / n_jobs, 3),
                             "nodes": len(nodes) or 1})
        finally:
            cluster.shutdown()
    base = rows[0]["wall_s"]
    for r in rows:
        r["speedup_vs_local"] = round(base / r["wall_s"], 3)
    for name, found in metrics.items():  # every executor computes the same numbers
        for job, values in found.items():
            for key, value in values.items():
                ref = metrics["local"][job][key]
                same = abs(value - ref) <= 1e-4 * abs(ref) + 1e-6 if isinstance(value, float) else value == ref
                assert same, (name, job, key, value, ref)

    command = f"python benchmarks/bench_batch_throughput.py --slots {args.slots}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_batch_throughput.json").write_text(json.dumps(
        {"command": command, "cpus": os.cpu_count(), "families": FAMILIES, "recipes": list(RECIPES), "rows": rows},
        indent=2) + "\n")
    lines = ["# Batch throughput", "", f"`{command}` on {os.cpu_count()} CPUs: {n_jobs} jobs ({len(FAMILIES)} tiny families "
             f"x {len(RECIPES)} recipes: {', '.join(RECIPES)}; each ends in evaluate), each executor into a fresh folder, "
             "one after another in one run. Every executor's metrics equal the local run's.", "",
             "| executor | slots | nodes | wall s | sum of job s | speed-up vs local | overhead per job s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['executor']} | {r['slots']} | {r['nodes']} | {format_value(r['wall_s'])} | "
                     f"{format_value(r['job_seconds'])} | {r['speedup_vs_local']:.2f}x | {r['overhead_per_job_s']:.2f} |")
    lines += ["", "Overhead per job: (wall x slots - sum of job seconds) / jobs, the slot time spent outside the "
              "jobs' stages (driver start, imports in each new worker, placement, summaries)."]
    (out / "bench_batch_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
