#!/usr/bin/env bash
# HFP (L1 norm once, physically smaller, fine-tuned at lr 0.005) on the HFP_RUNS of scripts/config.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
train hfp L1_train.py --lr 0.005
