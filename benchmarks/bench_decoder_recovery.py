"""Benchmark: a decoder made 25%+ smaller by dropping layers or by sharing them, at equal unique
parameters, each distilled for the same number of steps, then int4, against optimum's fp32
with-past export.

Both routes keep 22 of SmolLM2-135M's 30 blocks' worth of parameters (26.7% fewer unique block
parameters): ShortGPT-style dropping removes the 8 blocks of lowest Block Influence
(``compress prune --drop-layers 8``); sharing merges the 30 layers into 22 groups chosen by CKA
(``compress share --groups 22 --lora-rank 0``, no LoRA, so the parameter counts are equal). Each is
distilled from the original (``compress finetune``: KL on next-token logits plus hidden states, all
weights trained) on movie-snippet texts that are not in the held-out set, for ``--steps`` steps
(budgets in steps reproduce on a loaded machine; wall time is shown). Perplexity is
``compress evaluate`` on the same held-out texts for every model. The better of the two is
exported in int4 and measured with the dense int4 by ``compress report`` (generation at batch 1,
a 128-token prompt, 64 new tokens, 2 threads, beside optimum's with-past fp32 and int8).

Targets (issue 14): dense int4 perplexity within 1.10x of the original's, decode at least 2x
optimum fp32's; compressed + int4 after at most 20 minutes of distillation: perplexity within
1.5x, file at most 0.2x optimum fp32's, decode at least 2x.

Run:  python benchmarks/bench_decoder_recovery.py /path/to/smollm2 --steps 300
Writes reports/bench_decoder_recovery.json and .md; the report itself in reports/real_smollm2/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compress(*args: str, log: list[str], env: dict) -> float:
    """Run one ``compress`` command as a user would; its wall time in seconds."""
    program = str(Path(sys.executable).parent / "compress")
    line = "compress " + " ".join(args)
    print(line, flush=True)
    start = time.perf_counter()
    done = subprocess.run([program, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log.append(f"$ {line}  # {seconds:.0f} s, exit {done.returncode}")
    if done.returncode != 0:
        raise SystemExit(f"{line} failed:\n{done.stderr[-3000:]}")
    return seconds


def held_out_split(work: Path, test_size: int) -> Path:
    """The training texts: movie snippets minus the ``test_size`` that ``compress evaluate
    --test-size`` holds out (the same seeded shuffle), one per line."""
    from compressor.data.datasets import load_texts

    texts = load_texts("movie-snippets")
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)  # evaluate's own order (EvaluateConfig.seed 0)
    train = work / "train.txt"
    train.write_text("\n".join(texts[i].replace("\n", " ") for i in order[test_size:]) + "\n")
    return train


def against_targets(rows: dict[str, dict], label: str) -> tuple[float, float, float]:
    """A `compress report` row's perplexity over the original's, decode tokens/s over optimum
    fp32's with-past export, and file size over that export's: the issue's three ratios."""
    row, fp32 = rows[label], rows["optimum ONNX fp32"]
    return (row["value"] / rows["original"]["value"], row["generation"]["decode_vs_optimum_fp32"],
            row["size_bytes"] / fp32["size_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--drop", type=int, default=8, help="blocks removed (dropping) or merged away (sharing)")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", default=None, help="keep the models here (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import tempfile

    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_decoder_recovery_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log: list[str] = []
    train = held_out_split(work, args.test_size)
    m = args.model
    seconds = {}
    compress("prune", m, "--drop-layers", str(args.drop), "-o", str(work / "drop"), "--overwrite", log=log, env=env)
    compress("share", m, "--groups", str(layers - args.drop), "--lora-rank", "0", "-o", str(work / "share"),
             "--overwrite", log=log, env=env)
    for name in ("drop", "share"):
        seconds[name] = compress(
            "finetune", str(work / name), "--teacher", m, "--data", str(train), "--train", "all", "--lr", str(args.lr),
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--quiet", "-o", str(work / f"{name}-ft"), "--overwrite", "--json", str(work / f"{name}-ft.json"),
            log=log, env=env)
    models = [m, *(str(work / n) for n in ("drop", "share", "drop-ft", "share-ft"))]
    compress("evaluate", *models, "--data", "movie-snippets", "--test-size", str(args.test_size), "--max-length",
             str(args.max_length), "--json", str(work / "evaluate.json"), "--overwrite", log=log, env=env)
    records = json.loads((work / "evaluate.json").read_text())
    perplexity = dict(zip(["original", "drop", "share", "drop-ft", "share-ft"],
                          (r["metrics"]["perplexity"] for r in records)))
    params = dict(zip(perplexity, (r["params_after"] for r in records)))
    best = min(("drop-ft", "share-ft"), key=perplexity.get)

    for name, source in (("dense-int4", m), (f"{best}-int4", str(work / best))):
        compress("export", source, "--quantize", "int4", "-o", str(work / name), "--overwrite", log=log, env=env)
    report_dir = work / "report"
    compress("report", str(work / "dense-int4"), str(work / f"{best}-int4"), "--original", m,
             "--names", f"dense int4,{best.replace('-ft', '')} + distil int4", "--batch-sizes", "1",
             "--seq-len", str(args.prompt_tokens), "--prompt-tokens", str(args.prompt_tokens),
             "--new-tokens", str(args.new_tokens), "--repeats", "3", "--test-size", str(args.test_size), "--max-length",
             str(args.max_length), "--threads", str(args.threads), "-o", str(report_dir), "--overwrite", log=log, env=env)
    report = json.loads((report_dir / "report.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    real = Path(args.out) / "real_smollm2"
    real.mkdir(parents=True, exist_ok=True)
    shutil.copy(report_dir / "report.md", real / "report_generation.md")
    shutil.copy(report_dir / "report.json", real / "report_generation.json")

    targets = []
    for label, ppl_limit, size_limit in (("dense int4", 1.10, None),
                                         (f"{best.replace('-ft', '')} + distil int4", 1.5, 0.2)):
        ppl, decode, size = against_targets(rows, label)
        targets.append({"row": label, "perplexity_x": round(ppl, 3), "perplexity_target": ppl_limit,
                        "decode_x": round(decode, 2), "decode_target": 2.0, "size_x": round(size, 3),
                        "size_target": size_limit,
                        "met": ppl <= ppl_limit and decode >= 2.0 and (size_limit is None or size <= size_limit)})
    result = {"model": m, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
              "lr": args.lr, "layers": layers, "drop": args.drop, "perplexity": perplexity, "unique_params": params,
              "finetune_seconds": {k: round(v, 1) for k, v in seconds.items()}, "best": best, "targets": targets,
              "commands": log, "command": f"python benchmarks/bench_decoder_recovery.py MODEL --steps {args.steps}"}
    out = Path(args.out)
    (out / "bench_decoder_recovery.json").write_text(json.dumps(result, indent=2) + "\n")
    base = perplexity["original"]
    lines = [f"# Dropping against sharing on {Path(m).name}: {layers} -> {layers - args.drop} blocks' worth of "
             "parameters, distilled, then int4", "",
             f"Command: `{result['command']}`; {args.threads} threads. Distillation: {args.steps} steps of "
             f"{args.batch_size} texts x {args.max_length} tokens, all weights, lr {args.lr}, on movie snippets outside "
             f"the {args.test_size} held-out ones; perplexity by `compress evaluate` on those {args.test_size}.", "",
             "| model | unique params | perplexity | x original | distillation wall time |", "|---|---|---|---|---|"]
    names = {"original": "original", "drop": f"drop {args.drop} blocks (Block Influence)",
             "share": f"share into {layers - args.drop} groups (CKA)", "drop-ft": f"drop + {args.steps} steps",
             "share-ft": f"share + {args.steps} steps"}
    for key, label in names.items():
        wall = f"{seconds[key[:-3]] / 60:.1f} min" if key.endswith("-ft") else "-"
        lines.append(f"| {label} | {params[key] / 1e6:.1f} M | {perplexity[key]:.1f} | {perplexity[key] / base:.2f}x | {wall} |")
    lines += ["", "Generation and size (`compress report`, reports/real_smollm2/report_generation.md):", "",
              "| row | perplexity x original (target) | decode x optimum fp32 (target) | file x optimum fp32 (target) | met |",
              "|---|---|---|---|---|"]
    for t in targets:
        size_target = f"<= {t['size_target']}" if t["size_target"] else "-"
        lines.append(f"| {t['row']} | {t['perplexity_x']} (<= {t['perplexity_target']}) | {t['decode_x']} (>= 2.0) | "
                     f"{t['size_x']} ({size_target}) | {'yes' if t['met'] else 'no'} |")
    lines += ["", "Commands, in order:", "", "```", *log, "```"]
    (out / "bench_decoder_recovery.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
