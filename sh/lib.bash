# Helpers of the sh/ scripts, sourced (not run) from them: usage and argument checks, the table's runs
# (sh/cifar10_table.tsv), one isolated run, and the summary of a table.

usage() {  # the calling script's header comment, without its '#'s
  awk 'NR > 1 && /^#/ && !/^#SBATCH/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
}

usage_error() {  # usage_error MESSAGE: the message and the usage on stderr, exit 2
  echo "$(basename "$0"): $1" >&2
  usage >&2
  exit 2
}

help_or_args() {  # help_or_args MIN MAX "$@": --help prints the usage (exit 0); a wrong count or an option-like word exits 2
  local min=$1 max=$2 arg
  shift 2
  for arg in "$@"; do
    case "$arg" in
      -h|--help) usage; exit 0 ;;
      -*) usage_error "$arg: not an argument (this script takes none of the form -x; see the usage)" ;;
    esac
  done
  [ $# -ge "$min" ] && [ $# -le "$max" ] || usage_error "expected $min to $max arguments, got $#"
}

pin_threads() {  # pin_threads DEFAULT: THREADS (else DEFAULT) CPU threads a run (exported as OMP_NUM_THREADS, which
  # train.py records in args.json: a CPU gives the same numbers for the same count), and CORES, this machine's cores
  THREADS=${THREADS:-$1}
  [[ $THREADS =~ ^[1-9][0-9]*$ ]] || usage_error "THREADS=$THREADS: a positive whole number"
  CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys both
  export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
}

pin_kernels() {  # PIN_KERNELS (default 1): the CPU kernels of kernels.PINNED, with which every x86-64 CPU with AVX2
  # computes the same bits at the same THREADS (train.py records them in args.json); PIN_KERNELS=0 leaves each
  # library its own choice
  PIN_KERNELS=${PIN_KERNELS:-1}
  case "$PIN_KERNELS" in
    1) eval "$("${PYTHON:-python}" "$(dirname "${BASH_SOURCE[0]}")/../kernels.py")" ;;
    0) ;;
    *) usage_error "PIN_KERNELS=$PIN_KERNELS: 1 (the default) or 0" ;;
  esac
}

absolute() {  # a path made absolute (from the caller's folder, before the script changes it)
  realpath -m -- "$1"
}

TABLE=sh/cifar10_table.tsv

table_rows() {  # table_rows EPS: "name<TAB>flags" of each row at EPS, the 'common' row left out; ROWS chooses:
  # unset or "paper" the rows of the paper's table, "peers" the others (no paper row), "all" both, else names
  awk -F'\t' -v eps="$1" -v keep=" ${ROWS:-paper} " '
    !/^#/ && ($1 == eps || $1 == "*") && $2 != "common" &&
    (keep == " all " || (keep == " paper " && $4 != "-") || (keep == " peers " && $4 == "-") || index(keep, " " $2 " ")) {
      print $2 "\t" $3
    }
  ' "$TABLE"
}

common_flags() {  # the flags of the 'common' row
  awk -F'\t' '!/^#/ && $2 == "common" {print $3}' "$TABLE"
}

table_eps() {  # the eps values that the table has rows for
  awk -F'\t' '!/^#/ && $1 != "*" {print $1}' "$TABLE" | sort -nu | tr '\n' ' '
}

table_seeds() {  # table_seeds [DEFAULT]: SEEDS, else DEFAULT (the paper's three when none), one under TINY=1
  if [ -n "${SEEDS:-}" ]; then echo "$SEEDS"; elif [ "${TINY:-0}" = 1 ]; then echo 0; else echo "${1:-0 1998 2022}"; fi
}

# TINY=1: every run of a script shrunk to a smoke test of minutes on a CPU (a 4-filter CNN, one epoch of 512
# images, evaluations of 64 points), to try a machine's or a cluster's pipeline before spending GPU hours
TINY_FLAGS="--model=cnn --n_filters_cnn=4 --epochs=1 --n_train=512 --batch_size=64 --batch_size_eval=64
  --eval_iter_freq=4 --n_eval_every_k_iter=64 --attack_iters=2 --n_restarts=1 --final_attack_iters=2
  --final_n_restarts=1 --n_final_eval=64 --lr_max=0.01"

extra_flags() {  # the flags appended to every run, last (so they win): TINY's, then EXTRA_ARGS
  if [ "${TINY:-0}" = 1 ]; then echo "$TINY_FLAGS"; fi
  echo "${EXTRA_ARGS:-}"
}

table_plan() {  # table_plan EPS: "run_name<TAB>seed<TAB>flags" of every run, each of table_seeds
  local name flags seed
  while IFS=$'\t' read -r name flags; do
    for seed in $(table_seeds); do
      printf '%s\t%s\t%s\n' "$name-eps$1-seed$seed" "$seed" "$flags"
    done
  done < <(table_rows "$1")
}

check_eps() {  # check_eps EPS: a usage error unless the table has rows at EPS (ROWS and SEEDS applied)
  [[ " $(table_eps) " == *" $1 "* ]] || usage_error "EPS=$1: the table has rows at eps $(table_eps)only"
  [ -n "$(table_plan "$1")" ] || usage_error "ROWS='${ROWS:-}' SEEDS='${SEEDS:-}': no run of the table at eps $1"
}

table_run() {  # table_run OUT_DIR DATA_DIR EPS RUN_NAME SEED FLAGS: RUN_ARGS, the train.py arguments of one run of
  # the table, the same for every launcher, so that a rerun or a requeued task continues the run (--resume_existing)
  # shellcheck disable=SC2046,SC2206  # the table's flags are words
  RUN_ARGS=(train.py --data_dir="$2" --out_dir="$1" $(common_flags) --eps="$3" $6 --seed="$5" --run_name="$4"
            --resume_existing $(extra_flags))
}

stop_children() {  # stop_children PID: SIGTERM to PID's children (each train.py checkpoints at its next iteration)
  pkill -TERM -P "$1" 2>/dev/null || true
}

wait_for() {  # wait_for PID: until it has ended (a trapped signal interrupts wait: wait again)
  while kill -0 "$1" 2>/dev/null; do wait "$1" || true; done
}

finished() {  # finished RUN_DIR: whether the run wrote its final evaluation (its rows, then timing.json)
  [ -f "$1/timing.json" ] && grep -q '"kind": "final"' "$1/metrics.jsonl" 2>/dev/null
}

RUN_LOCKED_EXIT=75  # train.py's exit status when another process holds the run directory
STOPPED="stopped by a signal"  # the start of a stopped run's status

log_lines() {  # log_lines RUN_DIR: how many lines its log.txt has (0 without one)
  if [ -f "$1/log.txt" ]; then wc -l < "$1/log.txt"; else echo 0; fi
}

stopped_since() {  # stopped_since RUN_DIR LINES: whether the log lines after the first LINES say a signal stopped the
  # run (torchrun exits 1 when its processes stopped on a signal: their log says so)
  tail -n +$(($2 + 1)) "$1/log.txt" 2>/dev/null | grep -q 'stopped by SIG'
}

run_isolated() {  # run_isolated OUT_DIR NAME COMMAND...: one run into OUT_DIR/logs/NAME.log; its outcome in NAME.status
  # (skipped where ${DONE_CHECK:-finished} OUT_DIR/NAME says it is done)
  local out=$1 name=$2 rc=0 before
  shift 2
  mkdir -p "$out/logs"
  if "${DONE_CHECK:-finished}" "$out/$name"; then
    echo skipped > "$out/logs/$name.status"
    return 0
  fi
  trap : TERM  # a preempted job's shell gets SIGTERM too: it outlives the run, to write the run's status
  before=$(log_lines "$out/$name")
  echo "[$(date '+%F %T')] start $name" >&2
  "$@" >> "$out/logs/$name.log" 2>&1 || rc=$?
  if [ $rc = 0 ]; then
    echo finished
  elif [ $rc = $RUN_LOCKED_EXIT ]; then
    echo "running elsewhere: another process holds its folder"
  elif [[ $rc =~ ^(130|138|143)$ ]] || stopped_since "$out/$name" "$before"; then
    echo "$STOPPED, exit $rc: it continues when rerun"
  else
    echo "failed, exit $rc"
  fi > "$out/logs/$name.status"
  echo "[$(date '+%F %T')] end $name: $(cat "$out/logs/$name.status")" >&2
  return 0
}

# AutoAttack after training: the official standard AutoAttack (eval.py --autoattack) of the last and early-stopped
# models on the first AA_POINTS test points (RobustBench's 10,000 by default; 16 under TINY=1); AA=0 skips it
check_autoattack() {  # usage errors for AA and AA_POINTS
  [[ ${AA:-1} =~ ^[01]$ ]] || usage_error "AA=$AA: 1 (the default: AutoAttack after training) or 0"
  [[ $(aa_points) =~ ^[1-9][0-9]*$ ]] || usage_error "AA_POINTS=$AA_POINTS: a positive whole number of test points"
}

aa_points() {
  if [ -n "${AA_POINTS:-}" ]; then echo "$AA_POINTS"; elif [ "${TINY:-0}" = 1 ]; then echo 16; else echo 10000; fi
}

AA_STEP=autoattack  # a run's AutoAttack step is named RUN.autoattack in OUT_DIR/logs

aa_finished() {  # aa_finished OUT_DIR/RUN.autoattack: whether that run's AutoAttack on aa_points points finished
  [ -f "${1%."$AA_STEP"}/autoattack-$(aa_points).done" ]
}

autoattack_step() {  # autoattack_step RUN_DIR DEVICE: eval.py's AutoAttack (resumable), then its done marker
  "$PYTHON" eval.py "$1" --models last early_stopped --pgd 0 0 --autoattack --n_points "$(aa_points)" \
    --device="$2" && : > "$1/autoattack-$(aa_points).done"
}

run_status() {  # run_status OUT_DIR NAME: the outcome run_isolated recorded ("not run" without one)
  cat "$1/logs/$2.status" 2>/dev/null || echo "not run"
}

summarise() {  # summarise EPS OUT_DIR: counts, each run that did not finish with its log, the table; status 1 if any failed
  local eps=$1 out=$2 name status n_done=0 n_skipped=0 failed=() dirs=()
  while IFS=$'\t' read -r name _; do
    status=$(run_status "$out" "$name")
    if finished "$out/$name"; then
      dirs+=("$out/$name")
      if [ "$status" = skipped ]; then n_skipped=$((n_skipped + 1)); else n_done=$((n_done + 1)); fi
    else
      failed+=("$name ($status)$([ ! -f "$out/logs/$name.log" ] || echo ": $out/logs/$name.log")")
    fi
  done < <(table_plan "$eps")
  echo "table eps $eps: ${#dirs[@]} of $((${#dirs[@]} + ${#failed[@]})) runs finished ($n_done now, $n_skipped before)," \
       "${#failed[@]} not finished"
  for name in "${failed[@]}"; do echo "  not finished: $name"; done
  if [ "${AA:-1}" = 1 ]; then
    local aa_done=0 aa_failed=() dir
    for dir in "${dirs[@]}"; do
      name=$(basename "$dir")
      if aa_finished "$out/$name.$AA_STEP"; then aa_done=$((aa_done + 1)); else
        aa_failed+=("$name ($(run_status "$out" "$name.$AA_STEP")): $out/logs/$name.$AA_STEP.log"); fi
    done
    echo "AutoAttack ($(aa_points) points): $aa_done of ${#dirs[@]} finished runs evaluated"
    for name in "${aa_failed[@]}"; do echo "  AutoAttack not finished: $name"; done
    failed+=("${aa_failed[@]}")
  fi
  if [ ${#dirs[@]} -gt 0 ]; then
    "$PYTHON" report.py "${dirs[@]}" --compare paper --out "$out/table.md" || return 1
  fi
  if [ ${#failed[@]} -gt 0 ]; then
    echo "rerun the same command to finish them: finished runs are skipped, interrupted ones continue" >&2
    return 1
  fi
}

refuse() {  # refuse MESSAGE...: one line on stderr, exit 2
  echo "$(basename "$0"): $*" >&2
  exit 2
}

slurm_seconds() {  # slurm_seconds TIME: a Slurm time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; -1 unlimited
  local t=$1 d=0 a b c
  case $t in infinite|UNLIMITED|unlimited) echo -1; return ;; esac
  if [[ $t == *-* ]]; then
    d=${t%%-*}
    IFS=: read -r a b c <<< "${t#*-}"
    echo $(( ((10#$d * 24 + 10#$a) * 60 + 10#${b:-0}) * 60 + 10#${c:-0} ))
  else
    IFS=: read -r a b c <<< "$t"
    if [ -n "$c" ]; then echo $(( (10#$a * 60 + 10#$b) * 60 + 10#$c ))
    elif [ -n "$b" ]; then echo $(( 10#$a * 60 + 10#$b ))
    else echo $(( 10#$a * 60 )); fi
  fi
}

gres_gpus() {  # gres_gpus GRES: the GPUs a node's sinfo %G lists ("gpu:4", "gpu:a100:4(S:0-1)", "(null)": 0)
  local n=0 entry
  for entry in ${1//,/ }; do
    entry=${entry%%(*}
    [[ $entry == gpu* ]] && n=$((n + ${entry##*:}))
  done
  echo "$n"
}

check_partition() {  # check_partition CPUS GPUS TIME [TIME's VARIABLE]: refuse what no node of PARTITION (else the
  # default) can run
  command -v sinfo > /dev/null || return 0  # no Slurm client here: sbatch will say
  local want_cpus=$1 want_gpus=$2 want_s nodes part cpus gres limit max_cpus=0 max_gpus=0 limit_s=0 name="" \
    partition_limit
  want_s=$(slurm_seconds "$3")
  nodes=$(sinfo -h -N -o '%P %c %G %l' 2>&1) || refuse "sinfo failed (${nodes%%$'\n'*}); is Slurm reachable from here?"
  while read -r part cpus gres limit; do
    if [ -n "${PARTITION:-}" ]; then [ "${part%\*}" = "$PARTITION" ] || continue
    else [[ $part == *\* ]] || continue; fi
    name=${part%\*}
    [ "$cpus" -gt $max_cpus ] && max_cpus=$cpus
    [ "$(gres_gpus "$gres")" -gt $max_gpus ] && max_gpus=$(gres_gpus "$gres")
    limit_s=$(slurm_seconds "$limit") partition_limit=$limit
  done <<< "$nodes"
  [ -n "$name" ] || refuse "PARTITION=${PARTITION:-}: sinfo lists no such partition (and no default one); set PARTITION"
  [ "$want_gpus" -le $max_gpus ] || refuse "GPUS_PER_RUN=$want_gpus: the nodes of partition $name have at most" \
    "$max_gpus GPUs; set GPUS_PER_RUN (0 runs on CPUs) or PARTITION"
  [ "$want_cpus" -le $max_cpus ] || refuse "CPUS_PER_GPU: a task would ask for $want_cpus CPUs and the nodes of" \
    "partition $name have at most $max_cpus; set CPUS_PER_GPU=$((max_cpus / (want_gpus > 0 ? want_gpus : 1)))"
  [ "$limit_s" -lt 0 ] || [ "$want_s" -le "$limit_s" ] || refuse "${4:-TIME_LIMIT}=$3: partition $name allows at most" \
    "$partition_limit; set TIME_LIMIT (a stopped task requeues itself and continues)"
}
