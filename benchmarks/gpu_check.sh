#!/usr/bin/env bash
# The CUDA path end to end on one GPU, in under 10 minutes (issue 35): the device tool's machine
# or any CUDA box. Not part of `make test` (CI has no GPU).
#
#   bash benchmarks/gpu_check.sh [MODEL_DIR]       # figures to $OUT (else reports/gpu_check/)
#
# MODEL_DIR: a decoder folder (SmolLM2-135M from benchmarks/build_smollm2.py); without one, a
# decoder of SmolLM2-135M's shape with seeded random bf16 weights is built from its config (the
# GPU machine reaches no hub). Steps, each timed, each one's exit code kept:
#   1. share 30 -> 15 groups with rank-16 deltas (CPU);
#   2. distil on the GPU: 60 steps, 32 texts x 128 tokens, bf16 autocast (tokens/s from the record);
#   3. the same run's first 3 steps on the CPU (float32): losses side by side with the GPU's;
#   4. 10 steps launched by torchrun on the one GPU (--backend nccl; a world of one runs as one process);
#   5. export the distilled model to ONNX fp16, checked against PyTorch.
set -u
HERE="$(cd "$(dirname "$0")/.." && pwd)"
cd "$HERE"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$HERE/reports/gpu_check}"
WORK="${WORK:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR" "$WORK"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
C=("$PY" -c "from cli.main import main; main()")
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$LOG" 2>&1
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)" >> "$LOG" 2>&1

MODEL="${1:-}"
if [ -z "$MODEL" ]; then
  MODEL="$WORK/smollm2-shape"
  "$PY" - "$MODEL" >> "$LOG" 2>&1 <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from bench_scale import SHAPES, build
SHAPES["smollm2"] = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)
from pathlib import Path
build("smollm2", Path(sys.argv[1]), None)
EOF
fi

step() {  # step NAME COMMAND...: run it, log it, keep its exit code and seconds
  local name="$1"; shift
  echo "### $name: $*" >> "$LOG"
  local t0; t0=$(date +%s.%N)
  "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $(echo "$(date +%s.%N) - $t0" | bc)}" >> "$OUT_DIR/steps.jsonl"
  return $rc
}
rm -f "$OUT_DIR/steps.jsonl"
RUN=(--teacher "$MODEL" --data movie-snippets --batch-size 32 --max-length 128 --lr 1e-3 --save-every 0 --quiet --overwrite)
step share "${C[@]}" share "$MODEL" --groups 15 --lora-rank 16 --no-fidelity -o "$WORK/shared" --overwrite
step finetune_cuda "${C[@]}" finetune "$WORK/shared" "${RUN[@]}" --max-steps 60 --device cuda -o "$WORK/tuned-cuda"
step finetune_cpu_3 "${C[@]}" finetune "$WORK/shared" "${RUN[@]}" --max-steps 3 --device cpu -o "$WORK/tuned-cpu"
step finetune_torchrun "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m cli.main finetune \
  "$WORK/shared" "${RUN[@]}" --max-steps 10 --backend nccl -o "$WORK/tuned-torchrun"
step export_fp16 "${C[@]}" export "$WORK/tuned-cuda" --fp16 -o "$WORK/onnx-fp16" --overwrite

"$PY" - "$WORK" "$OUT_DIR" <<'EOF' >> "$LOG" 2>&1
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def record(name):
    f = work / name / "finetune_report.json"
    return json.loads(f.read_text())["metrics"] if f.is_file() else None
cuda, cpu, ddp = record("tuned-cuda"), record("tuned-cpu"), record("tuned-torchrun")
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
result = {"steps": steps}
if cuda:
    tokens = 32 * 128  # padded tokens a step, at most
    result["cuda"] = {"seconds_per_step": cuda["seconds_per_step"], "tokens_per_s_at_most": tokens / cuda["seconds_per_step"],
                      "loss_first": cuda["loss_first"], "loss_last": cuda["loss_last"], "memory": cuda["memory"]}
if cuda and cpu:
    pairs = list(zip(cuda["history"][:3], cpu["history"][:3]))
    result["first_steps_cuda_vs_cpu"] = [{"step": a["step"], "cuda": a["loss"], "cpu": b["loss"],
                                          "relative": abs(a["loss"] - b["loss"]) / abs(b["loss"])} for a, b in pairs]
if ddp:
    result["torchrun"] = ddp["distributed"] | {"seconds_per_step": ddp["seconds_per_step"]}
report = work / "onnx-fp16" / "export_report.json"
if report.is_file():
    result["export_fp16"] = json.loads(report.read_text())["metrics"].get("check")
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
EOF
cat "$OUT_DIR/gpu_check.json" 2>/dev/null
