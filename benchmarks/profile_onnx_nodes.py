"""Profile: where an ONNX export's time goes at one batch size, by operator, from onnxruntime's own profiler.

Each folder's ``model.onnx`` in one onnxruntime CPU session (fixed threads), fed the built-in
calibration sentences padded to ``--seq-len``, run ``--runs`` times with profiling on; prints
and writes the kernel time per run summed by operator type, the node count per run, and the
kernel time's total. Kernel time leaves out what onnxruntime spends between nodes, which grows
with the node count.

Run:  python benchmarks/profile_onnx_nodes.py NAME=FOLDER ... --batch 1 --runs 40 --threads 2
Writes reports/profile_onnx_nodes.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="NAME=FOLDER (or FOLDER)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from compressor.data import calibration_texts

    rows = dict(f.split("=", 1) if "=" in f else (Path(f).name, f) for f in args.folders)
    texts = (calibration_texts(None) * (1 + args.batch))[: args.batch]
    result = {"command": "python benchmarks/profile_onnx_nodes.py " + " ".join(sys.argv[1:]), "batch": args.batch,
              "seq_len": args.seq_len, "runs": args.runs, "threads": args.threads, "rows": {}}
    lines = ["# Where the time goes, by operator", "", f"`{result['command']}`: kernel time per run (onnxruntime's "
             f"profiler), batch {args.batch}, sequence {args.seq_len}, {args.threads} threads, {args.runs} runs.", ""]
    with tempfile.TemporaryDirectory() as work:
        for name, folder in rows.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.enable_profiling, options.profile_file_prefix = True, str(Path(work) / "profile")
            session = ort.InferenceSession(str(Path(folder) / "model.onnx"), options, providers=["CPUExecutionProvider"])
            enc = AutoTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=args.seq_len,
                                                        truncation=True, return_tensors="np")
            feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
            for _ in range(args.runs):
                session.run(None, feed)
            events = json.loads(Path(session.end_profiling()).read_text())
            time_by, count = collections.Counter(), collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    time_by[e["args"]["op_name"]] += e["dur"] / 1000 / args.runs
                    count[e["args"]["op_name"]] += 1
            row = {"kernel_ms": sum(time_by.values()), "nodes": sum(count.values()) // args.runs,
                   "by_operator": {op: {"ms": ms, "nodes": count[op] // args.runs} for op, ms in time_by.most_common()}}
            result["rows"][name] = row
            lines += [f"**{name}** ({folder}): kernel time {row['kernel_ms']:.1f} ms a run, {row['nodes']} nodes", "",
                      "| operator | ms a run | nodes |", "|---|---|---|"]
            lines += [f"| {op} | {v['ms']:.2f} | {v['nodes']} |" for op, v in list(row["by_operator"].items())[: args.top]]
            lines.append("")
    out = Path(args.out)
    (out / "profile_onnx_nodes.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "profile_onnx_nodes.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
