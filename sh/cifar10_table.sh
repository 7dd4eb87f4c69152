#!/usr/bin/env bash
# The paper's CIFAR-10 table at one eps on one machine: every row of sh/cifar10_table.tsv x every seed,
# PreActResNet-18 for 96 epochs, one run per GPU at a time (a queue per GPU), then the table over seeds.
#
# Usage: bash sh/cifar10_table.sh EPS GPU_IDS OUT_DIR [DATA_DIR]
#   EPS      8 or 16 (pixels/255)
#   GPU_IDS  comma-separated, e.g. 0,1,2,3; "cpu" runs a queue on the CPU (cpu,cpu: two queues)
#   OUT_DIR  parent of the run directories, e.g. runs/cifar10_eps8; each run logs to OUT_DIR/logs/RUN.log
#   DATA_DIR CIFAR-10 folder (default: data)
# Each run is isolated: a failed run is logged and its queue goes on. After a run's training, its last and
# early-stopped models get the official AutoAttack (standard) on the first AA_POINTS test points (default 10,000,
# RobustBench's; AA=0 skips it), a step of its own, isolated alike (log: OUT_DIR/logs/RUN.autoattack.log). At the
# end: a summary (finished, not finished with their logs, AutoAttack's likewise), OUT_DIR/table.md over what
# finished (AutoAttack beside PGD-50-10), and exit status 1 if any run or AutoAttack did not finish.
# Rerunning the same command completes the table: finished runs are skipped, interrupted ones continue from
# their checkpoint (train.py --resume_existing), missing ones start; AutoAttack likewise (eval.py keeps each
# finished attack). Ctrl-C stops every run at its next iteration
# with a checkpoint.
# Environment: DRY_RUN=1 prints the commands only; ESTIMATE=1 prints each row's projected wall time (train.py
# --estimate, on the first of GPU_IDS) and the table's, in all and on these GPUs, and runs nothing; ROWS (default: the paper's rows; "peers" the peers' rows, "all"
# both, or names such as "fgsm gradsum") and SEEDS="0 1" choose the runs; TINY=1 shrinks every run to a smoke
# test of minutes on a CPU (GPU_IDS cpu) and EXTRA_ARGS="--flag=value ..." adds flags to every run (last: they
# win); PYTHON (default python) runs train.py and report.py.
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 3 4 "$@"
EPS=$1
GPU_IDS=$2
OUT_DIR=$(absolute "$3")
DATA_DIR=$(absolute "${4:-data}")
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
check_eps "$EPS"
check_autoattack
[[ $GPU_IDS =~ ^(cpu|[0-9]+)(,(cpu|[0-9]+))*$ ]] || usage_error "GPU_IDS=$GPU_IDS: GPU numbers or cpu, comma-separated"

IFS=, read -r -a GPUS <<< "$GPU_IDS"
declare -a QUEUES=()  # one list of "run_name<TAB>seed<TAB>flags<TAB>device" per GPU
i=0
while IFS=$'\t' read -r name seed flags; do
  gpu=${GPUS[$((i % ${#GPUS[@]}))]}
  device=$([ "$gpu" = cpu ] && echo cpu || echo "cuda:$gpu")
  table_run "$OUT_DIR" "$DATA_DIR" "$EPS" "$name" "$seed" "$flags"
  echo "[gpu $gpu] $PYTHON ${RUN_ARGS[*]} --device=$device"
  QUEUES[$((i % ${#GPUS[@]}))]+="$name"$'\t'"$seed"$'\t'"$flags"$'\t'"$device"$'\n'
  i=$((i + 1))
done < <(table_plan "$EPS")
[ "${DRY_RUN:-0}" = 1 ] && exit 0
if [ "${ESTIMATE:-0}" = 1 ]; then  # each row measured once, on the first queue's device: its seeds cost the same
  device=$([ "${GPUS[0]}" = cpu ] && echo cpu || echo "cuda:${GPUS[0]}")
  declare -A row_s=()
  while IFS=$'\t' read -r name flags; do
    table_run "$OUT_DIR" "$DATA_DIR" "$EPS" "$name-estimate" 0 "$flags"
    line=$("$PYTHON" "${RUN_ARGS[@]}" --device="$device" --estimate | grep '^projected wall time:') \
      || refuse "ESTIMATE: train.py --estimate failed for row $name (run its command above without ESTIMATE)"
    row_s[$name]=$(awk '{print $4}' <<< "$line")
    echo "$name: $line"
  done < <(table_rows "$EPS")
  declare -a queue_s=()
  i=0 total=0
  while IFS=$'\t' read -r run _; do
    s=${row_s[${run%-eps*}]}
    queue_s[$((i % ${#GPUS[@]}))]=$(( ${queue_s[$((i % ${#GPUS[@]}))]:-0} + s ))
    total=$((total + s))
    i=$((i + 1))
  done < <(table_plan "$EPS")
  longest=$(printf '%s\n' "${queue_s[@]}" | sort -n | tail -n 1)
  echo "table eps $EPS: $i run(s), projected $total s ($((total / 3600)) h) of one device in all; on ${#GPUS[@]}" \
       "queue(s) ($GPU_IDS): $longest s ($((longest / 3600)) h $((longest % 3600 / 60)) min), the longest queue" \
       "(projections from train.py --estimate on $device, not measured runs)"
  exit 0
fi

STOPPING="$OUT_DIR/logs/.stopping"  # made by a stop signal: the queues start no further run
run_queue() {  # the runs of one queue, one after another
  local name seed flags device
  while IFS=$'\t' read -r name seed flags device; do
    [ -n "$name" ] && [ ! -e "$STOPPING" ] || continue
    table_run "$OUT_DIR" "$DATA_DIR" "$EPS" "$name" "$seed" "$flags"
    run_isolated "$OUT_DIR" "$name" "$PYTHON" "${RUN_ARGS[@]}" --device="$device"
    if [ "${AA:-1}" = 1 ] && finished "$OUT_DIR/$name" && [ ! -e "$STOPPING" ]; then
      DONE_CHECK=aa_finished run_isolated "$OUT_DIR" "$name.$AA_STEP" autoattack_step "$OUT_DIR/$name" "$device"
    fi
    # a run stopped by a signal stops every queue, even where this shell could not trap it (a script's
    # background job ignores Ctrl-C's SIGINT, which its train.py still receives)
    [[ $(run_status "$OUT_DIR" "$name") != "$STOPPED"* && $(run_status "$OUT_DIR" "$name.$AA_STEP") != "$STOPPED"* ]] \
      || touch "$STOPPING"
  done <<< "$1"
}

mkdir -p "$OUT_DIR/logs"
rm -f "$STOPPING"
while IFS=$'\t' read -r name _; do rm -f "$OUT_DIR/logs/$name.status" "$OUT_DIR/logs/$name.$AA_STEP.status"; done \
  < <(table_plan "$EPS")
pids=()
for q in "${!QUEUES[@]}"; do
  run_queue "${QUEUES[$q]}" &
  pids+=($!)
done
stop() {  # SIGINT or SIGTERM: each running train.py checkpoints at its next iteration and stops; no run starts
  touch "$STOPPING"
  for pid in "${pids[@]}"; do stop_children "$pid"; done
}
trap stop INT TERM
for pid in "${pids[@]}"; do wait_for "$pid"; done
summarise "$EPS" "$OUT_DIR"
