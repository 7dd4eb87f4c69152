#!/usr/bin/env bash
# The GPU session's check, in one call: the GPU-only tests, bench.py's methods and evaluation sections in the
# README's precision (bench.py times the evaluation with and without --batched_restarts: add it to the run where
# it wins), train.py --estimate of every eps-8 row of the table in fp32 and with the speed flags, then the README
# GradSum line (eps 8, 96 epochs) with only --half_prec --channels_last --cuda_graph
# added, its wall time split (timing.json) and its table beside the paper's.
#
# Usage: bash sh/gpu_check.sh DATA_DIR OUT_DIR
#   DATA_DIR  CIFAR-10 (an image folder or torchvision's files), or a .tar or .tgz of one, unpacked to a temporary
#             folder (the shared JPEG copy packs to 19 MiB: tar czf .gpu/cifar10.tgz -C ../shared/data cifar10-jpeg)
#   OUT_DIR   receives tests.txt, bench.txt, estimate.txt, the run gradsum-eps8-seed0/ and table.md; a rerun
#             continues the run
# Environment: TINY=1 shrinks every step to seconds on the CPU (what the tests run, before a GPU is lent; bf16
# there, where fp16's loss scale would skip every step); PYTHON (default python). It fails if the run's training
# changed no weight.
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 2 2 "$@"
DATA_DIR=$(absolute "$1")
OUT_DIR=$(absolute "$2")
PYTHON=${PYTHON:-python}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
if [[ $DATA_DIR == *.tar || $DATA_DIR == *.tar.gz || $DATA_DIR == *.tgz ]]; then
  unpacked=$(mktemp -d)
  tar -xf "$DATA_DIR" -C "$unpacked"
  DATA_DIR=$unpacked/$(ls "$unpacked" | head -n 1)
fi
# the README's line, as it stands in its command block
readme_line=$(awk '/^## The paper.s command lines/ {s = 1} s && /--grad_input_sum_coeff=10 / {print; exit}' README.md)
[ -n "$readme_line" ] || { echo "gpu_check.sh: the README's GradSum line is not found" >&2; exit 1; }
read -r -a readme_flags <<< "${readme_line#python train.py }"
if [ "${TINY:-0}" = 1 ]; then
  device=cpu speed=(--half_prec --amp_dtype=bfloat16 --channels_last)  # fp16's loss scale collapses on a CPU
  shrink=(--model=cnn --n_filters_cnn=4 --epochs=1 --batch_size=16 --batch_size_eval=8 --eval_iter_freq=2
          --n_eval_every_k_iter=16 --attack_iters=2 --n_restarts=2 --n_final_eval=12 --final_attack_iters=2
          --final_n_restarts=2)
  bench=(--model=cnn --n_filters=4 --batch_size=8 --eval_points=8 --batch_size_eval=8 --n_iters=1 --rounds=1)
else
  device=cuda speed=(--half_prec --channels_last --cuda_graph)
  shrink=()
  bench=(--batch_size=256 --eval_points=1024 --batch_size_eval=1024 --half_prec --channels_last --cuda_graph)
fi
echo "+ GPU-only tests" >&2
"$PYTHON" -m pytest -q tests -k "cuda or real" 2>&1 | tee "$OUT_DIR/tests.txt"
echo "+ bench.py" >&2
"$PYTHON" bench.py --device="$device" --sections=methods,eval "${bench[@]}" 2>&1 | tee "$OUT_DIR/bench.txt"
echo "+ train.py --estimate of the eps-8 table's rows, fp32 and with ${speed[*]}" >&2
rows=$([ "${TINY:-0}" = 1 ] && echo gradsum || echo paper)
gpu=$([ "$device" = cpu ] && echo cpu || echo 0)
for extra in "" "${speed[*]}"; do
  ESTIMATE=1 ROWS=$rows EXTRA_ARGS="$extra ${shrink[*]}" bash sh/cifar10_table.sh 8 "$gpu" "$OUT_DIR/estimate" \
    "$DATA_DIR" 2>&1 | tee -a "$OUT_DIR/estimate.txt"
done
run=(train.py "${readme_flags[@]}" "${speed[@]}" "${shrink[@]}" --device="$device" --data_dir="$DATA_DIR"
     --out_dir="$OUT_DIR" --run_name=gradsum-eps8-seed0 --resume_existing)
echo "+ $PYTHON ${run[*]}" >&2
"$PYTHON" "${run[@]}"
"$PYTHON" - "$OUT_DIR/gradsum-eps8-seed0" <<'EOF'
# the run trained: its last weights are not its initial ones (skipped fp16 steps would leave every weight as it was)
import sys
import torch
import data
import models
import runs
args = runs.load_args(sys.argv[1])
torch.manual_seed(args.seed)  # as train.py draws the initial weights
initial = models.model_from_args(args, data.load_data(args.dataset, args.data_dir)).state_dict()
last = torch.load(f"{sys.argv[1]}/{runs.CHECKPOINT}", weights_only=True)["model"]
moved = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, last[k])]
print(f"weights changed by training: {len(moved)} of {sum(v.is_floating_point() for v in initial.values())} tensors")
sys.exit(0 if moved else "gpu_check.sh: no weight changed: every optimiser step was skipped")
EOF
"$PYTHON" report.py "$OUT_DIR/gradsum-eps8-seed0" --compare paper --out "$OUT_DIR/table.md"
echo "timing (s): $(cat "$OUT_DIR/gradsum-eps8-seed0/timing.json")"
