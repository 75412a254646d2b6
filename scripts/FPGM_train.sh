#!/usr/bin/env bash
# FPGM (nearest the geometric median, zeroed every epoch) on the FPGM_RUNS of scripts/config.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
train fpgm FPGM_train.py
