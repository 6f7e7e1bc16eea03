"""Benchmark: static int8 on the bundled MiniLM, all-static against dynamic FFN down-projections.

Static int8 (activation ranges calibrated on text once, not measured on every call) with one
MinMax range per activation loses the model: the input of each FFN down-projection, the output
of GELU, carries a few outlier features far larger than the rest, and a single range over them
rounds the rest away. `compress export --quantize int8-static` quantizes those MatMuls (and
their LoRA branches) dynamically and the rest statically, with per-channel weight scales. This
benchmark measures, in one `compress report` run (rows take turns, fixed threads, warm-up):

- optimum's dynamic int8 (the baseline, what `--quantize int8` also makes of a dense model);
- all-static int8, per tensor and per channel (what `--quantize int8-static` made before);
- int8-static as shipped (dynamic FFN down-projections, per-channel weights) and per tensor.

The all-static files fail `compress export`'s check (mean cosine < 0.90), so they are made with
the library's `quantize_onnx` on copies of an fp32 export, with no FFN scopes given.

Run:  python benchmarks/bench_int8_static.py --threads 2
Writes reports/bench_int8_static.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALIBRATION = "movie-snippets"


def build_variants(work: Path) -> tuple[list[tuple[str, str]], dict]:
    """Static int8 variants of the bundled MiniLM, each with the check `compress export` runs."""
    import torch

    from compressor.data import calibration_texts
    from compressor.export import ExportConfig, export
    from compressor.export.stage import ffn_down_scopes
    from compressor.export.verify import check_export
    from compressor.models import load_model
    from compressor.quantization import method_config
    from compressor.quantization.stage import quantize_onnx

    loaded = load_model(None)
    fp32 = work / "fp32"
    export(loaded, ExportConfig(), fp32)
    model = loaded.adapter.base(loaded.model).eval()
    scopes = ffn_down_scopes(loaded, model)
    inputs = ["input_ids", "attention_mask", "token_type_ids"]
    variants, checks = [], {}
    for label, per_channel, dynamic in (("all-static per-tensor", False, False),
                                         ("all-static per-channel", True, False),
                                         ("int8-static per-tensor", False, True),
                                         ("int8-static (shipped: per-channel)", True, True)):
        folder = work / label.split(" (")[0].replace(" ", "-")
        shutil.copytree(fp32, folder)
        # min_cosine -1: measure the check's cosine without failing on it
        q = method_config("int8-static", calibration=CALIBRATION, per_channel=per_channel, min_cosine=-1.0)
        done = quantize_onnx(folder, q, tokenizer=loaded.tokenizer, input_names=inputs,
                             dynamic_scopes=scopes if dynamic else ())
        (folder / "export_report.json").unlink()  # the fp32 export's: the report reads the graph instead
        with torch.no_grad():
            check = check_export(folder, model, loaded.tokenizer, "feature-extraction", inputs, ExportConfig(), q,
                                 calibration_texts(None))
        checks[label] = {"dynamic_matmuls": done.get("dynamic_matmuls", 0), "per_channel": per_channel,
                         "check_mean_cosine": check["mean_cosine"], "check_lowest_cosine": check["min_cosine"]}
        variants.append((label, str(folder)))
    return variants, checks


def render(result: dict) -> str:
    from compressor.report.render import markdown

    text = markdown(result, title="all-MiniLM-L6-v2: static int8, all-static against dynamic FFN down-projections",
                    command=result["command"])
    text += ("\n## The check `compress export` runs (mean cosine per token to PyTorch fp32, lengths 8/32/128; "
             "it asks for 0.90)\n\n| variant | weights | dynamic MatMuls | mean cosine | lowest |\n|---|---|---|---|---|\n")
    for label, c in result["checks"].items():
        text += (f"| {label} | {'per channel' if c['per_channel'] else 'per tensor'} | {c['dynamic_matmuls']} | "
                 f"{c['check_mean_cosine']:.4f} | {c['check_lowest_cosine']:.4f} |\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--render-only", action="store_true", help="Rewrite the Markdown from the JSON of a run.")
    args = parser.parse_args()
    out = ROOT / "reports"
    if args.render_only:
        (out / "bench_int8_static.md").write_text(render(json.loads((out / "bench_int8_static.json").read_text())))
        return

    from compressor.models import load_model
    from compressor.report import ReportConfig, report

    command = "python benchmarks/bench_int8_static.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants, checks = build_variants(work / "variants")
        config = ReportConfig(threads=args.threads, repeats=args.repeats)
        result = report(load_model(None), variants, config, work=work / "report")
    result["command"], result["checks"] = command, checks
    text = render(result)
    (out / "bench_int8_static.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench_int8_static.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
