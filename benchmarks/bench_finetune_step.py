"""Benchmark: the cost of a distillation step with and without ``--group-by-length``, in one process.

The student is a checkpoint (say the demo's ``OUT/02-prune``: 2 of 12 heads and half the FFN
pruned, the vocabulary cut), distilled from the bundled all-MiniLM-L6-v2 as the demo recipes
distil it, in batches of 32 (demo-full.yaml's; four data sets of mixed lengths: SMS and TREC questions are short, BBC News articles
fill every token); each variant runs ``--steps`` steps from the same start, the variants taking
turns ``--rounds`` times (a busy machine slows them alike), no checkpoint saved between steps. Reports
seconds per step (the median over rounds), the padded share of the tokens computed, and the ratio.

Run:  python benchmarks/bench_finetune_step.py OUT/02-prune --steps 40 --rounds 2
Writes reports/bench_finetune_step.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = "movie-snippets,sms-spam,trec,bbc-news"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("student", help="a checkpoint folder (the demo's OUT/02-prune)")
    parser.add_argument("--teacher", default="bundled")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import torch

    from compressor.finetune import FinetuneConfig, finetune
    from compressor.finetune.data import load_training_data
    from compressor.models import load_model

    torch.set_num_threads(2)
    teacher = load_model(args.teacher)
    variants = {"plain": False, "group_by_length": True}
    seconds = {name: [] for name in variants}
    padding = {}
    for _ in range(args.rounds):
        for name, grouped in variants.items():
            config = FinetuneConfig(teacher=args.teacher, data=DATA, holdout="suite", suite_train_size=1000,
                                    suite_test_size=500, train="all", lr=1e-4, max_steps=args.steps,
                                    embedding_weight=4.0, save_every=0, group_by_length=grouped)
            student = load_model(args.student)
            if name not in padding:
                padding[name] = padded_share(load_training_data(student, config), config, student.tokenizer)
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                finetune(student, config, output=out, teacher=teacher, progress=False)
                seconds[name].append((time.perf_counter() - start) / args.steps)
    rows = {name: {"seconds_per_step": statistics.median(s), "runs": s, "padded_share": padding[name]}
            for name, s in seconds.items()}
    ratio = rows["plain"]["seconds_per_step"] / rows["group_by_length"]["seconds_per_step"]
    result = {"command": "python benchmarks/bench_finetune_step.py " + " ".join(sys.argv[1:]),
              "student": args.student, "steps": args.steps, "rounds": args.rounds, "threads": 2,
              "rows": rows, "speedup": ratio, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out = Path(args.out)
    (out / "bench_finetune_step.json").write_text(json.dumps(result, indent=2))
    lines = ["# A distillation step with and without --group-by-length", "",
             f"`{result['command']}` ({result['measured']}, 2 threads): the demo's student distilled as "
             "the demo recipes distil it (batches of 32 as demo-full.yaml's), each variant "
             f"{args.steps} steps from the same start, variants taking turns {args.rounds} times; the time "
             "includes loading the data (and, grouped, the lengths).", "",
             "| batches | seconds a step (median) | padded share of the tokens computed |", "|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['seconds_per_step']:.2f} | {row['padded_share']:.0%} |")
    lines += ["", f"Grouped by length, a step takes {1 / ratio:.2f}x the time ({ratio:.2f}x faster)."]
    (out / "bench_finetune_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def padded_share(data, config, tokenizer, epochs: int = 1) -> float:
    """The share of padding among the tokens of one epoch's batches, as the run batches them."""
    per_epoch = len(data.texts) // config.batch_size
    real = padded = 0
    for step in range(per_epoch * epochs):
        enc, _ = data.batch(step, config, tokenizer, "cpu")
        real += int(enc["attention_mask"].sum())
        padded += enc["attention_mask"].numel()
    return 1 - real / padded


if __name__ == "__main__":
    main()
