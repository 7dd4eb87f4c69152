#!/usr/bin/env bash
# The paper's binary-data study of catastrophic overfitting, on a CPU: deer against ship (cifar10_binary) with the
# original's one-layer CNN (6 filters, Adam, lr 0.003), zero-start FGSM at eps 32/255 for 30 epochs. Then, for the
# last model (after CO) and the early-stopped one (before it), the FGSM step-size sweep past eps (eval.py), the loss
# surfaces around the first two test images (surface.py), and the table, curves, sweeps and first-layer filters
# (report.py). About 10 minutes on 2 cores.
#
# Usage: bash sh/binary_study.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  CIFAR-10 (image-folder layout or torchvision's python version), e.g. ../shared/data/cifar10-jpeg
#   OUT_DIR   parent of the run directories (default runs/binary_study); a finished run is kept, an interrupted one continues
# Environment: THREADS (default 2, torch's own default on the 2-core machines that printed docs/analysis.md) CPU
# threads, PYTHON (default python).
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 1 2 "$@"
DATA_DIR=$(absolute "$1")
OUT_DIR=$(absolute "${2:-runs/binary_study}")
PYTHON=${PYTHON:-python}
pin_threads 2
cd "$(dirname "$0")/.."

COMMON=(--dataset=cifar10_binary --data_dir="$DATA_DIR" --out_dir="$OUT_DIR" --device=cpu --seed=0
        --model=cnn --n_filters_cnn=6 --lr_max=0.003 --epochs=30 --batch_size=256 --batch_size_eval=512
        --eps=32 --eval_iter_freq=39 --n_final_eval=1000 --eval_early_stopped_model)
run_dir="$OUT_DIR/fgsm"
if finished "$run_dir"; then
  echo "= $run_dir: trained already"
else
  cmd=("$PYTHON" train.py "${COMMON[@]}" --preset=fgsm --run_name=fgsm --resume_existing)  # presets: docs/iteration.md#presets
  echo "+ ${cmd[*]}"
  "${cmd[@]}"
fi
"$PYTHON" eval.py "$run_dir" --models last early_stopped --pgd 0 0 --n_points 1000 --fgsm_sweep $(seq 4 4 64)
"$PYTHON" surface.py "$run_dir" --models last early_stopped --n_images 2
"$PYTHON" report.py "$run_dir" --out "$OUT_DIR/table.md" --plots "$OUT_DIR/plots" --filters
