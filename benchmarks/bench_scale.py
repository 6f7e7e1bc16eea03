"""Benchmark: the commands a user types on a 1-8 B decoder, with wall time, peak memory and the
longest silence on stderr (issue 34).

The model is built from a config with seeded random weights written straight to bf16
safetensors shards, one tensor at a time (no download, and never the whole model in memory):

* ``1.7b``: SmolLM2-1.7B's shape (24 layers, hidden 2048, FFN 8192, 32 heads, vocabulary 49,152,
  tied embeddings; 3.4 GB);
* ``8b``: Llama-3.1-8B's (32 layers, hidden 4096, FFN 14,336, 32 heads / 8 key-value heads,
  vocabulary 128,256; 16 GB);
* ``tiny``: the same code on a 4-layer model, a smoke test of this script.

Random weights stand in for a real checkpoint's: the time and memory of every command depend on
the shapes and dtypes alone (the analysis's numbers on them mean nothing). The tokenizer is the
bundled MiniLM's (``--tokenizer`` to change it): its ids fall inside every vocabulary here.

Each command runs as a user types it, in its own process under a small launcher that reads the
command's own peak resident set (``getrusage(RUSAGE_CHILDREN)`` of a launcher with one child),
with ``--timeout`` seconds at most; stderr is read line by line to find the longest time
without a line.

Run:  python benchmarks/bench_scale.py --shape 1.7b --work /tmp/scale [--commands inspect,export] [--merge]
Writes reports/bench_scale_<shape>.json and .md (``--merge`` keeps the rows of commands not run now).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "1.7b": dict(num_hidden_layers=24, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                 rope_theta=130000.0),
    "8b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
               rope_theta=500000.0),
    "mid": dict(num_hidden_layers=4, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                rope_theta=130000.0),
    "tiny": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=2048),
}

#: The commands, as a user types them (MODEL and OUT filled in).
COMMANDS = {
    "inspect": ["inspect", "{model}"],
    "analyze": ["analyze", "{model}", "-o", "{out}/analysis"],
    "share": ["share", "{model}", "--groups", "{groups}", "--lora-rank", "16", "-o", "{out}/share"],
    "prune": ["prune", "{model}", "--drop-layers", "{drop}", "-o", "{out}/prune"],
    "export": ["export", "{model}", "--quantize", "int4", "-o", "{out}/int4"],
    # 20 steps distilling the shared model's deltas (its frozen bf16 base, a bf16 teacher: --precision
    # auto picks mixed) on the packaged texts, 8 texts of 64 tokens a step; needs `share` run first
    "finetune": ["finetune", "{out}/share", "--teacher", "{model}", "--max-steps", "20", "--batch-size", "8",
                 "--max-length", "64", "--save-every", "0", "-o", "{out}/finetune"],
}

#: Largest safetensors shard written, as transformers writes them.
SHARD_BYTES = 2 * 2**30


def build(shape: str, folder: Path, tokenizer: str | None, seed: int = 0) -> Path:
    """A Llama-family folder of ``shape`` with seeded random bf16 weights, written tensor by tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from compressor.hub import bundled_model_dir

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**SHAPES[shape], torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2,
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in LlamaForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed)
    index, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for name, dims in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(dims, dtype=torch.bfloat16)
        else:  # the scale of a trained decoder's weights: 1/sqrt(fan-in)
            t = (torch.randn(dims, generator=generator) / dims[-1] ** 0.5).to(torch.bfloat16)
        if size + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[name] = t
        size += t.numel() * 2
    flush()
    total = sum(int(torch.Size(d).numel()) * 2 for d in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer or str(bundled_model_dir())).save_pretrained(folder)
    return folder


LAUNCHER = """
import resource, subprocess, sys, time, json
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
last, silence, lines, tail = time.perf_counter(), 0.0, 0, []
for line in proc.stderr:
    now = time.perf_counter()
    silence, last, lines = max(silence, now - last), now, lines + 1
    tail = (tail + [line.rstrip()])[-5:]
code = proc.wait()
end = time.perf_counter()
silence = max(silence, end - last)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
json.dump({"exit": code, "seconds": end - start, "peak_rss_mib": peak, "longest_silence_s": silence,
           "stderr_lines": lines, "stderr_tail": tail}, open(sys.argv[1], "w"))
"""


def run(command: list[str], result: Path, timeout: float, env: dict) -> dict:
    """``command`` under the launcher; its exit, wall time, peak memory and silences."""
    try:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *command], env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"exit": None, "seconds": timeout, "timed_out": True}
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.7b")
    parser.add_argument("--work", required=True, help="the model and the outputs are kept here")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="which, comma-separated")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: the bundled MiniLM's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the report already in --out for the commands not run now "
                             "(each row names the run that measured it)")
    args = parser.parse_args()

    work = Path(args.work)
    start = time.perf_counter()
    model = build(args.shape, work / f"model-{args.shape}", args.tokenizer)
    build_s = time.perf_counter() - start
    checkpoint = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    layers = SHAPES[args.shape]["num_hidden_layers"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "COMPRESS_LOG_FORMAT": "text"}
    program = str(Path(sys.executable).parent / "compress")
    invocation = " ".join(["python", "benchmarks/bench_scale.py", *sys.argv[1:]])
    names = args.commands.split(",")
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"unknown command {unknown[0]}; choose from {', '.join(COMMANDS)}")
    out_dir = Path(args.out)
    kept = []
    if args.merge and (out_dir / f"bench_scale_{args.shape}.json").is_file():
        earlier = json.loads((out_dir / f"bench_scale_{args.shape}.json").read_text())
        kept = [{**r, "run": r.get("run", earlier["command"])} for r in earlier["rows"] if r["name"] not in names]
    rows = []
    out = work / f"out-{args.shape}"
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        words = [w.format(model=model, out=out, groups=layers // 2, drop=layers // 4) for w in COMMANDS[name]]
        shutil.rmtree(Path(words[-1]), ignore_errors=True)  # the command's own output (-o is last)
        if name == "finetune" and not (out / "share").is_dir():
            parser.error("finetune distils the shared model: run share first (--commands share,finetune)")
        print("$ compress " + " ".join(words), flush=True)
        measured = run([program, *words], work / f"{name}.json", args.timeout, env)
        rows.append({"command": "compress " + " ".join(words), "name": name, **measured, "run": invocation})
        if name == "finetune" and measured["exit"] == 0:  # what trained, in what, and what it held
            metrics = json.loads((out / "finetune" / "finetune_report.json").read_text())["metrics"]
            rows[-1]["finetune"] = {k: metrics[k] for k in ("precision", "dtype", "trainable_params", "memory",
                                                            "seconds_per_step", "loss_first", "loss_last")}
        print(json.dumps(rows[-1]), flush=True)
    order = list(COMMANDS)
    rows = sorted(kept + rows, key=lambda r: order.index(r["name"]))
    result = {"shape": args.shape, "config": SHAPES[args.shape], "checkpoint_bytes": checkpoint,
              "build_seconds": round(build_s, 1), "threads": args.threads, "cpus": os.cpu_count(),
              "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
              "python": platform.python_version(), "rows": rows, "command": invocation}
    out = out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_scale_{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Commands on a {args.shape} decoder (seeded random bf16 weights, {checkpoint / 2**30:.1f} GiB checkpoint)",
             "", f"Command: `{result['command']}`; {args.threads} threads, {result['cpus']} CPUs, "
             f"{result['memory_gib']} GiB memory. Peak: the command's own maximum resident set.", "",
             "| command | exit | wall s | peak GiB | x checkpoint | longest silence on stderr s | run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.get("peak_rss_mib")
        lines.append(f"| `{r['command'].split(' -o ')[0]}` | {r['exit']} | {r['seconds']:.0f} | "
                     f"{'-' if peak is None else f'{peak / 1024:.1f}'} | "
                     f"{'-' if peak is None else f'{peak * 2**20 / checkpoint:.2f}'} | "
                     f"{r.get('longest_silence_s', float('nan')):.0f} | `{r.get('run', invocation)}` |")
    tuned = next((r["finetune"] for r in rows if r.get("finetune")), None)
    if tuned:
        lines += ["", f"finetune: precision {tuned['precision']} (base {tuned['dtype']['base']}, teacher "
                  f"{tuned['dtype']['teacher']}, {tuned['trainable_params']:,} trained parameters in float32); "
                  f"{tuned['seconds_per_step']:.1f} s a step; loss {tuned['loss_first']:.4f} -> {tuned['loss_last']:.4f}; "
                  "memory (MiB): " + ", ".join(f"{k.removesuffix('_mib').replace('_', ' ')} {v:,.0f}"
                                               for k, v in tuned["memory"].items())]
    page = out / f"bench_scale_{args.shape}.md"
    # what was written by hand about the rows (a "## Notes" section) stays through a --merge
    notes = page.read_text().partition("\n## Notes")[2] if args.merge and page.is_file() else ""
    page.write_text("\n".join(lines) + "\n" + (f"\n## Notes{notes}" if notes else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
