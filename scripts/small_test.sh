#!/usr/bin/env bash
# The small model of every run of the grid: build, test, evaluate (RUN/metrics_last_small.json), time it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/config.sh
grid | while read -r method arch rate dataset; do
    dir=$(run_dir "$method" "$arch" "$rate" "$dataset")
    if [ "$method" = hfp ]; then how=(--prune_rate "$rate"); else how=(--NonL1); fi
    multi=()
    [ "$dataset" = Market ] && multi=(--multi --multi_mat "$dir/multi_query_small.mat")
    run python test_small.py --gpu_ids "$GPU_IDS" --name "$dir" --which_epoch last "${how[@]}" \
        --test_dir "$DATA_ROOT/$dataset/pytorch" --mat "$dir/pytorch_result_small.mat" "${multi[@]}"
    run python evaluate_gpu.py --mat "$dir/pytorch_result_small.mat" --multi_mat "$dir/multi_query_small.mat" \
        --json "$dir/metrics_last_small.json"
    run python runtime_comparison.py --name "$dir" --which_epoch last "${how[@]}" --device cpu --batch_sizes 1,32
done
