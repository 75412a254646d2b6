#!/usr/bin/env bash
# Evaluate the small ImageNet models built by get_small.sh (same accuracy, fewer FLOPs).
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
for arch in resnet18 resnet34 resnet50 resnet101; do
    run python -m classification.infer_small --small "$SNAPSHOTS/$arch-rate-0.7-small/small.pth" "$IMAGENET_DATA"
done
