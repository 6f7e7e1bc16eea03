"""Benchmark: the file `compress export --quantize int4` writes for a BERT-base-size encoder
shared 12 -> 3, with the tables' default bits (4 for an encoder whose tables are a quarter or
more of its weights) against 8-bit tables (issue 36: <= 30 MiB, the export's check passing).

The encoder is BERT-base's shape (12 layers, hidden 768, FFN 3072, vocabulary 30,522) built from
its config with seeded weights (transformers' initializer: normal, std 0.02; no download) and the
bundled MiniLM's tokenizer, whose vocabulary is BERT-base's. Random weights stand in for a
trained checkpoint's: the sizes depend on the shapes alone; the check's cosine is the export's
own against PyTorch on the same weights.

Run:  python benchmarks/bench_int4_tables.py --work /tmp/int4tables
Writes reports/bench_int4_tables.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", default=str(ROOT / "reports"))
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compressor.hub import bundled_model_dir

    work = Path(args.work)
    model = work / "bert-base-shape"
    if not (model / "config.json").is_file():
        torch.manual_seed(0)
        BertModel(BertConfig()).save_pretrained(model)
        AutoTokenizer.from_pretrained(str(bundled_model_dir())).save_pretrained(model)
    compress = str(Path(sys.executable).parent / "compress")
    shared = work / "shared"
    runs = [[compress, "share", str(model), "--groups", "3", "--no-fidelity", "-o", str(shared), "--overwrite"]]
    rows = []
    for name, extra in (("int4, default tables", []), ("int4, --embedding-bits 8", ["--embedding-bits", "8"])):
        out = work / name.split(",")[1].strip().replace(" ", "_").replace("-", "")
        runs.append([compress, "export", str(shared), "--quantize", "int4", *extra, "-o", str(out), "--overwrite"])
        rows.append({"row": name, "folder": out, "command": " ".join(runs[-1][1:])})
    for command in runs:
        print("$ " + " ".join(command), flush=True)
        subprocess.run(command, check=True)
    result = {"command": " ".join(["python", "benchmarks/bench_int4_tables.py", *sys.argv[1:]]),
              "share": " ".join(runs[0][1:]), "rows": []}
    for r in rows:
        metrics = json.loads((r["folder"] / "export_report.json").read_text())["metrics"]
        onnx_bytes = sum(f.stat().st_size for f in r["folder"].iterdir() if f.name.startswith("model.onnx"))
        result["rows"].append({"row": r["row"], "command": r["command"], "onnx_mib": round(onnx_bytes / 2**20, 1),
                               "embeddings": metrics["graph"].get("embeddings"),
                               "table_bits_default": metrics["graph"].get("table_bits_default"),
                               "check_mean_cosine": metrics["check"]["mean_cosine"]})
    out = Path(args.out)
    (out / "bench_int4_tables.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# int4 of a BERT-base-size encoder shared 12 -> 3", "",
             f"Command: `{result['command']}` (`compress {result['share']}` first). Seeded BERT-base-shape weights; "
             "file: the ONNX graph and its data.", "",
             "| row | file | tables | check mean cosine |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['onnx_mib']} MiB | {r['embeddings']} | {r['check_mean_cosine']:.4f} |")
    (out / "bench_int4_tables.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
