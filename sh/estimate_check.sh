#!/usr/bin/env bash
# train.py --estimate against a real run: projects a short CPU run (the CPU experiment's CNN command with FGSM,
# EPOCHS epochs, the last model's final evaluation: how many kept models are distinct is known only afterwards),
# then runs it, and prints the projection, the measured wall time of the whole process and of timing.json, and
# their ratio (the projection should be within 15%).
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
awk -v p="$projected" -v ms="$measured_ms" -v t="$(cat "$OUT_DIR/run/timing.json")" 'BEGIN {
  printf "projected %d s; measured %.0f s for the whole process (timing.json: %s); projected / measured = %.2f\n",
         p, ms / 1000, t, p / (ms / 1000) }'
