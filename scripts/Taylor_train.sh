#!/usr/bin/env bash
# Taylor importance (zeroed every epoch, like SFP) on the TAYLOR_RUNS of scripts/config.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
train taylor Taylor_train.py --taylor_batches "$TAYLOR_BATCHES"
