#!/usr/bin/env bash
# The paper's CIFAR-10 table at one eps: PreActResNet-18, 96 epochs, every method x every seed, one run per GPU
# at a time (runs queue per GPU), then the table over seeds. The hyper-parameters are those of the original
# repository's results file (result/实验结果.md); each METHODS line names the row it reproduces.
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
PGD="--preset=pgd"  # from a zero start, as the original's scripts train PGD (README: Presets)
declare -a NAMES=()
declare -A METHODS=()
add() { NAMES+=("$1"); METHODS[$1]=$2; }
add fgsm "--preset=fgsm"                                                 # FGSM-AT
add vfsat "--preset=vfsat"                                               # VFS-AT
add gradsum "--preset=gradsum"                                           # GradSum (lambda 10)
case "$EPS" in
  8)
    add gradalign "--preset=gradalign --grad_align_cos_lambda=20"        # GradAlign (the original's eps-8 script: 20)
    add pgd2-a4 "$PGD --pgd_train_n_iters=2 --pgd_alpha_train=4"         # PGD-2 (alpha=4)
    add pgd2-a6 "$PGD --pgd_train_n_iters=2 --pgd_alpha_train=6"         # PGD-2 (alpha=6)
    add pgd8-a1 "$PGD --pgd_train_n_iters=8 --pgd_alpha_train=1"         # PGD-8 (alpha=1)
    add pgd10-a1.6 "$PGD --pgd_train_n_iters=10 --pgd_alpha_train=1.6"   # PGD-10 (alpha=1.6)
    add pgd2-a4-gradsum "$PGD --pgd_train_n_iters=2 --pgd_alpha_train=4 --grad_input_sum_coeff=1.7"  # PGD-2(4)+GradSum(1.7)
    add pgd10-a1.6-gradsum "$PGD --pgd_train_n_iters=10 --pgd_alpha_train=1.6 --grad_input_sum_coeff=1.0"  # PGD-10(1.6)+GradSum(1.0)
    ;;
  16)
    add gradalign "--preset=gradalign --grad_align_cos_lambda=24"        # GradAlign (lambda=24)
    add pgd2-a8 "$PGD --pgd_train_n_iters=2 --pgd_alpha_train=8"         # PGD-2 (alpha=8)
    add pgd10-a3.2 "$PGD --pgd_train_n_iters=10 --pgd_alpha_train=3.2"   # PGD-10 (alpha=3.2)
    add pgd10-a3.2-gradsum "$PGD --pgd_train_n_iters=10 --pgd_alpha_train=3.2 --grad_input_sum_coeff=1.4"  # PGD-10(3.2)+GradSum(1.4)
    ;;
  *) echo "sh/cifar10_table.sh: EPS=$EPS: the results file has tables for eps 8 and 16 only" >&2; exit 2 ;;
esac
COMMON="--data_dir=$DATA_DIR --out_dir=$OUT_DIR --model=resnet18 --eps=$EPS --epochs=96 --batch_size=256
        --lr_max=0.04 --eval_iter_freq=200 --attack_iters=50 --n_restarts=10 --batch_size_eval=1024
        --eval_early_stopped_model --n_final_eval=-1 --start_eval_epoch=0"

IFS=, read -r -a GPUS <<< "$GPU_IDS"
declare -a QUEUES=()  # one list of commands per GPU
i=0
for method in "${NAMES[@]}"; do
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
