#!/usr/bin/env bash
# The GPU session's check, in one call: the GPU-only tests, bench.py's methods and evaluation sections in the
# README's precision (bench.py times the evaluation with and without --batched_restarts: add it to the run where
# it wins), then the README GradSum line (eps 8, 96 epochs) with only --half_prec --channels_last --cuda_graph
# added, its wall time split (timing.json) and its table beside the paper's.
#
# Usage: bash sh/gpu_check.sh DATA_DIR OUT_DIR
#   DATA_DIR  CIFAR-10 (an image folder or torchvision's files), or a .tar or .tgz of one, unpacked to a temporary
#             folder (the shared JPEG copy packs to 19 MiB: tar czf .gpu/cifar10.tgz -C ../shared/data cifar10-jpeg)
#   OUT_DIR   receives tests.txt, bench.txt, the run gradsum-eps8-seed0/ and table.md; a rerun continues the run
# Environment: TINY=1 shrinks every step to seconds on the CPU (what the tests run, before a GPU is lent);
# PYTHON (default python).
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
  device=cpu speed=(--half_prec --channels_last)
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
run=(train.py "${readme_flags[@]}" "${speed[@]}" "${shrink[@]}" --device="$device" --data_dir="$DATA_DIR"
     --out_dir="$OUT_DIR" --run_name=gradsum-eps8-seed0 --resume_existing)
echo "+ $PYTHON ${run[*]}" >&2
"$PYTHON" "${run[@]}"
"$PYTHON" report.py "$OUT_DIR/gradsum-eps8-seed0" --compare paper --out "$OUT_DIR/table.md"
echo "timing (s): $(cat "$OUT_DIR/gradsum-eps8-seed0/timing.json")"
