"""Benchmark: which int4 export keeps a decoder's perplexity (issue 14's 1.10x target).

Exports the model with `compress export --quantize int4` once per variant (how blocks are
fitted, block size, the type MatMulNBits computes in) and measures each export's perplexity on
the held-out movie snippets the way `compress report` does (onnxruntime, the report's own
`task_metric`), beside the original in PyTorch, and its decode speed: greedy generation of
``--new-tokens`` after a ``--prompt-tokens`` prompt at batch 1 through optimum's
``ORTModelForCausalLM`` (as the report's generation rows), variants taking turns, medians.

Run:  python benchmarks/bench_int4_methods.py /tmp/smollm2 [--variants rtn:32:4,hqq:32:4,...]
Writes reports/bench_int4_methods.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: method:block size:accuracy level
VARIANTS = "rtn:32:4,rtn:32:1,hqq:32:4,hqq:32:1,rtn-asym:32:4,rtn:16:4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--variants", default=VARIANTS, help="comma-separated method:block:accuracy-level")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=None)
    parser.add_argument("--reuse", action="store_true", help="keep exports already in --work")
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import torch

    from compressor.evaluation.evaluate import EvaluateConfig, load_split
    from compressor.models import load_model
    from compressor.report.config import ReportConfig
    from compressor.report.measure import task_metric
    from compressor.report.runners import OnnxRunner, TorchRunner

    torch.set_num_threads(args.threads)
    config = ReportConfig(test_size=args.test_size, max_length=args.max_length, threads=args.threads)
    split = load_split(EvaluateConfig(data=config.data, train_size=config.train_size, test_size=config.test_size,
                                      max_length=config.max_length), need_labels=False)
    original = task_metric(TorchRunner(load_model(args.model), "original"), split, config)["value"]
    print(f"original perplexity {original:.2f}", file=sys.stderr, flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_int4_"))
    exe = Path(sys.executable).parent / "compress"
    rows = []
    for variant in args.variants.split(","):
        method, block, level = variant.split(":")
        folder = work / variant.replace(":", "-")
        start = time.perf_counter()
        if args.reuse and (folder / "model.onnx").is_file():
            done = subprocess.CompletedProcess([], 0)  # export_s 0: made by an earlier run
        else:
            done = subprocess.run([str(exe), "export", args.model, "--quantize", "int4", "--int4-method", method,
                               "--block-size", block, "--accuracy-level", level, "-o", str(folder), "--overwrite"],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            rows.append({"variant": variant, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        ppl = task_metric(OnnxRunner(folder, variant, threads=args.threads), split, config)["value"]
        size = (folder / "model.onnx").stat().st_size + sum(p.stat().st_size for p in folder.glob("*.onnx_data"))
        rows.append({"variant": variant, "method": method, "block_size": int(block), "accuracy_level": int(level),
                     "perplexity": round(ppl, 3), "of_original": round(ppl / original, 4), "size_mb": round(size / 1e6, 1),
                     "export_s": round(seconds, 1), "folder": str(folder)})
        print(rows[-1], file=sys.stderr, flush=True)
    decode_speed([r for r in rows if "error" not in r], args)

    command = (f"python benchmarks/bench_int4_methods.py {args.model} --variants {args.variants} "
               f"--prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens}")
    out = Path(args.out)
    (out / "bench_int4_methods.json").write_text(json.dumps(
        {"command": command, "original_perplexity": round(original, 3), "test_size": args.test_size,
         "max_length": args.max_length, "rows": rows}, indent=2) + "\n")
    lines = ["# int4 exports of a decoder: perplexity by method", "",
             f"`{command}`: perplexity on {args.test_size} held-out movie snippets ({args.max_length} tokens), as "
             f"`compress report` measures it; the original (PyTorch fp32) {original:.2f}. Accuracy level: the type "
             "MatMulNBits computes in (4 int8, 1 fp32). The token embedding / tied head is int8 in every variant.", "",
             "| method | block | accuracy level | perplexity | of original | model.onnx MB | decode tok/s | export s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | | | failed: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['block_size']} | {r['accuracy_level']} | {r['perplexity']:.2f} | "
                         f"{r['of_original']:.3f}x | {r['size_mb']} | {r['decode_tok_s']:.1f} | {r['export_s'] or 'reused'} |")
    (out / "bench_int4_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def decode_speed(rows: list[dict], args) -> None:
    """``decode_tok_s`` of every row: new tokens over the time of the whole generation after the
    prompt's first token (prefill timed apart), variants taking turns, medians of ``repeats``."""
    import statistics

    from transformers import AutoTokenizer

    from compressor.report.generation import greedy, prompt
    from compressor.report.runners import load_generator

    tok = AutoTokenizer.from_pretrained(args.model)
    enc = prompt(tok, args.prompt_tokens)
    generators = {r["variant"]: load_generator(r["folder"], args.threads) for r in rows}
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in generators}
    for _ in range(args.repeats):
        for variant, g in generators.items():
            t = time.perf_counter()
            greedy(g, enc, 1, tok.eos_token_id)
            first = time.perf_counter() - t
            t = time.perf_counter()
            greedy(g, enc, args.new_tokens, tok.eos_token_id)
            times[variant].append((first, time.perf_counter() - t))
    for r in rows:
        first = statistics.median(f for f, _ in times[r["variant"]])
        total = statistics.median(t for _, t in times[r["variant"]])
        r["decode_tok_s"] = round((args.new_tokens - 1) / max(total - first, 1e-9), 2)


if __name__ == "__main__":
    main()
