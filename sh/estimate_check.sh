#!/usr/bin/env bash
# train.py --estimate against a real run: projects a short CPU run (the original's CNN command with FGSM,
# EPOCHS epochs, the last model's final evaluation: how many kept models are distinct is known only afterwards),
# then runs it, and prints the projection, the measured wall time of the whole process and of timing.json, their
# ratio (the projection should be within 15%) and whether the measured run lies in the projected range.
# The run the README's claim rests on, dominated by the table's periodic PGD-50-10, scaled down to the CNN:
#   METHOD="--preset=gradsum --grad_input_sum_coeff=20" EXTRA_ARGS="--eval_iter_freq=20 --attack_iters=50
#   --n_restarts=10 --n_final_eval=500" EPOCHS=1 bash sh/estimate_check.sh ../shared/data/cifar10-jpeg
#
# Usage: bash sh/estimate_check.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  CIFAR-10 (image-folder layout or torchvision's), e.g. ../shared/data/cifar10-jpeg
#   OUT_DIR   where the run goes (default runs/estimate_check; its run is replaced)
# Environment: EPOCHS (default 3), METHOD flags (default --preset=fgsm), PYTHON (default python), and the thread
# count of torch (OMP_NUM_THREADS) as for any run.
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 1 2 "$@"
DATA_DIR=$(absolute "$1")
OUT_DIR=$(absolute "${2:-runs/estimate_check}")
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
FLAGS=(train.py --data_dir="$DATA_DIR" --out_dir="$OUT_DIR" --run_name=run --device=cpu --seed=2022 --model=cnn
       --n_filters_cnn=6 --lr_max=0.003 --epochs="${EPOCHS:-3}" --batch_size=256 --batch_size_eval=1024 --eps=10
       --eval_iter_freq=195 --n_final_eval=2000 ${METHOD:---preset=fgsm} $(extra_flags))
rm -rf "$OUT_DIR/run"
echo "+ $PYTHON ${FLAGS[*]} --estimate"
projection=$("$PYTHON" "${FLAGS[@]}" --estimate)
echo "$projection"
projected=$(sed -n 's/^projected wall time: \([0-9]*\) s.*/\1/p' <<< "$projection")
echo "+ $PYTHON ${FLAGS[*]}"
start=$(date +%s%N)
"$PYTHON" "${FLAGS[@]}" > /dev/null
measured_ms=$((($(date +%s%N) - start) / 1000000))
range=$(sed -n "s/^the run's wall time lies between \([0-9]*\) and \([0-9]*\) s.*/\1 \2/p" <<< "$projection")
awk -v p="$projected" -v ms="$measured_ms" -v t="$(cat "$OUT_DIR/run/timing.json")" -v range="$range" 'BEGIN {
  split(range, r, " "); s = ms / 1000
  printf "projected %d s; measured %.0f s for the whole process (timing.json: %s); projected / measured = %.2f\n",
         p, s, t, p / s
  printf "the projected range %d to %d s %s the measured %.0f s\n", r[1], r[2],
         (r[1] <= s && s <= r[2]) ? "holds" : "does NOT hold", s }'
