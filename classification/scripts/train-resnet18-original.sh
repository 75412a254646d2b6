#!/usr/bin/env bash
# Unpruned resnet18 on ImageNet (the paper's baseline): 100 epochs, lr 0.1 / 10 every 30 epochs.
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
run python -m classification.original_train -a resnet18 --save_dir "$SNAPSHOTS/resnet18-baseline" "$IMAGENET_DATA"
