#!/usr/bin/env bash
# The CPU experiment (sh/cpu_experiment.sh: the original's CNN at eps 10/255, 30 epochs, seed 2022) with the
# peers beside its three methods: N-FGSM, ELLE (lambda 5000) and GradSum-FD (lambda 20). The three runs that
# sh/cpu_experiment.sh made already are skipped. Prints the table and writes OUT_DIR/peers.md.
#
# Usage: bash sh/cpu_peers.sh DATA_DIR [OUT_DIR]
#   DATA_DIR  CIFAR-10, e.g. ../shared/data/cifar10-jpeg
#   OUT_DIR   parent of the run directories (default runs/cpu_experiment)
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 1 2 "$@"
METHODS="fgsm fgsm-vfsat fgsm-gradsum n-fgsm elle gradsum-fd" TABLE_NAME=peers.md exec bash "$(dirname "$0")/cpu_experiment.sh" "$@"
