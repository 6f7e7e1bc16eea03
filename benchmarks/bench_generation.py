"""Benchmark: generation speed of a decoder, PyTorch against ONNX exports with a KV cache, 2 threads.

Rows: the original in PyTorch; optimum's own fp32 export with its cache (``main_export``,
``text-generation-with-past``, the route a user takes without compress); compress's fp32 and
int4 exports (``compress export MODEL`` / ``--quantize int4``, made here unless given). Batch 1,
a 128-token prompt, 64 new tokens, greedy; time to first token is a ``generate`` of one token
(the prefill), decode tokens/s the other 63 over the time a 64-token ``generate`` takes beyond it.
Rows take turns run by run, so a noisy machine slows them all alike; medians of ``--repeats``.

Run:  python benchmarks/bench_generation.py /path/to/smollm2 --threads 2
Writes reports/bench_generation.json and reports/bench_generation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_rows(model: str, work: Path, threads: int) -> dict[str, Path]:
    from optimum.exporters.onnx import main_export

    program = str(Path(sys.executable).parent / "compress")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    folders = {"optimum fp32 (with past)": work / "optimum", "compress fp32": work / "fp32",
               "compress int4": work / "int4"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(model, output=folders["optimum fp32 (with past)"], task="text-generation-with-past",
                    do_validation=False)
    for label, extra in (("compress fp32", []), ("compress int4", ["--quantize", "int4"])):
        subprocess.run([program, "export", model, "-o", str(folders[label]), *extra], check=True, env=env,
                       capture_output=True)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    from compressor.data import calibration_texts
    from compressor.models import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench_generation_"))
    folders = export_rows(args.model, work, args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    rows = {"PyTorch fp32": loaded.model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, folder in folders.items():
            rows[label] = ORTModelForCausalLM.from_pretrained(folder, session_options=options)
    sizes = {label: sum(f.stat().st_size for f in folder.glob("*.onnx*")) for label, folder in folders.items()}

    tok = loaded.tokenizer
    text = " ".join(calibration_texts(None))
    ids = tok(text, return_tensors="pt")["input_ids"][:, : args.prompt_tokens]
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run(model, new: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - start

    times = {label: {"first": [], "all": []} for label in rows}
    for model in rows.values():  # warm-up
        run(model, 4)
    for _ in range(args.repeats):
        for label, model in rows.items():
            times[label]["first"].append(run(model, 1))
            times[label]["all"].append(run(model, args.new_tokens))
    result_rows = []
    for label in rows:
        first, full = statistics.median(times[label]["first"]), statistics.median(times[label]["all"])
        result_rows.append({"label": label, "ttft_ms": round(first * 1000, 1),
                            "decode_tokens_per_s": round((args.new_tokens - 1) / max(full - first, 1e-9), 1),
                            "file_bytes": sizes.get(label)})
    base = next(r for r in result_rows if r["label"] == "optimum fp32 (with past)")
    for r in result_rows:
        r["decode_vs_optimum_fp32"] = round(r["decode_tokens_per_s"] / base["decode_tokens_per_s"], 2)
        r["size_vs_optimum_fp32"] = round(r["file_bytes"] / base["file_bytes"], 3) if r["file_bytes"] else None
    result = {"model": args.model, "threads": args.threads, "prompt_tokens": int(ids.shape[1]),
              "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": result_rows,
              "command": "python benchmarks/bench_generation.py MODEL --threads 2",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_generation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Generation: {Path(args.model).name}, batch 1, {result['prompt_tokens']}-token prompt, "
             f"{args.new_tokens} new tokens, {args.threads} threads", "",
             f"Command: `{result['command']}`; rows take turns, medians of {args.repeats} runs.", "",
             "| row | time to first token (ms) | decode tokens/s | x optimum fp32 | file MiB | x optimum fp32 |",
             "|---|---|---|---|---|---|"]
    for r in result_rows:
        size = f"{r['file_bytes'] / 2**20:.1f}" if r["file_bytes"] else "-"
        lines.append(f"| {r['label']} | {r['ttft_ms']} | {r['decode_tokens_per_s']} | {r['decode_vs_optimum_fp32']} | "
                     f"{size} | {r['size_vs_optimum_fp32'] if r['size_vs_optimum_fp32'] is not None else '-'} |")
    (out / "bench_generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
