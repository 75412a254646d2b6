#!/usr/bin/env bash
# SFP (L2 norm, zeroed every epoch) on the SFP_RUNS of scripts/config.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
train sfp SFP_train.py
