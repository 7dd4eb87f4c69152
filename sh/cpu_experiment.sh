#!/usr/bin/env bash
# Catastrophic overfitting at small scale, on a CPU: the original's own one-layer CNN command (6 filters, Adam,
# lr 0.003, eps 10/255, 30 epochs, periodic PGD-10-1 once an epoch, seed 2022; its sh/exps_diff_eps_cifar10.sh)
# with plain FGSM, and the same with VFSAT and with GradSum (lambda 20); the final PGD-50-10 on the first 2,000
# test images (the original evaluates all 10,000, which takes this CPU 10 minutes a run). Prints the results table.
#
# Usage: bash sh/cpu_experiment.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  CIFAR-10 (image-folder layout or torchvision's python version), e.g. ../shared/data/cifar10-jpeg
#   OUT_DIR   parent of the run directories (default runs/cpu_experiment); finished runs are skipped,
#             interrupted ones continue from their checkpoint
# Environment: METHODS (default "fgsm fgsm-vfsat fgsm-gradsum") and TABLE_NAME (default table.md, in OUT_DIR) run
# other rows of METHOD_FLAGS into another table (sh/cpu_peers.sh); TINY=1 shrinks every run to a smoke test of
# seconds and EXTRA_ARGS="--flag=value ..." adds flags to every run (last: they win); PYTHON (default python).
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 1 2 "$@"
DATA_DIR=$(absolute "$1")
OUT_DIR=$(absolute "${2:-runs/cpu_experiment}")
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

COMMON=(--data_dir="$DATA_DIR" --out_dir="$OUT_DIR" --device=cpu --seed=2022
        --model=cnn --n_filters_cnn=6 --lr_max=0.003 --epochs=30 --batch_size=256 --batch_size_eval=1024
        --eps=10 --eval_iter_freq=195 --n_final_eval=2000 --eval_early_stopped_model)
declare -A METHOD_FLAGS=(  # presets: README, Presets
  [fgsm]="--preset=fgsm"
  [fgsm-vfsat]="--preset=vfsat"
  [fgsm-gradsum]="--preset=gradsum --grad_input_sum_coeff=20"
  [n-fgsm]="--preset=n_fgsm"  # the peers (docs/peers.md), with their authors' settings at eps 10
  [elle]="--preset=elle --elle_lambda=5000"  # ELLE's scripts: lambda 5000 from eps 10 to 20
  [gradsum-fd]="--preset=gradsum_fd --grad_input_sum_fd_coeff=20"  # GradSum's lambda above
)
read -r -a NAMES <<< "${METHODS:-fgsm fgsm-vfsat fgsm-gradsum}"
for name in "${NAMES[@]}"; do
  [ -n "${METHOD_FLAGS[$name]:-}" ] || usage_error "METHODS: $name is not one of ${!METHOD_FLAGS[*]}"
done
for name in "${NAMES[@]}"; do
  if finished "$OUT_DIR/$name"; then
    echo "= $name: finished already"
    continue
  fi
  cmd=("$PYTHON" train.py "${COMMON[@]}" ${METHOD_FLAGS[$name]} --run_name="$name" --resume_existing $(extra_flags))
  echo "+ ${cmd[*]}"
  "${cmd[@]}"
done
TABLE_MD=${TABLE_NAME:-table.md}
PLOTS=$OUT_DIR/plots
[ "$TABLE_MD" = table.md ] || PLOTS+="_${TABLE_MD%.md}"
"$PYTHON" report.py "${NAMES[@]/#/$OUT_DIR/}" --compare paper --out "$OUT_DIR/$TABLE_MD" --plots "$PLOTS"
