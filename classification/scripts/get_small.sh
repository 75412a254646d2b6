#!/usr/bin/env bash
# The small model (no zeros) of every ImageNet run pruned by the train-resnet*-prune*.sh scripts.
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
for arch in resnet18 resnet34 resnet50 resnet101; do
    for kind in rate-0.7 rate-0.7-pretrain; do
        run python -m classification.get_small --resume "$SNAPSHOTS/$arch-$kind/checkpoint.pth" \
            --save_dir "$SNAPSHOTS/$arch-$kind-small"
    done
done
