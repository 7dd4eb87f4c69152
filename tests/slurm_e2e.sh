#!/usr/bin/env bash
# The table and the multinode job on a real one-node Slurm (tests/slurm_local.sh: munge, slurmctld, slurmd, two
# fake GPUs), with the real train.py on tiny data (TINY=1, 1,920 images). It submits three runs of the table:
# one is preempted mid-epoch (scontrol requeue), one reaches its time limit (--signal, TIME_LIMIT=3 minutes), one
# fails (a PYTHON that fails that run once); a second writer is refused while a run trains; then it resubmits.
# Checks: each run's metrics.jsonl equals an uninterrupted run's, byte for byte; the Slurm states (COMPLETED
# after a restart, FAILED, then COMPLETED); the table job's summary names the failure and then counts the runs;
# each trained run's AutoAttack runs as a task of its own (a failed run's is cancelled, a done one is skipped on
# resubmission); the 2-process multinode job, stopped by its time-limit signal and requeued, ends as an
# uninterrupted 2-process run. About 15 minutes on 2 cores; prints "ok: ..." per check, "FAILED: ..." and exit 1 at the first that fails.
#
# Usage: bash tests/slurm_e2e.sh WORK_DIR [PART]   (WORK_DIR emptied first; skipped with one line where Slurm is not
#        installed; PART: all (default), table or multinode)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(realpath -m -- "${1:?usage: bash tests/slurm_e2e.sh WORK_DIR [all|table|multinode]}")
PART=${2:-all}
REAL_PYTHON=$(command -v "${PYTHON:-python}")
rm -rf "$WORK"
mkdir -p "$WORK"
. tests/slurm_local.sh "$WORK/slurm" 2 || exit 0
trap slurm_local_stop EXIT
export OMP_NUM_THREADS=1  # the same kernels in every run: metrics compared byte for byte
. sh/lib.bash

step() { echo "== [$(date '+%T')] $*"; }
check() {  # check WHAT 'CONDITION': the condition as bash code
  if eval "$2"; then echo "ok: $1"; else echo "FAILED: $1"; exit 1; fi
}
state() {  # state JOB: "JobState Restarts ExitCode" as scontrol shows it
  scontrol show job "$1" | tr ' ' '\n' | awk -F= '/^(JobState|Restarts|ExitCode)=/ {printf "%s ", $2}' | sed 's/ $//'
}
wait_jobs() {  # wait_jobs JOB...: until squeue lists none of them (requeued ones come back first)
  while [ -n "$(squeue -h -j "$(IFS=,; echo "$*")" 2>/dev/null)" ]; do sleep 5; done
}
wait_for_file() {  # wait_for_file PATH
  while [ ! -e "$1" ]; do sleep 1; done
}
same_metrics() { cmp -s "$1/metrics.jsonl" "$2/metrics.jsonl"; }

step "tiny data"
"$REAL_PYTHON" -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_image_folder; \
make_image_folder('$WORK/data', n_train_per_class=192, n_test_per_class=10, size=32)"
cat > "$WORK/python" <<EOF
#!/usr/bin/env bash
# the project's python, except that the run named in FAIL_ONCE fails on its first attempt
for a in "\$@"; do
  if [ "\$a" = "--run_name=\$FAIL_ONCE" ] && [ ! -e "$WORK/failed-once" ]; then
    touch "$WORK/failed-once"
    echo "failing on purpose" >&2
    exit 1
  fi
done
exec "$REAL_PYTHON" "\$@"
EOF
chmod +x "$WORK/python"

export TINY=1 ROWS="fgsm vfsat gradsum" SEEDS=0 EXTRA_ARGS="--epochs=100 --progress_every_s=10" GPUS_PER_RUN=1
# the signal 20 s into each 3-minute task, so that gradsum (about 50 s of training on a 2-core EPYC) reaches it
export CPUS_PER_GPU=1 TIME_LIMIT=3 AA_TIME_LIMIT=3 SIGNAL_LEAD_S=160 PYTHON="$WORK/python" FAIL_ONCE=vfsat-eps8-seed0
TABLE_DIR=$WORK/table
if [ "$PART" != multinode ]; then
step "submit the table: fgsm (to be preempted), vfsat (fails once), gradsum (reaches its time limit)"
submitted=$(bash sh/slurm_table.sh 8 "$TABLE_DIR" "$WORK/data")
echo "$submitted"
array=$(sed -n 's/^submitted array job \([0-9]*\) .*/\1/p' <<< "$submitted")
table_job=$(sed -n 's/.* and table job \([0-9]*\) .*/\1/p' <<< "$submitted")

wait_for_file "$TABLE_DIR/fgsm-eps8-seed0/checkpoint.pt"
step "a second writer while fgsm trains"
table_run "$TABLE_DIR" "$WORK/data" 8 fgsm-eps8-seed0 0 --preset=fgsm
rc=0
"$PYTHON" "${RUN_ARGS[@]}" > "$WORK/second-writer.txt" 2>&1 || rc=$?
cat "$WORK/second-writer.txt"
check "a second writer is refused with exit 75 and one line" \
  '[ "$rc" = 75 ] && [ "$(wc -l < "$WORK/second-writer.txt")" = 1 ]'
step "preempt fgsm mid-epoch (scontrol requeue ${array}_0)"
scontrol requeue "${array}_0" || true  # it answers "Job is pending execution" for the array task it just requeued
wait_jobs "$array"
echo "table job $table_job: $(state "$table_job")"
while [[ $(state "$table_job") == PENDING* || $(state "$table_job") == RUNNING* ]]; do sleep 2; done
for task in 0 1 2; do echo "task ${array}_$task: $(state "${array}_$task")"; done
check "fgsm: preempted (and signalled before its time limit), requeued, COMPLETED" \
  '[[ "$(state "${array}_0")" =~ ^COMPLETED\ [1-9][0-9]*\ 0:0$ ]]'
check "vfsat: FAILED, exit 1" \
  '[[ "$(state "${array}_1")" == "FAILED 0 1:0" ]]'
check "gradsum: signalled before its time limit, requeued itself, COMPLETED" \
  '[[ "$(state "${array}_2")" =~ ^COMPLETED\ [1-9][0-9]*\ 0:0$ ]]'
check "fgsm's log says it was stopped and resumed" \
  'grep -q "stopped by SIGTERM" "$TABLE_DIR/fgsm-eps8-seed0/log.txt" && grep -q "resumed at" "$TABLE_DIR/fgsm-eps8-seed0/log.txt"'
check "gradsum's log says it was stopped and resumed" \
  'grep -q "stopped by SIGTERM" "$TABLE_DIR/gradsum-eps8-seed0/log.txt" && grep -q "resumed at" "$TABLE_DIR/gradsum-eps8-seed0/log.txt"'
check "the preempted task's Slurm log is readable" \
  '! grep -q "No such file" "$TABLE_DIR"/logs/slurm-"${array}"_0.out'
cat "$TABLE_DIR"/logs/slurm-table-"$table_job".out
check "the table job FAILED and its summary names vfsat's failure and log" \
  '[[ "$(state "$table_job")" == FAILED* ]] && grep -q "not finished: vfsat-eps8-seed0 (failed, exit 1): $TABLE_DIR/logs/vfsat-eps8-seed0.log" "$TABLE_DIR"/logs/slurm-table-"$table_job".out'
check "each run that trained got its own AutoAttack task; vfsat's, after its failure, was cancelled" \
  'grep -q "AutoAttack (16 points): 2 of 2 finished runs evaluated" "$TABLE_DIR"/logs/slurm-table-"$table_job".out'
check "timing.json sums the segments" \
  'grep -q '\''"segments": [2-9]'\'' "$TABLE_DIR/gradsum-eps8-seed0/timing.json"'

step "resubmit the same command"
submitted=$(bash sh/slurm_table.sh 8 "$TABLE_DIR" "$WORK/data")
array2=$(sed -n 's/^submitted array job \([0-9]*\) .*/\1/p' <<< "$submitted")
table_job2=$(sed -n 's/.* and table job \([0-9]*\) .*/\1/p' <<< "$submitted")
wait_jobs "$array2" "$table_job2"
cat "$TABLE_DIR"/logs/slurm-table-"$table_job2".out
check "the resubmission: every task COMPLETED, the table counts 1 now and 2 before" \
  'grep -q "3 of 3 runs finished (1 now, 2 before)" "$TABLE_DIR"/logs/slurm-table-"$table_job2".out'
check "the table job COMPLETED" \
  '[[ "$(state "$table_job2")" == COMPLETED* ]]'
check "the resubmission's AutoAttack: vfsat's ran, the others' were done; the table has its column" \
  'grep -q "AutoAttack (16 points): 3 of 3 finished runs evaluated" "$TABLE_DIR"/logs/slurm-table-"$table_job2".out && [ "$(grep -l "finished already" "$TABLE_DIR"/logs/slurm-autoattack-*.out | wc -l)" -ge 2 ] && grep -q "| AutoAttack standard (pyautoattack 0.2.0), seed 0, 16 pts |" "$TABLE_DIR/table.md"'

step "the same runs without Slurm, uninterrupted"
export PYTHON=$REAL_PYTHON FAIL_ONCE=
for name in fgsm gradsum vfsat; do
  table_run "$WORK/whole" "$WORK/data" 8 "$name-eps8-seed0" 0 --preset="$name"
  "$PYTHON" "${RUN_ARGS[@]}" > /dev/null
  check "$name: the Slurm run's metrics.jsonl equals the uninterrupted run's" \
    'same_metrics "$TABLE_DIR/$name-eps8-seed0" "$WORK/whole/$name-eps8-seed0"'
done

fi

if [ "$PART" != table ]; then
step "the multinode job: 2 processes on CPUs, stopped by its time-limit signal, requeued"
FLAGS=(--model=cnn --n_filters_cnn=4 --preset=gradsum --epochs=50 --n_train=1024 --batch_size=64 --batch_size_eval=64
       --eval_iter_freq=4 --n_eval_every_k_iter=64 --attack_iters=2 --final_attack_iters=2 --final_n_restarts=1
       --n_final_eval=64 --lr_max=0.01 --progress_every_s=10)
job=$(GPUS_PER_NODE=0 CPU_PROCESSES=2 sbatch --parsable --nodes=1 --cpus-per-task=2 --time=3 --signal=B:USR1@120 \
      --output="$WORK/multinode-%j.out" sh/slurm_multinode.sbatch "$WORK/multi" "$WORK/data" ddp "${FLAGS[@]}")
wait_jobs "$job"
cat "$WORK"/multinode-"$job".out | grep -v "^\[rank" | tail -n 20
echo "multinode job $job: $(state "$job")"
check "the multinode job requeued itself and COMPLETED" \
  '[[ "$(state "$job")" =~ ^COMPLETED\ [1-9][0-9]*\ 0:0$ ]]'
check "its processes checkpointed on SIGTERM" \
  'grep -q "stopped by SIGTERM" "$WORK/multi/ddp/log.txt"'
"$REAL_PYTHON" -m torch.distributed.run --standalone --nproc_per_node=2 train.py --data_dir="$WORK/data" \
  --out_dir="$WORK/whole" --run_name=ddp --device=cpu "${FLAGS[@]}" > /dev/null 2>&1
check "its metrics.jsonl equals an uninterrupted 2-process run's" \
  'same_metrics "$WORK/multi/ddp" "$WORK/whole/ddp"'
fi
echo "all checks passed"
