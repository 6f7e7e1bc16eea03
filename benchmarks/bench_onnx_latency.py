"""Benchmark: latency of ONNX export folders side by side, sessions taking turns, as ratios to the first.

A quick check between full `compress report` runs (which add the suite, fidelity and the
baselines): each folder's ``model.onnx`` in one onnxruntime session (fixed threads), fed the
built-in calibration sentences padded to ``--seq-len``, at each batch size; after warm-up
rounds, every round runs each session once in turn, so a busy machine slows them alike. Prints
the median per folder and its speed against the first folder (the baseline, say optimum's O2 int8
from a report's ``baselines/optimum-o2-int8``).

Run:  python benchmarks/bench_onnx_latency.py BASELINE NAME=FOLDER ... --rounds 9 --threads 2
Writes reports/bench_onnx_latency.json (with ``--out``'s folder) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="NAME=FOLDER (or FOLDER); the first is the baseline")
    parser.add_argument("--batch-sizes", default="32,1")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from compressor.data import calibration_texts

    rows = dict(f.split("=", 1) if "=" in f else (Path(f).name, f) for f in args.folders)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    texts = (calibration_texts(None) * (1 + max(sizes)))[: max(sizes)]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    sessions, feeds = {}, {}
    for name, folder in rows.items():
        enc = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=args.seq_len,
                                                    truncation=True, return_tensors="np")
        sessions[name] = ort.InferenceSession(str(Path(folder) / "model.onnx"), options,
                                              providers=["CPUExecutionProvider"])
        feeds[name] = {i.name: enc[i.name].astype(np.int64) for i in sessions[name].get_inputs()}
    result = {"command": "python benchmarks/bench_onnx_latency.py " + " ".join(sys.argv[1:]),
              "folders": rows, "threads": args.threads, "seq_len": args.seq_len, "rounds": args.rounds, "batches": {}}
    baseline = next(iter(rows))
    for batch in sizes:
        times = {name: [] for name in rows}
        for r in range(args.warmup + args.rounds):
            for name, session in sessions.items():
                feed = {k: v[:batch] for k, v in feeds[name].items()}
                start = time.perf_counter()
                session.run(None, feed)
                if r >= args.warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
        medians = {name: statistics.median(t) for name, t in times.items()}
        # the spread, as the report shows it: p90 (and p10) of the timed rounds
        spread = {name: statistics.quantiles(t, n=10) if len(t) > 1 else [t[0]] * 9 for name, t in times.items()}
        result["batches"][batch] = {name: {"median_ms": m, "p10_ms": spread[name][0], "p90_ms": spread[name][-1],
                                           "speed_vs_first": medians[baseline] / m}
                                    for name, m in medians.items()}
        for name, m in medians.items():
            print(f"batch {batch:3d}  {name:30s} {m:8.1f} ms (p10 {spread[name][0]:.1f}, p90 {spread[name][-1]:.1f})  "
                  f"{medians[baseline] / m:.2f}x {baseline}", flush=True)
    Path(args.out, "bench_onnx_latency.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
