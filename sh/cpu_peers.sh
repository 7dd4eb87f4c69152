#!/usr/bin/env bash
# The original's CNN command (sh/cpu_experiment.sh with EXPERIMENT=original_cnn: eps 10/255, 30 epochs, seed
# 2022) with the peers beside its three methods: N-FGSM, ELLE (lambda 5000) and GradSum-FD (lambda 20). Runs
# that finished already are skipped. Prints the table and writes OUT_DIR/peers.md.
#
# Usage: bash sh/cpu_peers.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  CIFAR-10, e.g. ../shared/data/cifar10-jpeg
#   OUT_DIR   parent of the run directories (default runs/cpu_original_cnn)
# Environment: as sh/cpu_experiment.sh's (THREADS, JOBS, SEEDS, TINY, EXTRA_ARGS, PYTHON).
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 1 2 "$@"
EXPERIMENT=original_cnn METHODS="fgsm vfsat gradsum n-fgsm elle gradsum-fd" TABLE_NAME=peers.md \
  exec bash "$(dirname "$0")/cpu_experiment.sh" "$@"
