"""Benchmark: recovery of the bundled all-MiniLM-L6-v2 after sharing 6 layers into 3 groups.

Target (issue 4): the original scores about 0.77 with a logistic-regression probe on the movie
snippets (4,000 train, 2,000 test). After 6 -> 3 groups with LoRA and at most 10 minutes of CPU
fine-tuning (distillation from the original on the train-split texts, no labels), the
compressed model keeps at least 97% of the original's probe accuracy.

Run:  python benchmarks/bench_recovery.py --minutes 10
Writes reports/bench_recovery.json and reports/bench_recovery.md (use --name for other files).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="fine-tuning budget")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--train", default="lora+norms")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--plan", default="recommended", help='"recommended" (CKA analysis) or a plan like 0-1,2-3,4-5')
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--name", default="bench_recovery", help="report file name (without extension)")
    args = parser.parse_args()

    import torch

    from compressor.data.datasets import load_labelled, train_test_split
    from compressor.fidelity import fidelity
    from compressor.evaluation.probe import embed, probe_accuracy
    from compressor.finetune import FinetuneConfig, finetune
    from compressor.models import load_model
    from compressor.pipeline.compose import share  # --groups K: plans with the analysis first
    from compressor.sharing import ShareConfig

    texts, labels = load_labelled("movie-snippets")
    tr_x, tr_y, te_x, te_y = train_test_split(texts, labels, 4000, 2000, seed=0)
    teacher = load_model(None)

    def probe(loaded):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        a = embed(loaded, tr_x, max_length=64, device=device)
        b = embed(loaded, te_x, max_length=64, device=device)
        return probe_accuracy(a, tr_y, b, te_y)["accuracy"]

    t0 = time.perf_counter()
    original_acc = probe(teacher)
    plan_kw = {"groups": 3} if args.plan == "recommended" else {"plan": args.plan}
    student, share_record = share(copy.deepcopy(teacher), ShareConfig(lora_rank=args.rank, fidelity=False, **plan_kw))
    shared_acc = probe(student)
    shared_cos = fidelity(student, teacher, te_x[:500], max_length=64)["embedding_cosine"]

    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(t.replace("\n", " ") for t in tr_x))
        config = FinetuneConfig(data=str(train_file), train=args.train, max_minutes=args.minutes, max_steps=args.max_steps,
                                lr=args.lr, batch_size=args.batch_size, max_length=64, device=args.device, save_every=0)
        student, ft = finetune(student, config, output=Path(tmp) / "out", teacher=teacher, progress=False)
    tuned_acc = probe(student)
    tuned_fid = fidelity(student, teacher, te_x[:500], max_length=64)
    device_name = torch.cuda.get_device_name() if ft.metrics["device"].startswith("cuda") else (platform.processor() or platform.machine())

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/bench_recovery.py " + " ".join(sys.argv[1:])
    report = {
        "benchmark": "MiniLM 6 -> 3 groups + LoRA, distillation, probe accuracy on movie snippets (4000/2000)",
        "command": command, "commit": commit, "device": ft.metrics["device"], "device_name": device_name,
        "torch_threads": torch.get_num_threads(),
        "plan": share_record.metrics["plan"], "lora_rank": args.rank, "train": args.train, "lr": args.lr,
        "unique_params": {"original": share_record.params_before, "shared": share_record.params_after},
        "original_probe_accuracy": original_acc,
        "shared_probe_accuracy": shared_acc, "shared_embedding_cosine": shared_cos,
        "finetuned_probe_accuracy": tuned_acc, "finetuned_embedding_cosine": tuned_fid["embedding_cosine"],
        "kept_of_original": tuned_acc / original_acc,
        "finetune_steps": ft.metrics["steps"], "finetune_seconds": round(ft.seconds, 1),
        "seconds_per_step": ft.metrics["seconds_per_step"], "loss_first": ft.metrics["loss_first"],
        "loss_last": ft.metrics["loss_last"], "target_kept": 0.97, "passed": tuned_acc / original_acc >= 0.97,
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    out = ROOT / "reports"
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    r = report
    (out / f"{args.name}.md").write_text(
        f"# Benchmark: recovering all-MiniLM-L6-v2 after 6 -> 3 groups\n\n"
        f"Command: `{command}` (commit {commit}; device {r['device']}, {device_name}, {r['torch_threads']} threads)\n\n"
        f"Plan {r['plan']}, LoRA rank {r['lora_rank']}, training `{r['train']}`, lr {r['lr']}; distillation on the 4,000 "
        f"train-split texts (no labels); probe = logistic regression on frozen mean-pooled embeddings, 4,000 train / 2,000 test.\n\n"
        "| model | unique params | probe accuracy | of original | embedding cosine to original |\n|---|---|---|---|---|\n"
        f"| original | {r['unique_params']['original']:,} | {original_acc:.4f} | 100% | 1 |\n"
        f"| shared, no fine-tuning | {r['unique_params']['shared']:,} | {shared_acc:.4f} | {shared_acc / original_acc:.1%} | {shared_cos:.3f} |\n"
        f"| shared + {r['finetune_steps']} steps ({r['finetune_seconds'] / 60:.1f} min) | {r['unique_params']['shared']:,} "
        f"| {tuned_acc:.4f} | {tuned_acc / original_acc:.1%} | {tuned_fid['embedding_cosine']:.3f} |\n\n"
        f"Target: at least 97% of the original's accuracy: {'passed' if r['passed'] else 'NOT met'}.\n"
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
