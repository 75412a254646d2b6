#!/usr/bin/env bash
# SFP resnet101 on ImageNet from the ImageNet weights (torchvision's local cache), lr 0.01, keep 0.7.
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
run python -m classification.pruning_train -a resnet101 --save_dir "$SNAPSHOTS/resnet101-rate-0.7-pretrain" --rate 0.7 \
    --layer_begin 0 --layer_end "$(layer_end resnet101)" --layer_inter 3 --use_pretrain --lr 0.01 "$IMAGENET_DATA"
