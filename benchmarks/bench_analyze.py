"""Benchmark: weight analysis of a BERT-base-size model on the CPU.

Target (issue 2): the weight analysis (raw and permutation-aligned cosine for every pair of
the 12 layers and every sublayer) of a BERT-base-size model (12 layers, hidden 768, FFN 3072)
finishes in under 60 s on 2 CPU cores, with peak memory under 3x the fp32 model size.

Weights come from the config (random init): the timing and memory do not depend on the
values. Memory is the process's peak resident set (VmHWM) minus its resident set after the
imports, before the model is built, so it counts the model itself plus the analysis.

Run:  python benchmarks/bench_analyze.py --threads 2
Writes reports/bench_analyze.json and reports/bench_analyze.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads and solver threads")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "reports"), help="folder for the results")
    args = parser.parse_args()

    import torch
    import transformers

    from compressor.adapters import get_adapter
    from compressor.analysis.weights import weight_similarity
    from compressor.models import unique_parameters

    torch.set_num_threads(args.threads)
    baseline_kib = _status_kib("VmRSS")

    torch.manual_seed(0)
    config = transformers.BertConfig(
        num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn, num_attention_heads=args.heads
    )
    model = transformers.BertModel(config).eval()
    params, model_bytes = unique_parameters(model)

    start = time.perf_counter()
    result = weight_similarity(model, get_adapter(model), workers=args.threads)
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")

    used_bytes = (peak_kib - baseline_kib) * 1024
    n = args.layers
    aligned_adjacent = [result["aligned_mean"][i][i + 1] for i in range(n - 1)]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    report = {
        "benchmark": "weight analysis (raw + aligned cosine, all layer pairs, all sublayers)",
        "command": "python benchmarks/bench_analyze.py " + " ".join(sys.argv[1:]),
        "model": {"layers": n, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads, "params": params,
                  "fp32_bytes": model_bytes},
        "threads": args.threads,
        "layer_pairs": n * (n - 1) // 2,
        "seconds": round(seconds, 2),
        "peak_bytes_over_baseline": used_bytes,
        "peak_over_model_size": round(used_bytes / model_bytes, 2),
        "targets": {"seconds": 60, "peak_over_model_size": 3.0},
        "passed": seconds < 60 and used_bytes < 3 * model_bytes,
        "aligned_mean_adjacent": [round(v, 4) for v in aligned_adjacent],
        "provenance": {
            "commit": commit,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_analyze.json").write_text(json.dumps(report, indent=2) + "\n")
    mib = 1024 * 1024
    (out / "bench_analyze.md").write_text(
        "# Benchmark: weight analysis of a BERT-base-size model\n\n"
        f"Command: `{report['command']}` (commit {commit}, {args.threads} threads, {os.cpu_count()} CPUs)\n\n"
        "| model | layer pairs | seconds | peak memory over baseline | x fp32 model size | target | passed |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {n} layers, hidden {args.hidden}, FFN {args.ffn} ({params / 1e6:.1f}M params, {model_bytes / mib:.0f} MiB fp32) "
        f"| {report['layer_pairs']} | {seconds:.1f} | {used_bytes / mib:.0f} MiB | {report['peak_over_model_size']} "
        f"| < 60 s, < 3x | {'yes' if report['passed'] else 'NO'} |\n"
    )
    print(json.dumps(report, indent=2))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
