#!/usr/bin/env bash
# The paper's CIFAR-10 table at eps 8/255 (its rows, seeds 0, 1998, 2022; ROWS=peers: the peers): sh/cifar10_table.sh 8.
#
# Usage: bash sh/cifar10_eps8.sh GPU_IDS OUT_DIR [DATA_DIR]     e.g. bash sh/cifar10_eps8.sh 0,1,2,3 runs/cifar10_eps8 data
# (bash sh/cifar10_table.sh --help: what it does, what a rerun does, and its environment variables)
set -euo pipefail
. "$(dirname "$0")/lib.bash"
help_or_args 2 3 "$@"
exec bash "$(dirname "$0")/cifar10_table.sh" 8 "$@"
