#!/usr/bin/env bash
# The paper's claim on a CPU in about half an hour: plain FGSM training overfits catastrophically, VFSAT and
# GradSum do not. The original's one-layer CNN (8 filters, Adam, lr 0.003) on the first 10,000 CIFAR-10 training
# images at eps 16/255 for 12 epochs (one cycle of VFSAT's own eps-16 list), zero-start FGSM with step eps, batch
# 128; FGSM, VFSAT, GradSum (lambda 10, the paper's at eps 16) and GradSum-FD (its cheap variant, lambda 10), each
# with seeds 0, 1 and 2; PGD-10 on 256 test and training points after every epoch (the overfitting detector), and
# the final PGD-50-10 (step eps/4) of the last and the kept models on the first 1,000 test images. The settings and
# the search that chose them: docs/cpu_experiment.md. Prints the table (mean ± std over seeds, each seed's
# overfitting epoch).
#
# Usage: bash sh/cpu_experiment.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  CIFAR-10 (image-folder layout or torchvision's python version), e.g. ../shared/data/cifar10-jpeg
#   OUT_DIR   parent of the run directories (default runs/cpu_experiment, or runs/cpu_original_cnn); finished
#             runs are skipped, interrupted ones continue from their checkpoint; OUT_DIR/logs/RUN.log is each
#             run's output
# Environment:
#   THREADS (default 1)  CPU threads of each run (OMP_NUM_THREADS): a CPU gives the same numbers for the same
#                        THREADS, and other numbers (other rounding) for another
#   JOBS (default 2)     runs at a time (xargs -P); THREADS x JOBS should not exceed the cores
#   PIN_KERNELS (default 1)  the CPU kernels pinned to AVX2 (kernels.py): any x86-64 CPU with AVX2 prints the
#                        same table to the digit at the same THREADS; 0 lets each library choose its own
#   EXPERIMENT           co (default, the above) or original_cnn: the original's own CNN command (its
#                        sh/exps_diff_eps_cifar10.sh: 6 filters, all 50,000 images, eps 10/255, 30 epochs, batch
#                        256, seed 2022, GradSum lambda 20; final evaluation on 2,000 points), which on most CPUs
#                        does not overfit catastrophically (docs/cpu_experiment.md)
#   SEEDS, METHODS       other seeds, other rows (of fgsm vfsat gradsum gradsum-fd n-fgsm elle)
#   TABLE_NAME           the table's file in OUT_DIR (default table.md; sh/cpu_peers.sh writes peers.md)
#   TINY=1               every run shrunk to a smoke test of seconds; EXTRA_ARGS="--flag=value ..." adds flags to
#                        every run (last: they win); PYTHON (default python)
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 1 2 "$@"
EXPERIMENT=${EXPERIMENT:-co}
case "$EXPERIMENT" in
  co)
    COMMON=(--model=cnn --n_filters_cnn=8 --lr_max=0.003 --n_train=10000 --eps=16 --epochs=12 --batch_size=128
            --eval_iter_freq=78 --n_final_eval=1000)
    LAMBDA=10 DEFAULT_SEEDS="0 1 2" DEFAULT_METHODS="fgsm vfsat gradsum gradsum-fd" ;;
  original_cnn)
    COMMON=(--model=cnn --n_filters_cnn=6 --lr_max=0.003 --eps=10 --epochs=30 --batch_size=256
            --eval_iter_freq=195 --n_final_eval=2000)
    LAMBDA=20 DEFAULT_SEEDS=2022 DEFAULT_METHODS="fgsm vfsat gradsum" ;;
  *) usage_error "EXPERIMENT=$EXPERIMENT: one of co, original_cnn" ;;
esac
DATA_DIR=$(absolute "$1")
OUT_DIR=$(absolute "${2:-runs/cpu_$([ "$EXPERIMENT" = co ] && echo experiment || echo "$EXPERIMENT")}")
PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || usage_error "JOBS=$JOBS: a positive whole number"
pin_threads 1
pin_kernels
cd "$(dirname "$0")/.."

COMMON+=(--data_dir="$DATA_DIR" --out_dir="$OUT_DIR" --device=cpu --batch_size_eval=1024
         --eval_early_stopped_model)
declare -A METHOD_FLAGS=(  # presets: docs/iteration.md#presets
  [fgsm]="--preset=fgsm"
  [vfsat]="--preset=vfsat"
  [gradsum]="--preset=gradsum --grad_input_sum_coeff=$LAMBDA"
  [gradsum-fd]="--preset=gradsum_fd --grad_input_sum_fd_coeff=$LAMBDA"  # GradSum's lambda, its norm by a difference
  [n-fgsm]="--preset=n_fgsm"  # the peers (docs/peers.md), with their authors' settings
  [elle]="--preset=elle --elle_lambda=5000"  # ELLE's scripts: lambda 5000 from eps 10 to 20
)
read -r -a NAMES <<< "${METHODS:-$DEFAULT_METHODS}"
read -r -a RUN_SEEDS <<< "$(table_seeds "$DEFAULT_SEEDS")"
for name in "${NAMES[@]}"; do
  [ -n "${METHOD_FLAGS[$name]:-}" ] || usage_error "METHODS: $name is not one of ${!METHOD_FLAGS[*]}"
done
for seed in "${RUN_SEEDS[@]}"; do
  [[ $seed =~ ^[0-9]+$ ]] || usage_error "SEEDS: $seed is not a whole number"
done

mkdir -p "$OUT_DIR/logs"
RUNS=() COMMANDS=()
for name in "${NAMES[@]}"; do
  for seed in "${RUN_SEEDS[@]}"; do
    run=$name-seed$seed
    RUNS+=("$OUT_DIR/$run")
    if finished "$OUT_DIR/$run"; then
      echo "= $run: finished already"
      continue
    fi
    cmd=("$PYTHON" train.py "${COMMON[@]}" --seed="$seed" ${METHOD_FLAGS[$name]} --run_name="$run" --resume_existing
         $(extra_flags))
    echo "+ ${cmd[*]}"
    log=$(printf %q "$OUT_DIR/logs/$run.log")
    # one line a run for xargs: the command, its output to its log, and its outcome on the terminal
    COMMANDS+=("$(printf '%q ' "${cmd[@]}")> $log 2>&1; s=\$?; echo \"= $run: exit \$s (log: \"$log\")\"; exit \$s")
  done
done
echo "${#COMMANDS[@]} run(s) to do, $JOBS at a time, $THREADS thread(s) each ($CORES cores here)"
failed=0
[ ${#COMMANDS[@]} = 0 ] || printf '%s\0' "${COMMANDS[@]}" | xargs -0 -P "$JOBS" -I CMD bash -c CMD || failed=1
TABLE_MD=${TABLE_NAME:-table.md}
PLOTS=$OUT_DIR/plots
[ "$TABLE_MD" = table.md ] || PLOTS+="_${TABLE_MD%.md}"
STARTED=()
for run in "${RUNS[@]}"; do [ ! -e "$run/metrics.jsonl" ] || STARTED+=("$run"); done
[ ${#STARTED[@]} = 0 ] || "$PYTHON" report.py "${STARTED[@]}" --out "$OUT_DIR/$TABLE_MD" --plots "$PLOTS"
[ $failed = 0 ] || { echo "$(basename "$0"): some runs did not finish: see their logs above" >&2; exit 1; }
