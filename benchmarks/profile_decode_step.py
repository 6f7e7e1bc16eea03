"""Profile: where one cached decode step of a with-past decoder export spends its time.

Runs onnxruntime's profiler over ``--steps`` decode steps (batch 1, one new token after a
``--past``-token cache of random numbers: the kernels' cost does not depend on the values) of
each export folder given, and sums the kernel time by operator type.

Run:  python benchmarks/profile_decode_step.py EXPORT [EXPORT ...] [--past 128] [--threads 2]
Writes reports/profile_decode_step.md and .json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def profile(folder: Path, past: int, steps: int, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    feed = {"input_ids": np.array([[42]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64)}
    if "position_ids" in inputs:
        feed["position_ids"] = np.array([[past]], np.int64)
    rng = np.random.default_rng(0)
    for name, spec in inputs.items():
        if name.startswith("past_key_values."):
            heads, head_dim = spec.shape[1], spec.shape[3]
            feed[name] = rng.standard_normal((1, heads, past, head_dim), dtype=np.float32)
    for _ in range(3):
        session.run(None, feed)
    start = time.perf_counter()
    for _ in range(steps):
        session.run(None, feed)
    step_ms = (time.perf_counter() - start) / steps * 1e3
    events = json.loads(Path(session.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    nodes = collections.Counter(n.op_type for n in __import__("onnx").load(str(folder / "model.onnx"),
                                                                          load_external_data=False).graph.node)
    return {"folder": str(folder), "step_ms": round(step_ms, 2), "nodes": sum(nodes.values()),
            "share": {op: round(d / total, 4) for op, d in by_op.most_common()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--past", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    rows = [profile(Path(f), args.past, args.steps, args.threads) for f in args.exports]
    command = f"python benchmarks/profile_decode_step.py {' '.join(args.exports)} --past {args.past} --threads {args.threads}"
    out = Path(args.out)
    (out / "profile_decode_step.json").write_text(json.dumps({"command": command, "cpus": os.cpu_count(), "rows": rows},
                                                             indent=2) + "\n")
    lines = ["# One cached decode step, by operator", "", f"`{command}`: {args.steps} steps of one token after a "
             f"{args.past}-token cache, batch 1, onnxruntime's profiler; share of the summed kernel time.", ""]
    for r in rows:
        lines += [f"## {r['folder']}", "", f"{r['step_ms']} ms per step (the session alone), {r['nodes']} nodes.", "",
                  "| operator | share of kernel time |", "|---|---:|"]
        lines += [f"| {op} | {share * 100:.1f}% |" for op, share in list(r["share"].items())[:12]]
        lines.append("")
    (out / "profile_decode_step.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
