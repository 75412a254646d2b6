#!/usr/bin/env bash
# Evaluate the pruned ImageNet models with their zeros (-e --resume): the accuracy the paper reports.
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
for arch in resnet18 resnet34 resnet50 resnet101; do
    run python -m classification.pruning_train -a "$arch" -e --resume "$SNAPSHOTS/$arch-rate-0.7/checkpoint.pth" \
        --save_dir "$SNAPSHOTS/$arch-rate-0.7" --rate 0.7 --layer_begin 0 --layer_end "$(layer_end "$arch")" \
        --layer_inter 3 "$IMAGENET_DATA"
done
