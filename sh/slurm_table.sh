#!/usr/bin/env bash
# The paper's CIFAR-10 table at one eps on a Slurm cluster: one array task per run (row x seed of
# sh/cifar10_table.tsv), an array task per run for its AutoAttack (started once that run's task succeeded), then a
# job that writes the table once every task has ended.
#
# Usage: bash sh/slurm_table.sh EPS OUT_DIR [DATA_DIR]
#   EPS      8 or 16 (pixels/255)
#   OUT_DIR  parent of the run directories, on storage that every node sees; logs in OUT_DIR/logs/
#   DATA_DIR CIFAR-10 folder (default: data), seen by every node
# Each task runs sh/slurm_table.sbatch: a run that finished exits at once, an interrupted one continues from its
# checkpoint. Slurm signals a task SIGNAL_LEAD_S seconds before its time limit: train.py checkpoints, and the task
# requeues itself; a preempted task (SIGTERM) checkpoints too and resumes when Slurm requeues it. A task whose run
# failed ends FAILED (and its AutoAttack task is cancelled). The AutoAttack task (AA=1, the default; AA=0: none)
# evaluates the run's last and early-stopped models with the official AutoAttack (standard) on the first
# AA_POINTS test points (default 10,000), under its own AA_TIME_LIMIT (default 06:00:00), signal and requeue
# (eval.py keeps each finished attack). Submitting the same command again runs what is not finished and writes
# the table again.
# Before submitting, the partition's nodes are checked (sinfo): a request they cannot meet is refused, naming the
# variable to change.
# Environment (none is edited in a file): PARTITION, ACCOUNT (default: the cluster's), TIME_LIMIT per task
# (default 12:00:00), AA, AA_POINTS and AA_TIME_LIMIT (above), GPUS_PER_RUN (default 1; more: one torchrun group
# per run; 0: on CPUs, gloo), CPUS_PER_GPU (default 8; CPUs of a task with GPUS_PER_RUN=0), SIGNAL_LEAD_S (default
# 300), ROWS and SEEDS (part of the table, as sh/cifar10_table.sh), TINY=1 and EXTRA_ARGS (a smoke test, as
# sh/cifar10_table.sh), PYTHON (default python), DRY_RUN=1 (print the sbatch commands only).
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 2 3 "$@"
EPS=$1
OUT_DIR=$(absolute "$2")
DATA_DIR=$(absolute "${3:-data}")
cd "$(dirname "$0")/.."
check_eps "$EPS"
check_autoattack
AA_TIME_LIMIT=${AA_TIME_LIMIT:-06:00:00}
GPUS_PER_RUN=${GPUS_PER_RUN:-1}
CPUS_PER_GPU=${CPUS_PER_GPU:-8}
TIME_LIMIT=${TIME_LIMIT:-12:00:00}
[[ $GPUS_PER_RUN =~ ^[0-9]+$ ]] || usage_error "GPUS_PER_RUN=$GPUS_PER_RUN: a number (0: on CPUs)"
[[ $CPUS_PER_GPU =~ ^[1-9][0-9]*$ ]] || usage_error "CPUS_PER_GPU=$CPUS_PER_GPU: a positive number"
cpus=$((CPUS_PER_GPU * (GPUS_PER_RUN > 0 ? GPUS_PER_RUN : 1)))
if [ "${DRY_RUN:-0}" != 1 ]; then
  check_partition "$cpus" "$GPUS_PER_RUN" "$TIME_LIMIT"
  [ "${AA:-1}" = 0 ] || check_partition "$cpus" "$((GPUS_PER_RUN > 0 ? 1 : 0))" "$AA_TIME_LIMIT" AA_TIME_LIMIT
fi
n_runs=$(table_plan "$EPS" | wc -l)
opts=(--parsable --job-name="fast-at-eps$EPS" --time="$TIME_LIMIT" --nodes=1 --ntasks=1 --cpus-per-task="$cpus"
      ${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"})
[ "$GPUS_PER_RUN" = 0 ] || opts+=(--gpus-per-task="$GPUS_PER_RUN")
# --export: the task sees the same table (ROWS, SEEDS, TINY, EXTRA_ARGS) and the same launcher (PYTHON, GPUS_PER_RUN)
export ROWS="${ROWS:-}" SEEDS="${SEEDS:-}" TINY="${TINY:-0}" EXTRA_ARGS="${EXTRA_ARGS:-}" PYTHON="${PYTHON:-python}"
export GPUS_PER_RUN AA="${AA:-1}" AA_POINTS="$(aa_points)"
tasks=(--array="0-$((n_runs - 1))" --signal="B:USR1@${SIGNAL_LEAD_S:-300}" --requeue --open-mode=append --export=ALL)
array=(sbatch "${opts[@]}" "${tasks[@]}" --output="$OUT_DIR/logs/slurm-%A_%a.out"
       sh/slurm_table.sbatch "$EPS" "$OUT_DIR" "$DATA_DIR")
# task i of the AutoAttack array starts once task i of the training array succeeded (aftercorr), else is cancelled
aa_opts=("${opts[@]/--time=$TIME_LIMIT/--time=$AA_TIME_LIMIT}")
aa_opts=("${aa_opts[@]/--gpus-per-task=*/--gpus-per-task=1}")  # eval.py runs one process
aa_opts=("${aa_opts[@]/--job-name=*/--job-name=fast-at-eps$EPS-autoattack}")
autoattack=(sbatch "${aa_opts[@]}"
            "${tasks[@]}" --dependency="aftercorr:JOB" --kill-on-invalid-dep=yes
            --output="$OUT_DIR/logs/slurm-autoattack-%A_%a.out" sh/slurm_table.sbatch --autoattack "$EPS" "$OUT_DIR" "$DATA_DIR")
report=(sbatch --parsable --job-name="fast-at-eps$EPS-table" --time=00:30:00 --ntasks=1 --cpus-per-task=1
        ${PARTITION:+--partition="$PARTITION"} ${ACCOUNT:+--account="$ACCOUNT"} --dependency="afterany:JOBS"
        --output="$OUT_DIR/logs/slurm-table-%j.out" --export=ALL sh/slurm_table.sbatch --table "$EPS" "$OUT_DIR" "$DATA_DIR")
echo "+ ${array[*]}"
if [ "${DRY_RUN:-0}" = 1 ]; then
  [ "$AA" = 0 ] || echo "+ ${autoattack[*]}"
  echo "+ ${report[*]}"
  exit 0
fi
mkdir -p "$OUT_DIR/logs"
job=$("${array[@]}")
job=${job%%;*}  # --parsable: "id" or "id;cluster"
jobs=$job
if [ "$AA" = 1 ]; then
  autoattack=("${autoattack[@]/aftercorr:JOB/aftercorr:$job}")
  echo "+ ${autoattack[*]}"
  aa_job=$("${autoattack[@]}")
  jobs="$job:${aa_job%%;*}"
fi
report=("${report[@]/afterany:JOBS/afterany:$jobs}")
echo "+ ${report[*]}"
table_job=$("${report[@]}")
echo "submitted array job $job ($n_runs runs)$([ "$AA" = 0 ] || echo ", AutoAttack array job ${aa_job%%;*} (each task" \
  "after its run's)") and table job ${table_job%%;*} (after them): $OUT_DIR/table.md"
