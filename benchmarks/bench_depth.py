"""Benchmark: `compress analyze` and `compress share` on a 30-layer, 135M-parameter decoder, 2 cores.

Targets (issue 14): analyze under 40 s, share (10 groups, LoRA rank 16) under 30 s, each the
installed command as a user runs it (a new process: imports, loading and the adapter's
self-checks included). The model is SmolLM2-135M as an HF folder (`benchmarks/build_smollm2.py`
builds one from the package index with no hub access).

What makes depth affordable (see `compressor.analysis.weights`): pairs of layers at most 3
apart are aligned exactly over every FFN neuron; farther pairs align a fixed sample of 256
neurons (heads in full), an estimate the run checks against the exact solve on a few pairs.
LoRA deltas start from the leading singular vectors of the residual through the Gram matrix's
eigendecomposition, as exact as a full SVD for the leading ones.

Run:  python benchmarks/bench_depth.py /path/to/smollm2 --threads 2
Writes reports/bench_depth.json and reports/bench_depth.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = {"analyze": 40.0, "share": 30.0}


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def estimate_error(model_dir: str, threads: int) -> list[dict]:
    """Sampled against exact aligned cosine (mean over sublayers) on a few far pairs."""
    import torch
    import torch.nn.functional as F

    from compressor.adapters.alignment import find_permutation, permute_weights, unit_features
    from compressor.analysis.weights import neuron_sample, weight_similarity
    from compressor.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_dir)
    sim = weight_similarity(loaded.model, loaded.adapter)
    g = loaded.adapter.geometry(loaded.model.config)
    weights = [{r: loaded.adapter.weight(b, r, g).float() for r in loaded.adapter.roles} for b in loaded.adapter.blocks(loaded.model)]
    assert len(neuron_sample(g.intermediate_size)) == sim["alignment"]["sampled_neurons"]
    rows = []
    n = len(weights)
    for i, j in [(0, n // 4), (n // 4, n // 2), (n // 3, n - 1), (1, n - 2)]:
        perm = find_permutation(unit_features(weights[i], g), unit_features(weights[j], g))
        permuted, _ = permute_weights(weights[j], {}, perm, g)
        exact = sum(float(F.cosine_similarity(weights[i][r].reshape(-1), permuted[r].reshape(-1), dim=0))
                    for r in weights[i]) / len(weights[i])
        rows.append({"pair": [i, j], "exact": round(exact, 4), "sampled": round(sim["aligned_mean"][i][j], 4),
                     "raw": round(sim["raw_mean"][i][j], 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a SmolLM2-135M folder (benchmarks/build_smollm2.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each command (the fastest is reported)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    program = str(Path(sys.executable).parent / "compress")
    work = Path(tempfile.mkdtemp(prefix="bench_depth_"))
    commands = {
        "analyze": [program, "analyze", args.model, "-o", str(work / "analysis"), "--overwrite"],
        "share": [program, "share", args.model, "--groups", "10", "--lora-rank", "16", "-o", str(work / "shared"),
                  "--overwrite"],
    }
    try:
        seconds = {name: min(timed(cmd, env) for _ in range(args.repeats)) for name, cmd in commands.items()}
        analysis = json.loads((work / "analysis" / "analysis.json").read_text())["metrics"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": args.model, "threads": args.threads, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "targets_s": TARGETS, "met": {k: seconds[k] < TARGETS[k] for k in TARGETS},
        "analysis_seconds": analysis["seconds"], "alignment": analysis["weights"]["alignment"],
        "left_out": analysis["activations"]["left_out"], "estimate_vs_exact": estimate_error(args.model, args.threads),
        "command": "python benchmarks/bench_depth.py MODEL --threads 2",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_depth.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Analyze and share at depth: SmolLM2-135M (30 layers), 2 threads", "",
        f"Command: `{result['command']}` (the installed `compress`, a new process per run).", "",
        "| command | seconds | target | met |", "|---|---|---|---|",
        *[f"| `{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(commands[k][:2]))} MODEL "
          f"{' '.join(commands[k][3:-3])}` | {seconds[k]:.1f} | < {TARGETS[k]:.0f} | {'yes' if result['met'][k] else 'no'} |"
          for k in commands], "",
        f"Inside analyze: {analysis['seconds']}. Alignment: {result['alignment']}.", "",
        f"Left out of the activation measures: {result['left_out']}.", "",
        "Sampled (256 FFN neurons) against exact aligned weight cosine, mean over sublayers:", "",
        "| pair | exact | sampled | raw |", "|---|---|---|---|",
        *[f"| {r['pair'][0]}-{r['pair'][1]} | {r['exact']:.4f} | {r['sampled']:.4f} | {r['raw']:.4f} |"
          for r in result["estimate_vs_exact"]], "",
    ]
    (out / "bench_depth.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
