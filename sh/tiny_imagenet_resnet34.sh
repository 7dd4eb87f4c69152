#!/usr/bin/env bash
# Tiny ImageNet (200 classes, 64 px) with PreActResNet-34 on several GPUs of one machine, one torchrun per run:
# every method x every seed in turn, each run data-parallel over all the given GPUs. The hyper-parameters are the
# original's single-GPU script (sh/exps_diff_eps_imagenet.sh): lr 0.05, batch 64, 96 epochs, periodic PGD-7-1 every
# 40000 iterations, final PGD-50-10. --batch_size is the global batch, split over the GPUs (64 / N each).
#
# Usage: bash sh/tiny_imagenet_resnet34.sh GPU_IDS OUT_DIR [DATA_DIR]
#   GPU_IDS  comma-separated, e.g. 0,1,2,3
#   OUT_DIR  parent of the run directories, e.g. runs/tiny_imagenet
#   DATA_DIR holds (or receives, downloaded) tiny-imagenet-200/ (default: data)
# DRY_RUN=1 prints the commands without running them.
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 2 3 "$@"
GPU_IDS=$1
OUT_DIR=$(absolute "$2")
DATA_DIR=$(absolute "${3:-data}")
[[ $GPU_IDS =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "GPU_IDS=$GPU_IDS: GPU numbers, comma-separated"
cd "$(dirname "$0")/.."

EPS=8
SEEDS=(0 1998 2022)
declare -A METHODS=(  # presets: docs/iteration.md#presets
  [fgsm]="--preset=fgsm"
  [vfsat]="--preset=vfsat"
  [gradsum]="--preset=gradsum"
  [pgd2-a4]="--preset=pgd --pgd_train_n_iters=2 --pgd_alpha_train=4"
)
N_GPUS=$(tr ',' '\n' <<< "$GPU_IDS" | wc -l)
COMMON="--dataset=tiny_imagenet --data_dir=$DATA_DIR --out_dir=$OUT_DIR --model=resnet34 --eps=$EPS --epochs=96
        --batch_size=64 --lr_max=0.05 --eval_iter_freq=40000 --attack_iters=7 --n_restarts=1
        --batch_size_eval=128 --eval_early_stopped_model --n_final_eval=-1"
for method in fgsm vfsat gradsum pgd2-a4; do
  for seed in "${SEEDS[@]}"; do
    cmd="torchrun --standalone --nproc_per_node=$N_GPUS train.py $COMMON ${METHODS[$method]} --seed=$seed
         --run_name=tiny-resnet34-$method-eps$EPS-seed$seed"
    cmd=$(echo $cmd)
    echo "CUDA_VISIBLE_DEVICES=$GPU_IDS $cmd"
    [ "${DRY_RUN:-0}" = 1 ] || CUDA_VISIBLE_DEVICES=$GPU_IDS $cmd
  done
done
[ "${DRY_RUN:-0}" = 1 ] || ${PYTHON:-python} report.py "$OUT_DIR"/tiny-resnet34-* --out "$OUT_DIR/table.md"
