"""Benchmark: `compress finetune` on 1 process against 2 (DDP and FSDP2) on CPUs (gloo), with
what each rank holds (issue 35).

A Llama-shaped decoder (``small``: 8 layers, hidden 1024, FFN 4096, vocabulary 32,000; 168 M
parameters) is built from its config with seeded random bf16 weights (no download; see
bench_scale.py), its last 2 blocks dropped to make the student, and the student distilled from
it for ``--steps`` steps of the same global batch with every weight training in float32
(``--train all --precision float32``: parameters, gradients and AdamW state all sharded under
FSDP2). Each row reads the finetune record: this rank's parameters and its gradients + AdamW
moments (rank 0's; every rank holds the same share), the peak resident set of rank 0 (which
includes reading the models whole before sharding them), the wall time of the command and the
seconds a step. The losses of the three runs are compared step by step.

Run:  python benchmarks/bench_distributed.py --work /tmp/dist [--steps 10]
Writes reports/bench_distributed.json and .md.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import SHAPES, build  # noqa: E402

SHAPES["small"] = dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                       num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=2048)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    work = Path(args.work)
    model = build("small", work / "model-small", None)
    compress = str(Path(sys.executable).parent / "compress")
    student = work / "student"
    if not student.is_dir():
        subprocess.run([compress, "prune", str(model), "--drop-layers", "2", "-o", str(student)], check=True)
    data = work / "texts.txt"
    if not data.is_file():
        from compressor.data.datasets import load_texts_from

        data.write_text("\n".join(t.replace("\n", " ") for t in load_texts_from("movie-snippets")[:2000]))
    common = ["finetune", str(student), "--teacher", str(model), "--data", str(data), "--max-steps", str(args.steps),
              "--batch-size", "8", "--max-length", "64", "--save-every", "0", "--train", "all", "--precision",
              "float32", "--quiet", "--overwrite"]
    runs = {
        "1 process": ([compress], [], "2"),
        "2 processes, DDP": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              compress], ["--strategy", "ddp"], "1"),
        "2 processes, FSDP2": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                compress], ["--strategy", "fsdp"], "1"),
    }
    rows = []
    for name, (launcher, extra, threads) in runs.items():
        out = work / name.replace(" ", "_").replace(",", "")
        command = [*launcher, *common, *extra, "-o", str(out)]
        print("$ " + " ".join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": threads})
        seconds = time.perf_counter() - start
        metrics = json.loads((out / "finetune_report.json").read_text())["metrics"]
        rows.append({"run": name, "command": " ".join(command), "threads_per_process": int(threads),
                     "seconds": round(seconds, 1), "seconds_per_step": round(metrics["seconds_per_step"], 2),
                     "distributed": metrics["distributed"], "memory": metrics["memory"],
                     "losses": [h["loss"] for h in metrics["history"]]})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for r in rows:
        r["rank_state_x_one_process"] = round(
            (r["memory"]["rank_parameters_mib"] + r["memory"]["rank_gradients_and_optimizer_mib"])
            / (base["memory"]["rank_parameters_mib"] + base["memory"]["rank_gradients_and_optimizer_mib"]), 3)
        r["largest_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"]))
    result = {"model": SHAPES["small"], "student": "the model with its last 2 of 8 blocks dropped",
              "steps": args.steps, "global_batch": 8, "cpus": os.cpu_count(), "python": platform.python_version(),
              "command": " ".join(["python", "benchmarks/bench_distributed.py", *sys.argv[1:]]), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `compress finetune` on 1 and 2 processes (CPUs, gloo)", "",
             f"Command: `{result['command']}`; {result['cpus']} CPUs (2 threads for one process, 1 each for two). "
             f"A {SHAPES['small']['num_hidden_layers']}-layer Llama (hidden 1024, 168 M parameters, seeded bf16 "
             f"weights) with 2 blocks dropped, distilled from the original for {args.steps} steps of a global batch "
             "of 8 texts x 64 tokens, every weight training (`--train all --precision float32`). Per rank: rank "
             "0's record (every rank holds the same share).", "",
             "| run | wall s | s / step | rank parameters MiB | rank gradients + AdamW MiB | x one process | "
             "rank 0 peak RSS MiB | largest relative loss difference |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        lines.append(f"| {r['run']} | {r['seconds']:.0f} | {r['seconds_per_step']:.2f} | {m['rank_parameters_mib']:,.0f} | "
                     f"{m['rank_gradients_and_optimizer_mib']:,.0f} | {r['rank_state_x_one_process']:.2f} | "
                     f"{m['peak_rss_mib']:,.0f} | {r['largest_loss_difference']:.1e} |")
    lines += ["", "The peak resident set includes reading the student and the teacher whole in every process "
              "before they are wrapped; the sharded state is what FSDP2 keeps per rank while training."]
    (out / "bench_distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
