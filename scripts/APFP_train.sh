#!/usr/bin/env bash
# BAFD on every arch, rate and dataset of scripts/config.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
train bafd APFP_train.py --max_lrate "$MAX_LRATE" --knn "$KNN" --decay_rate "$DECAY" --efficient_pruning
