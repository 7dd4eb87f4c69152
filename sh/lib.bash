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

absolute() {  # a path made absolute (from the caller's folder, before the script changes it)
  realpath -m -- "$1"
}

TABLE=sh/cifar10_table.tsv

table_rows() {  # table_rows EPS: "name<TAB>flags" of each row at EPS, the 'common' row left out, ROWS (names) kept if set
  awk -F'\t' -v eps="$1" -v keep=" ${ROWS:-} " '
    !/^#/ && ($1 == eps || $1 == "*") && $2 != "common" && (keep == "  " || index(keep, " " $2 " ")) {print $2 "\t" $3}
  ' "$TABLE"
}

common_flags() {  # the flags of the 'common' row
  awk -F'\t' '!/^#/ && $2 == "common" {print $3}' "$TABLE"
}

table_eps() {  # the eps values that the table has rows for
  awk -F'\t' '!/^#/ && $1 != "*" {print $1}' "$TABLE" | sort -nu | tr '\n' ' '
}

table_plan() {  # table_plan EPS: "run_name<TAB>seed<TAB>flags" of every run, SEEDS (default 0 1998 2022) each
  local name flags seed
  while IFS=$'\t' read -r name flags; do
    for seed in ${SEEDS:-0 1998 2022}; do
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
            --resume_existing)
}

stop_children() {  # stop_children PID: SIGTERM to PID's children (each train.py checkpoints at its next iteration)
  pkill -TERM -P "$1" 2>/dev/null || true
}

wait_for() {  # wait_for PID: until it has ended (a trapped signal interrupts wait: wait again)
  while kill -0 "$1" 2>/dev/null; do wait "$1" || true; done
}

finished() {  # finished RUN_DIR: whether the run wrote its final evaluation
  [ -f "$1/timing.json" ]
}

run_isolated() {  # run_isolated OUT_DIR NAME COMMAND...: one run into OUT_DIR/logs/NAME.log; its outcome in NAME.status
  local out=$1 name=$2 rc=0
  shift 2
  mkdir -p "$out/logs"
  if finished "$out/$name"; then
    echo skipped > "$out/logs/$name.status"
    return 0
  fi
  echo "[$(date '+%F %T')] start $name" >&2
  "$@" >> "$out/logs/$name.log" 2>&1 || rc=$?
  case $rc in
    0) echo finished ;;
    130|138|143) echo "stopped by a signal, exit $rc: it continues when rerun" ;;
    *) echo "failed, exit $rc" ;;
  esac > "$out/logs/$name.status"
  echo "[$(date '+%F %T')] end $name: $(cat "$out/logs/$name.status")" >&2
  return 0
}

summarise() {  # summarise EPS OUT_DIR: counts, each run that did not finish with its log, the table; status 1 if any failed
  local eps=$1 out=$2 name status n_done=0 n_skipped=0 failed=() dirs=()
  while IFS=$'\t' read -r name _; do
    status=$(cat "$out/logs/$name.status" 2>/dev/null || echo "not run")
    if finished "$out/$name"; then
      dirs+=("$out/$name")
      if [ "$status" = skipped ]; then n_skipped=$((n_skipped + 1)); else n_done=$((n_done + 1)); fi
    else
      failed+=("$name ($status)$([ -f "$out/logs/$name.log" ] && echo ": $out/logs/$name.log")")
    fi
  done < <(table_plan "$eps")
  echo "table eps $eps: ${#dirs[@]} of $((${#dirs[@]} + ${#failed[@]})) runs finished ($n_done now, $n_skipped before)," \
       "${#failed[@]} not finished"
  for name in "${failed[@]}"; do echo "  not finished: $name"; done
  if [ ${#dirs[@]} -gt 0 ]; then
    "$PYTHON" report.py "${dirs[@]}" --compare paper --out "$out/table.md" || return 1
  fi
  if [ ${#failed[@]} -gt 0 ]; then
    echo "rerun the same command to finish them: finished runs are skipped, interrupted ones continue" >&2
    return 1
  fi
}
