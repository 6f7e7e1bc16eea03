"""Benchmark: ONNX size, speed and accuracy of compressed models against optimum's plain routes.

Targets (issue 5):
1. A BERT-base-size model (12 layers, hidden 768; config-built weights, which are fine for
   size), 12 -> 3 groups, int8: the ONNX file is at most 48 MiB (plain int8 about 105 MiB,
   fp32 about 417 MiB).
2. The bundled MiniLM, 6 -> 3 groups with LoRA, fine-tuned, int8: at most 0.8x the size of
   optimum's int8 export at no more than 3% loss of probe accuracy; with vocabulary pruning on
   the movie snippets, at most 0.5x.
3. A pruned variant at least 1.3x faster than optimum's int8 export at batch 32, sequence 128,
   2 threads, keeping at least 97% of the original's probe accuracy.

The fine-tuned variants come from benchmarks/build_export_variants.py (run first; 20 and 7 CPU
minutes of distillation). Everything in targets 2 and 3 is measured in one `compress report` run: the rows
take turns, with fixed threads and warm-up.

Run:  python benchmarks/build_export_variants.py
      python benchmarks/bench_export.py --threads 2
Writes reports/bench_export.{json,md,png}.
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

MIB = 2**20


def bert_base_sizes(work: Path) -> dict:
    """Target 1: file sizes of a config-built BERT-base, dense and 12 -> 3 groups."""
    import torch
    import transformers

    from compressor.export import ExportConfig, export
    from compressor.models import bundled_model_dir, load_model
    from compressor.quantization import method_config
    from compressor.report.stage import optimum_baselines
    from compressor.sharing import ShareConfig, share

    torch.manual_seed(0)
    folder = work / "bert-base"
    transformers.BertModel(transformers.BertConfig()).save_pretrained(folder)  # 12 x 768, vocab 30522
    # bert-base-uncased's WordPiece vocabulary is MiniLM's: its tokenizer fits the model
    transformers.AutoTokenizer.from_pretrained(bundled_model_dir()).save_pretrained(folder)
    dense = load_model(str(folder))
    baselines = optimum_baselines(dense, work / "baselines", "feature-extraction")
    shared, record = share(dense, ShareConfig(plan="0-3,4-7,8-11", fidelity=False))
    result = {"model": "BertModel(BertConfig()) with seeded random weights", "plan": record.metrics["plan"],
              "unique_params": {"dense": record.params_before, "shared": record.params_after}}
    for label, folder in baselines.items():
        result[label] = (folder / "model.onnx").stat().st_size
    for mode in ("fp32", "int8"):
        q = method_config(mode) if mode != "fp32" else None
        rec = export(shared, ExportConfig(check_lengths=[8, 128]), work / f"shared-{mode}", quantize=q)
        result[f"shared 3 groups ONNX {mode}"] = rec.metrics["file_bytes"]
        result[f"shared 3 groups ONNX {mode} projections"] = rec.metrics["projections"]
        result[f"shared 3 groups ONNX {mode} check"] = {k: rec.metrics["check"][k] for k in ("max_abs_diff", "mean_cosine")}
    # what optimum's quantizer alone makes of the shared export: it skips the MatMuls the
    # exporter feeds through Identity nodes (the reason compress export inlines them)
    import onnx
    from optimum.onnxruntime import ORTQuantizer

    from compressor.export.optimum import export_onnx
    from compressor.onnx.graph import weight_matmuls
    from compressor.quantization.presets import optimum_preset

    raw = work / "shared-optimum-quantizer"
    export_onnx(shared.model, "feature-extraction", 17, raw / "model.onnx")
    shared.model.config.save_pretrained(raw)
    ORTQuantizer.from_pretrained(raw).quantize(optimum_preset("auto", is_static=False), save_dir=raw / "q")
    result["shared 3 groups, optimum's ORTQuantizer alone"] = (raw / "q" / "model_quantized.onnx").stat().st_size
    result["shared 3 groups, optimum's ORTQuantizer alone projections"] = weight_matmuls(
        onnx.load(str(raw / "q" / "model_quantized.onnx")))
    result["target_mib"] = 48
    result["passed"] = result["shared 3 groups ONNX int8"] <= 48 * MIB
    return result


def minilm_exports(models: Path, work: Path) -> list[tuple[str, str]]:
    """The int8 exports of the fine-tuned variants (and the shared one with its vocabulary cut)."""
    from compressor.export import ExportConfig, export
    from compressor.models import load_model
    from compressor.pruning import PruneConfig, prune
    from compressor.quantization import method_config

    variants = []
    for name in ("shared3-lora16", "pruned-h25-f50"):
        if not (models / name / "compress.json").is_file():
            raise SystemExit(f"{models / name} is missing: run benchmarks/build_export_variants.py first")
        loaded = load_model(str(models / name))
        export(loaded, ExportConfig(), work / f"{name}-int8", quantize=method_config("int8"))
        variants.append((f"{name} int8", str(work / f"{name}-int8")))
        if name.startswith("shared"):
            # the movie snippets are the domain: keep the tokens they use (min_count 1: outputs on
            # them unchanged), or those they use at least twice (rare words spelled with kept pieces)
            for min_count in (1, 2):
                cut, _ = prune(load_model(str(models / name)),
                               PruneConfig(vocab_from="movie-snippets", vocab_min_count=min_count, fidelity=False))
                folder = work / f"{name}-vocab{min_count}-int8"
                export(cut, ExportConfig(), folder, quantize=method_config("int8"))
                variants.append((f"{name} vocab>={min_count} int8", str(folder)))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", type=Path, default=ROOT / "out" / "bench_export" / "models")
    parser.add_argument("--skip-bert-base", action="store_true")
    parser.add_argument("--name", default="bench_export")
    args = parser.parse_args()

    from compressor.models import load_model
    from compressor.report import ReportConfig, report
    from compressor.report.render import chart, markdown

    command = "python benchmarks/bench_export.py " + " ".join(sys.argv[1:])
    out = ROOT / "reports"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bert = None if args.skip_bert_base else bert_base_sizes(work / "bert")
        shutil.rmtree(work / "bert", ignore_errors=True)
        variants = minilm_exports(args.models, work)
        config = ReportConfig(threads=args.threads, repeats=args.repeats)
        result = report(load_model(None), variants, config, work=work / "report")
    result["command"] = command
    result["variants_built_by"] = {p.name: json.loads((p / "variant.json").read_text())
                                   for p in sorted(args.models.iterdir()) if (p / "variant.json").is_file()}
    rows = {r["label"]: r for r in result["rows"]}
    shared, pruned = rows["shared3-lora16 int8"], rows["pruned-h25-f50 int8"]
    vocab = min((rows[f"shared3-lora16 vocab>={m} int8"] for m in (1, 2)),
                key=lambda r: (not r["of_original"] >= 0.97, r["size_vs_optimum_int8"]))
    targets = {
        "shared int8 <= 0.8x optimum int8, <= 3% probe loss": shared["size_vs_optimum_int8"] <= 0.8 and shared["of_original"] >= 0.97,
        f"shared + vocab int8 <= 0.5x optimum int8, <= 3% probe loss ({vocab['label']})":
            vocab["size_vs_optimum_int8"] <= 0.5 and vocab["of_original"] >= 0.97,
        "pruned int8 >= 1.3x faster than optimum int8 (b32, s128), >= 97% probe": pruned["speedup_vs_optimum_int8"] >= 1.3
        and pruned["of_original"] >= 0.97,
    }
    if bert is not None:
        targets["BERT-base 12 -> 3 groups int8 <= 48 MiB"] = bert["passed"]
    result["bert_base"], result["targets"] = bert, targets

    title = "all-MiniLM-L6-v2: compressed int8 ONNX against optimum's exports"
    text = markdown(result, title=title, command=command)
    if bert is not None:
        text += (
            "\n## BERT-base size, 12 -> 3 groups\n\n"
            f"{bert['model']}, plan {bert['plan']}, unique parameters {bert['unique_params']['dense']:,} -> "
            f"{bert['unique_params']['shared']:,}.\n\n| file | MiB |\n|---|---|\n"
            + "".join(f"| {k} | {bert[k] / MIB:.1f} |\n" for k in
                      ("optimum ONNX fp32", "optimum ONNX int8", "shared 3 groups ONNX fp32",
                       "shared 3 groups, optimum's ORTQuantizer alone", "shared 3 groups ONNX int8"))
            + "\nProjections with an int8 weight after optimum's ORTQuantizer alone on the shared export: "
            + "{} of {} (the others read their weight through the exporter's Identity nodes and keep it in fp32); "
              "after `compress export --quantize int8`: "
              "{} of {}.\n".format(*(n for key in ("shared 3 groups, optimum's ORTQuantizer alone projections",
                                                     "shared 3 groups ONNX int8 projections")
                                     for n in (bert[key]["on_weights"] - bert[key]["float_on_weights"], bert[key]["on_weights"])))
        )
    text += "\n## Targets\n\n" + "".join(f"- {k}: {'passed' if v else 'NOT met'}\n" for k, v in targets.items())
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(text)
    chart(result, out / f"{args.name}.png", title=title)
    print(text)


if __name__ == "__main__":
    main()
