# The paper's experiment grid, in one place: edit these (or set them in the environment) and run
#   bash scripts/APFP_train.sh ; bash scripts/SFP_train.sh ; bash scripts/FPGM_train.sh ; bash scripts/L1_train.sh
#   bash scripts/Taylor_train.sh   (TAYLOR_RUNS, empty by default)
#   bash scripts/test.sh ; bash scripts/small_test.sh ; python collect_results.py
# DRY_RUN=1 prints the commands instead of running them.

DATA_ROOT=${DATA_ROOT:-./datasets}        # holds Market/, DukeMTMC-reID/, MSMT17_V1/ (each prepared: */pytorch)
RESULTS=${RESULTS:-./results}
GPU_IDS=${GPU_IDS:-0}
EPOCHS=${EPOCHS:-70}
BATCHSIZE=${BATCHSIZE:-32}
WORKERS=${WORKERS:-4}
DATASETS=${DATASETS:-"Market DukeMTMC-reID MSMT17_V1"}

# BAFD (APFP_train.py): every arch at every rate
BAFD_ARCHS=${BAFD_ARCHS:-"resnet18 resnet34 resnet50"}
BAFD_RATES=${BAFD_RATES:-"0.9 0.5"}
MAX_LRATE=${MAX_LRATE:-0.95}
KNN=${KNN:-2}
DECAY=${DECAY:-0.3}
# baselines, as arch:rate pairs
SFP_RUNS=${SFP_RUNS:-"resnet50:0.9 resnet50:0.5 resnet34:0.5"}
FPGM_RUNS=${FPGM_RUNS:-"resnet18:0.9 resnet18:0.5"}
HFP_RUNS=${HFP_RUNS:-"resnet18:0.9 resnet18:0.5"}
TAYLOR_RUNS=${TAYLOR_RUNS:-""}             # Taylor_train.py (not in the paper): e.g. "resnet18:0.5"
TAYLOR_BATCHES=${TAYLOR_BATCHES:-8}

source scripts/common.sh

# grid: one line "method arch rate dataset" per run of the whole comparison
grid() {
    local arch rate pair dataset
    for dataset in $DATASETS; do
        for arch in $BAFD_ARCHS; do for rate in $BAFD_RATES; do echo "bafd $arch $rate $dataset"; done; done
        for pair in $SFP_RUNS; do echo "sfp ${pair%%:*} ${pair##*:} $dataset"; done
        for pair in $FPGM_RUNS; do echo "fpgm ${pair%%:*} ${pair##*:} $dataset"; done
        for pair in $HFP_RUNS; do echo "hfp ${pair%%:*} ${pair##*:} $dataset"; done
        for pair in $TAYLOR_RUNS; do echo "taylor ${pair%%:*} ${pair##*:} $dataset"; done
    done
}

run_name() { echo "${1}_${2}_${4}_${3}"; }       # method arch rate dataset -> bafd_resnet18_Market_0.9
run_dir() { echo "$RESULTS/ft_${2}/$(run_name "$@")"; }

# train METHOD SCRIPT [extra flags...]: every run of METHOD in the grid
train() {
    local method=$1 script=$2
    shift 2
    grid | while read -r m arch rate dataset; do
        [ "$m" = "$method" ] || continue
        run python "$script" --gpu_ids "$GPU_IDS" --name "$(run_name "$m" "$arch" "$rate" "$dataset")" \
            --data_dir "$DATA_ROOT/$dataset/pytorch" --train_all --network_arch "$arch" --prune_rate "$rate" \
            --Epochs "$EPOCHS" --batchsize "$BATCHSIZE" --workers "$WORKERS" --results_dir "$RESULTS" "$@"
    done
}
