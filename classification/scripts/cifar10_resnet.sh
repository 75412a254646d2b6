#!/usr/bin/env bash
# The paper's CIFAR-10 table: every depth at keep rates 0.9, 0.8 and 0.7 (ResNet-56 also 0.6), 200 epochs.
set -euo pipefail
cd "$(dirname "$0")/../.."
source classification/scripts/config.sh
for arch in resnet20 resnet32 resnet56 resnet110; do
    rates="0.9 0.8 0.7"
    [ "$arch" = resnet56 ] && rates="$rates 0.6"
    for rate in $rates; do
        run python -m classification.pruning_cifar10_resnet "$CIFAR_DATA" --dataset cifar10 --arch "$arch" \
            --save_path "$LOGS/cifar10_${arch}_rate${rate}" --epochs 200 --schedule 1 60 120 160 \
            --gammas 10 0.2 0.2 0.2 --learning_rate 0.01 --decay 0.0005 --batch_size 128 --rate "$rate" \
            --layer_begin 0 --layer_end "$(layer_end "$arch")" --layer_inter 3 --epoch_prune 1
    done
done
