#!/usr/bin/env bash
# Every stage on a real model, as a user runs them: inspect -> analyze -> share -> finetune ->
# evaluate -> prune -> int8 export -> report. Each command's output and wall time go to
# reports/real_<name>/ (log.md), so the README's "real models run through the pipeline" rests on it.
#
#   bash benchmarks/real_pipeline.sh MODEL NAME "SHARE OPTIONS" "PRUNE OPTIONS"
#   bash benchmarks/real_pipeline.sh /tmp/smollm2 smollm2 "--groups 10 --lora-rank 16" "--ffn 0.25"
#   bash benchmarks/real_pipeline.sh bundled minilm "--groups 3 --lora-rank 16" "--heads 0.25 --ffn 0.5"
set -euo pipefail
MODEL=$1; NAME=$2; SHARE=$3; PRUNE=$4
STEPS=${STEPS:-20}
BIN=${BIN:-$(dirname "$0")/../.venv/bin}
OUT=${OUT:-out/real-$NAME}
REPORT=$(dirname "$0")/../reports/real_$NAME
mkdir -p "$OUT" "$REPORT"
LOG=$REPORT/log.md
echo "# Every stage on $NAME ($MODEL)" > "$LOG"
echo "" >> "$LOG"
echo "Made by \`STEPS=$STEPS bash benchmarks/real_pipeline.sh $MODEL $NAME \"$SHARE\" \"$PRUNE\"\` on $(nproc) cores, $(date -u +%F)." >> "$LOG"
step() {
  local title=$1; shift
  echo "" >> "$LOG"; echo "## $title" >> "$LOG"; echo "" >> "$LOG"
  echo '```' >> "$LOG"; echo "\$ compress $*" >> "$LOG"
  local start=$(date +%s.%N)
  "$BIN/compress" "$@" >> "$LOG" 2>&1
  local end=$(date +%s.%N)
  echo '```' >> "$LOG"
  printf '%.1f s\n' "$(echo "$end - $start" | bc)" >> "$LOG"
}
step inspect inspect "$MODEL"
step analyze analyze "$MODEL" ${ANALYZE:-} -o "$OUT/analyze" --overwrite
step share share "$MODEL" $SHARE -o "$OUT/shared" --overwrite
step finetune finetune "$OUT/shared" --data movie-snippets --max-steps "$STEPS" --batch-size 8 --max-length 64 --quiet -o "$OUT/finetuned" --overwrite
step evaluate evaluate "$MODEL" "$OUT/shared" "$OUT/finetuned" --data movie-snippets --max-length 64
step prune prune "$OUT/finetuned" $PRUNE -o "$OUT/pruned" --overwrite
step "export int8" export "$OUT/pruned" --quantize int8 -o "$OUT/onnx-int8" --overwrite
step report report "$OUT/onnx-int8" --original "$MODEL" --names "shared+pruned int8" --repeats 3 --batch-sizes 1,8 --seq-len 128 -o "$OUT/report" --overwrite
cp "$OUT/report/report.md" "$REPORT/report.md"
echo "done: $LOG"
