"""Benchmark: sharing the bundled all-MiniLM-L6-v2, 6 layers -> 3 groups.

For each plan (the analysis's recommendation and plain pairs), each init (aligned-mean, mean,
first) and each LoRA rank (0, 8, 32): unique parameters, size of model.safetensors on disk, the
share of residual energy the SVD LoRA keeps, and fidelity to the original on the built-in
calibration sentences (embedding cosine, per-layer hidden-state error). No recovery training.

Run:  python benchmarks/bench_share.py
Writes reports/bench_share.json and reports/bench_share.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="0,8,32")
    parser.add_argument("--inits", default="aligned-mean,mean,first")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import torch

    from compressor.analysis import AnalyzeConfig, analyze
    from compressor.analysis import plan_string
    from compressor.models import load_model
    from compressor.sharing import ShareConfig, save_checkpoint, share

    torch.manual_seed(0)
    dense = load_model(None)
    _, analysis = analyze(dense, AnalyzeConfig(groups=3, weights=False))
    plans = {"recommended": analysis.metrics["grouping"]["recommended"]["groups"], "pairs": [[0, 1], [2, 3], [4, 5]]}

    rows = []
    for plan_name, plan in plans.items():
        for init in args.inits.split(","):
            for rank in map(int, args.ranks.split(",")):
                start = time.perf_counter()
                loaded, record = share(copy.deepcopy(dense), ShareConfig(plan=plan, init=init, lora_rank=rank))
                with tempfile.TemporaryDirectory() as tmp:
                    folder = save_checkpoint(loaded, Path(tmp) / "ckpt")
                    disk = (folder / "model.safetensors").stat().st_size
                m = record.metrics
                rows.append({
                    "plan": plan_string(plan),
                    "plan_name": plan_name,
                    "init": init,
                    "lora_rank": rank,
                    "unique_params": record.params_after,
                    "unique_params_before": record.params_before,
                    "safetensors_bytes": disk,
                    "lora_energy_kept": m.get("lora_energy_kept_mean"),
                    "embedding_cosine": m["fidelity"]["embedding_cosine"],
                    "hidden_state_error": m["fidelity"]["hidden_state_error"],
                    "seconds": round(time.perf_counter() - start, 1),
                })
                print(json.dumps(rows[-1]))

    best = {}
    for r in rows:
        key = (r["plan_name"], r["lora_rank"])
        if key not in best or r["embedding_cosine"] > best[key]["embedding_cosine"]:
            best[key] = r
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/bench_share.py " + " ".join(sys.argv[1:])
    report = {"benchmark": "share all-MiniLM-L6-v2 6 -> 3 groups", "command": command, "commit": commit,
              "calibration": "built-in sentences (63)", "rows": rows,
              "best_init_by_plan_and_rank": {f"{k[0]} r={k[1]}": v["init"] for k, v in best.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_share.json").write_text(json.dumps(report, indent=2) + "\n")

    mib = 1024 * 1024
    lines = [
        "# Benchmark: sharing all-MiniLM-L6-v2, 6 layers -> 3 groups (no recovery training)",
        "",
        f"Command: `{command}` (commit {commit}). Fidelity on the 63 built-in calibration sentences.",
        f"Dense: {rows[0]['unique_params_before']:,} unique parameters "
        f"({rows[0]['unique_params_before'] * 4 / mib:.1f} MiB fp32).",
        "",
        "| plan | init | LoRA rank | unique params | model.safetensors | LoRA keeps of residual energy | embedding cosine | hidden-state error, last layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        energy = f"{r['lora_energy_kept']:.1%}" if r["lora_energy_kept"] is not None else "-"
        lines.append(
            f"| {r['plan']} | {r['init']} | {r['lora_rank']} | {r['unique_params']:,} | {r['safetensors_bytes'] / mib:.1f} MiB "
            f"| {energy} | {r['embedding_cosine']:.3f} | {r['hidden_state_error'][-1]:.3f} |"
        )
    lines += ["", "Best init (highest embedding cosine) per plan and rank: "
              + ", ".join(f"{k}: {v}" for k, v in report["best_init_by_plan_and_rank"].items()), ""]
    (out / "bench_share.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
