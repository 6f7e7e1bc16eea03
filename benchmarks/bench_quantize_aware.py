"""Benchmark: quantization-aware distillation against distilling in float and rounding after, on
a decoder with blocks dropped, both exported as int4 and measured by `compress report`.

The compressed decoder of issue 14 (SmolLM2-135M with the 8 blocks of lowest Block Influence
dropped, 26.7% fewer unique block parameters) is distilled from the original twice with the same
data, steps, learning rate and seed: once in float (``compress finetune``), once with
``--quantize-aware`` (every step computes on the int4 blocks the export will store, the update
goes to the float weights behind them). Each is exported with ``compress export --quantize int4
--optimize 2`` (round-to-nearest blocks of 32, attention fused, the tied head and table 8-bit
blocks; the quantization-aware checkpoint is already on that grid and is stored as it is) and
both are measured in one ``compress report`` beside the original in PyTorch and optimum's with-past export in fp32 and int8: perplexity on held-out movie snippets
(not trained on), decode tokens/s at batch 1 (128-token prompt, 64 new tokens), file size.

Targets (issue 14, the compressed model): after at most 20 minutes of CPU distillation,
perplexity within 1.5x of the original's, file at most 0.2x optimum fp32's, decode at least 2x.

Run:  python benchmarks/bench_quantize_aware.py /path/to/smollm2 --steps 200 --work /tmp/bqa
Writes reports/bench_quantize_aware.json and .md; the report in reports/real_smollm2/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decoder_recovery import against_targets, compress, held_out_split  # noqa: E402  (the same runner, split, ratios)

ROUTES = {"plain": ("distil then int4", []), "aware": ("quantization-aware distil int4", ["--quantize-aware"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--drop", type=int, default=8)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--routes", default="aware,plain", help="which distillations to run, in this order")
    parser.add_argument("--work", required=True, help="keep the models here; a step whose output exists is reused")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    routes = [r.strip() for r in args.routes.split(",")]
    if not routes or any(r not in ROUTES for r in routes):
        raise SystemExit(f"--routes: choose from {', '.join(ROUTES)}")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log: list[str] = []
    m = args.model
    train = held_out_split(work, args.test_size)
    def step(done: Path, *command: str) -> None:  # run, or say it was reused
        if done.exists():
            log.append(f"$ compress {' '.join(command)}  # reused (made by an earlier run)")
        else:
            compress(*command, log=log, env=env)

    step(work / "drop", "prune", m, "--drop-layers", str(args.drop), "-o", str(work / "drop"))
    seconds, finetuned = {}, {}
    for route in routes:
        out = work / f"drop-{route}"
        step(out / "finetune_report.json", "finetune", str(work / "drop"), "--teacher", m, "--data", str(train),
             "--train", "all", "--lr", str(args.lr), "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
             "--max-length", str(args.max_length), *ROUTES[route][1], "--quiet", "-o", str(out), "--overwrite")
        record = json.loads((out / "finetune_report.json").read_text())
        seconds[route] = record["seconds"]
        finetuned[route] = record["metrics"]
        step(work / f"{route}-int4" / "model.onnx", "export", str(out), "--quantize", "int4", "--optimize", "2",
             "-o", str(work / f"{route}-int4"), "--overwrite")
    names = [f"drop {args.drop} + {ROUTES[r][0]}" for r in routes]
    report_dir = work / "report"
    compress("report", *(str(work / f"{r}-int4") for r in routes), "--original", m, "--names", ",".join(names),
             "--batch-sizes", "1", "--seq-len", "128", "--prompt-tokens", "128", "--new-tokens", "64",
             "--repeats", "3", "--test-size", str(args.test_size), "--max-length", str(args.max_length),
             "--threads", str(args.threads), "-o", str(report_dir), "--overwrite", log=log, env=env)
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    real = Path(args.out) / "real_smollm2"
    real.mkdir(parents=True, exist_ok=True)
    shutil.copy(report_dir / "report.md", real / "report_quantize_aware.md")
    shutil.copy(report_dir / "report.json", real / "report_quantize_aware.json")

    base = rows["original"]["value"]
    results = []
    for route, label in zip(routes, names):
        row = rows[label]
        ppl, decode, size = against_targets(rows, label)
        minutes = seconds[route] / 60
        results.append({"route": route, "row": label, "perplexity": round(row["value"], 2), "perplexity_x": round(ppl, 3),
                        "decode_x": round(decode, 2), "size_x": round(size, 3), "distillation_minutes": round(minutes, 1),
                        "seconds_per_step": finetuned[route]["seconds_per_step"],
                        "met": ppl <= 1.5 and decode >= 2.0 and size <= 0.2 and minutes <= 20})
    command = (f"python benchmarks/bench_quantize_aware.py MODEL --steps {args.steps} --lr {args.lr} "
               f"--routes {args.routes} --work WORK")
    result = {"model": m, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "lr": args.lr, "drop": args.drop, "original_perplexity": base, "rows": results, "commands": log,
              "command": command}
    out = Path(args.out)
    (out / "bench_quantize_aware.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Quantization-aware distillation on {Path(m).name}, {args.drop} blocks dropped, int4", "",
             f"Command: `{command}`; {args.threads} threads. Distillation: {args.steps} steps of {args.batch_size} "
             f"texts x {args.max_length} tokens, all weights, lr {args.lr}, seed 0, on movie snippets outside the "
             f"{args.test_size} held-out ones; both exported with `compress export --quantize int4 --optimize 2` (blocks of 32); "
             f"perplexity on those {args.test_size} by `compress report` (original: {base:.1f}); the full report in "
             "reports/real_smollm2/report_quantize_aware.md.", "",
             "| route | perplexity | x original (<= 1.5) | decode x optimum fp32 (>= 2) | file x optimum fp32 (<= 0.2) "
             "| distillation (<= 20 min) | s/step | targets met |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['perplexity']:.1f} | {r['perplexity_x']:.3f} | {r['decode_x']:.2f} | "
                     f"{r['size_x']:.3f} | {r['distillation_minutes']:.1f} min | {r['seconds_per_step']:.2f} | "
                     f"{'yes' if r['met'] else 'no'} |")
    lines += ["", "Commands, in order:", "", "```", *log, "```"]
    (out / "bench_quantize_aware.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
