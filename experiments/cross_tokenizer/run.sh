#!/usr/bin/env bash
# The cross-tokenizer study (README.md): two teachers, four student regimes x 3 seeds, report.
#   experiments/cross_tokenizer/run.sh [WORKDIR] [small]      (from the repository root)
# Finished runs are skipped on a rerun (the sweep's own bookkeeping; teachers by their
# final_metrics.json).
set -euo pipefail
W=${1:-workdirs/cross_tokenizer}
SMALL=${2:+,small}
PY=(nice -n 5 .venv/bin/python)
CFG=experiments/cross_tokenizer/config.py
TOK=$W/bpe_tokenizer

[ -f "$TOK/tokenizer.json" ] || "${PY[@]}" experiments/cross_tokenizer/make_tokenizer.py "$TOK"
teacher() {   # teacher NAME [overrides...]
  local dir=$W/teacher_$1; shift
  [ -f "$dir/final_metrics.json" ] || "${PY[@]}" -m distill.main --config="$CFG:teacher$SMALL" \
      --workdir="$dir" "$@"
}
teacher char
teacher bpe --config.tokenizer="$TOK"

student() {   # student REGIME [overrides...]
  local regime=$1; shift
  "${PY[@]}" -m distill.sweep --config="$CFG:$regime$SMALL" --workdir="$W/$regime" \
      --sweep=seed=0,1,2 "$@"
}
student ground_truth
student kd --config.teacher.checkpoint="$W/teacher_char"
for loss in uld gold; do
  student "$loss" --config.teacher.checkpoint="$W/teacher_bpe" --config.teacher.tokenizer="$TOK"
done
"${PY[@]}" -m distill.report "$W/ground_truth" "$W/kd" "$W/uld" "$W/gold" --out="$W/report"
