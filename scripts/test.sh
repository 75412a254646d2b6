#!/usr/bin/env bash
# Features and metrics of every run of the grid (zeroed / trained checkpoint): RUN/metrics_last.json.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
grid | while read -r method arch rate dataset; do
    dir=$(run_dir "$method" "$arch" "$rate" "$dataset")
    multi=()
    [ "$dataset" = Market ] && multi=(--multi)
    run python test.py --gpu_ids "$GPU_IDS" --name "$dir" --which_epoch last --test_dir "$DATA_ROOT/$dataset/pytorch" \
        --mat "$dir/pytorch_result.mat" "${multi[@]}"
    run python evaluate_gpu.py --mat "$dir/pytorch_result.mat" --multi_mat "$dir/multi_query.mat" \
        --json "$dir/metrics_last.json"
done
