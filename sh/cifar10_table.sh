#!/usr/bin/env bash
# The paper's CIFAR-10 table at one eps: PreActResNet-18, 96 epochs, every method x every seed, one run per GPU
# at a time (runs queue per GPU), then the table over seeds.
#
# Usage: bash sh/cifar10_table.sh EPS GPU_IDS OUT_DIR [DATA_DIR]
#   EPS      8 or 16 (pixels/255)
#   GPU_IDS  comma-separated, e.g. 0,1,2,3 (use "cpu" to run on the CPU, one run at a time)
#   OUT_DIR  parent of the run directories, e.g. runs/cifar10_eps8
#   DATA_DIR CIFAR-10 folder (default: data)
# DRY_RUN=1 prints the commands without running them. Edit METHODS and SEEDS below to change the table.
set -euo pipefail
EPS=${1:?usage: bash sh/cifar10_table.sh EPS GPU_IDS OUT_DIR [DATA_DIR]}
GPU_IDS=${2:?usage: bash sh/cifar10_table.sh EPS GPU_IDS OUT_DIR [DATA_DIR]}
OUT_DIR=${3:?usage: bash sh/cifar10_table.sh EPS GPU_IDS OUT_DIR [DATA_DIR]}
DATA_DIR=${4:-data}
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."

SEEDS=(0 1998 2022)
PGD2_STEP=$((EPS / 2))    # pixels/255
PGD10_STEP=$((EPS / 4))   # pixels/255
GRADALIGN_LAMBDA=$([ "$EPS" -ge 16 ] && echo 2.0 || echo 0.2)  # the GradAlign paper's values at eps 16 and 8
GRADSUM_COEFF=10
FGSM="--attack=fgsm --attack_init=zero --fgsm_alpha=1.0"
declare -A METHODS=(
  [fgsm]="$FGSM"
  [vfsat]="$FGSM --discrete_eps"
  [gradalign]="$FGSM --grad_align_cos_lambda=$GRADALIGN_LAMBDA"
  [gradsum]="$FGSM --grad_input_sum_coeff=$GRADSUM_COEFF"
  [pgd2]="--attack=pgd --attack_init=random --pgd_train_n_iters=2 --pgd_alpha_train=$PGD2_STEP"
  [pgd10]="--attack=pgd --attack_init=random --pgd_train_n_iters=10 --pgd_alpha_train=$PGD10_STEP"
  [pgd10-gradsum]="--attack=pgd --attack_init=random --pgd_train_n_iters=10 --pgd_alpha_train=$PGD10_STEP --grad_input_sum_coeff=$GRADSUM_COEFF"
)
COMMON="--data_dir=$DATA_DIR --out_dir=$OUT_DIR --model=resnet18 --eps=$EPS --epochs=96 --batch_size=256
        --lr_max=0.04 --eval_iter_freq=200 --attack_iters=50 --n_restarts=10 --batch_size_eval=1024
        --eval_early_stopped_model --n_final_eval=-1 --start_eval_epoch=0"

IFS=, read -r -a GPUS <<< "$GPU_IDS"
declare -a QUEUES=()  # one list of commands per GPU
i=0
for method in fgsm vfsat gradalign gradsum pgd2 pgd10 pgd10-gradsum; do
  for seed in "${SEEDS[@]}"; do
    gpu=${GPUS[$((i % ${#GPUS[@]}))]}
    device=$([ "$gpu" = cpu ] && echo cpu || echo "cuda:$gpu")
    cmd="$PYTHON train.py $COMMON ${METHODS[$method]} --seed=$seed --device=$device --run_name=$method-eps$EPS-seed$seed"
    cmd=$(echo $cmd)  # one line
    echo "[gpu $gpu] $cmd"
    QUEUES[$((i % ${#GPUS[@]}))]+="$cmd"$'\n'
    i=$((i + 1))
  done
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0

mkdir -p "$OUT_DIR"
for q in "${!QUEUES[@]}"; do
  (while read -r cmd; do [ -n "$cmd" ] && $cmd; done <<< "${QUEUES[$q]}") > "$OUT_DIR/queue$q.out" 2>&1 &
done
wait
"$PYTHON" report.py "$OUT_DIR"/*-eps"$EPS"-seed* --out "$OUT_DIR/table.md"
