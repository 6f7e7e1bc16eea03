"""Benchmark: `compress inspect` with every self-check on a BERT-base-size model, 2 CPU cores.

Target (issue 12): under 5 s for the adapter's self-checks (mapping in a forward pass of every
block, permutation of FFN neurons and heads in three blocks, pruning one head and one neuron in
a two-layer copy) on a BERT-base-size model (12 layers, hidden 768, FFN 3072, 109.5M params).

Weights come from the config (random init, vectors perturbed as in a trained model): the
timing does not depend on the values. Measured twice in one run: in-process (the self-checks
alone, then loading plus checks) and the installed command as a user runs it (a new process:
Python start, imports, reading 418 MiB of safetensors, checks, printing).

Run:  python benchmarks/bench_inspect.py --threads 2
Writes reports/bench_inspect.json and reports/bench_inspect.md.
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
TARGET_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (the median is reported)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import torch
    import transformers

    from compressor.adapters.checks import prove
    from compressor.adapters.describe import describe
    from compressor.models import bundled_model_dir, load_model, unique_parameters
    from compressor.pruning.checks import prove_pruning, prove_units

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    params, _ = unique_parameters(model)
    folder = Path(tempfile.mkdtemp(prefix="bench-inspect-")) / "bert-base-size"
    try:
        model.save_pretrained(folder)
        transformers.AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained(folder)

        def median(values):
            return sorted(values)[len(values) // 2]

        checks_s, load_s, command_s, imports_s = [], [], [], []
        for _ in range(args.repeats):
            loaded = load_model(folder)
            start = time.perf_counter()
            adapter, checks = prove(loaded.model, loaded.adapter)  # mapping + permutations (what load runs)
            prove_units(loaded.model, adapter, checks=checks)  # + pruning (what inspect adds)
            checks_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = load_model(folder)
            description = describe(loaded, prove_pruning(loaded))
            load_s.append(time.perf_counter() - start)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            start = time.perf_counter()
            done = subprocess.run([str(Path(sys.executable).parent / "compress"), "inspect", str(folder), "--json", "-"],
                                  capture_output=True, text=True, env=env)
            command_s.append(time.perf_counter() - start)
            if done.returncode != 0:
                raise SystemExit(f"compress inspect failed: {done.stderr.strip()}")
            start = time.perf_counter()  # what any command pays before its first line runs
            subprocess.run([sys.executable, "-c", "import torch, transformers; transformers.BertModel"], check=True, env=env)
            imports_s.append(time.perf_counter() - start)
        statuses = {c["name"]: c["status"] for c in description["checks"]}
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)

    result = {
        "model": "BertConfig() random init (12 layers, hidden 768, FFN 3072, 12 heads)",
        "params": params,
        "threads": args.threads,
        "repeats": args.repeats,
        "self_checks_s": round(median(checks_s), 3),
        "load_and_checks_s": round(median(load_s), 3),
        "command_s": round(median(command_s), 3),
        "imports_s": round(median(imports_s), 3),
        "runs": {"self_checks_s": checks_s, "load_and_checks_s": load_s, "command_s": command_s, "imports_s": imports_s},
        "checks": statuses,
        "target_s": TARGET_S,
        "met_self_checks": median(checks_s) < TARGET_S,
        "met_command": median(command_s) < TARGET_S,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python benchmarks/bench_inspect.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_inspect.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# `compress inspect` with its self-checks, BERT-base-size model",
        "",
        f"Command: `{result['command']}` ({args.threads} threads, median of {args.repeats} runs).",
        "",
        "| what | seconds | target |",
        "|---|---|---|",
        f"| self-checks alone (mapping, value rows, permutations, pruning) | {result['self_checks_s']:.2f} | < {TARGET_S:g} |",
        f"| load (418 MiB safetensors) + self-checks + describe, in process | {result['load_and_checks_s']:.2f} | |",
        f"| `compress inspect MODEL --json -`, a new process | {result['command_s']:.2f} | < {TARGET_S:g} |",
        f"| of which importing torch and transformers' BertModel (`python -c ...`) | {result['imports_s']:.2f} | |",
        "",
        f"{params / 1e6:.1f}M parameters. Checks: " + ", ".join(f"{k} {v}" for k, v in statuses.items()) + ".",
        f"Self-checks under {TARGET_S:g} s: {'yes' if result['met_self_checks'] else 'no'}. Whole command under "
        f"{TARGET_S:g} s: {'yes' if result['met_command'] else 'no'}"
        + ("" if result["met_command"] else " (the imports alone, which every command pays before its first line, "
           "take most of it; transformers' model classes import scikit-learn and torch._dynamo)") + ".",
        "",
    ]
    (out / "bench_inspect.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
