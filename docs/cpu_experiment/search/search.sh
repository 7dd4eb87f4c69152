#!/usr/bin/env bash
# The search behind sh/cpu_experiment.sh's settings (docs/cpu_experiment.md): each line of PLAN is a run name and
# its train.py flags beside the fixed ones below (a one-layer CNN, Adam, the first 10,000 CIFAR-10 training
# images, eps 16/255, batch 128, PGD-10 every 79 iterations, the final PGD-50-1 on 500 points to save time);
# THREADS (default 1) threads a run, JOBS (default 2) runs at a time. Prints, a line a run, the overfitting
# detector's first firing and the last model's final numbers.
#
# Usage: bash docs/cpu_experiment/search/search.sh PLAN DATA_DIR OUT_DIR
set -euo pipefail
[ $# = 3 ] || { sed -n '2,8s/^# \{0,1\}//p' "$0" >&2; exit 2; }
PLAN=$(realpath "$1") DATA_DIR=$(realpath "$2") OUT_DIR=$(realpath -m "$3")
export OMP_NUM_THREADS=${THREADS:-1} DATA_DIR OUT_DIR PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/../../.."
mkdir -p "$OUT_DIR"
one() {  # one NAME FLAGS...: a run and its summary line
  local name=$1
  shift
  "$PYTHON" train.py --data_dir="$DATA_DIR" --out_dir="$OUT_DIR" --run_name="$name" --device=cpu --model=cnn \
    --batch_size=128 --n_train=10000 --eps=16 --eval_iter_freq=79 --n_final_eval=500 --final_n_restarts=1 \
    --eval_early_stopped_model "$@" > "$OUT_DIR/$name.out" 2>&1
  echo "$name: $(grep -E 'catastrophic|final +last' "$OUT_DIR/$name.out" | cut -c22- | tr '\n' ' ')"
}
export -f one
grep -v '^#' "$PLAN" | xargs -P "${JOBS:-2}" -L 1 bash -c 'one "$@"' one
