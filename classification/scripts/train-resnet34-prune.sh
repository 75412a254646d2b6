#!/usr/bin/env bash
# SFP resnet34 on ImageNet from scratch, keeping 70 % of the filters of every conv (downsample convs skipped).
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
run python -m classification.pruning_train -a resnet34 --save_dir "$SNAPSHOTS/resnet34-rate-0.7" --rate 0.7 \
    --layer_begin 0 --layer_end "$(layer_end resnet34)" --layer_inter 3 "$IMAGENET_DATA"
