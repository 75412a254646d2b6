# Shared settings of the SFP classification scripts: edit these (or set them in the environment).
# Every script runs from the repository root; DRY_RUN=1 prints the commands instead of running them.
CIFAR_DATA=${CIFAR_DATA:-./data/cifar.python}       # holds cifar-10-batches-py/
IMAGENET_DATA=${IMAGENET_DATA:-/path/to/Imagenet2012} # holds train/ and val/
LOGS=${LOGS:-./logs}
SNAPSHOTS=${SNAPSHOTS:-./snapshots}

source scripts/common.sh

# parameter index of the last conv (--layer_end) per arch
layer_end() {
    case "$1" in
        resnet20) echo 54 ;; resnet32) echo 90 ;; resnet56) echo 162 ;; resnet110) echo 324 ;;
        resnet18) echo 57 ;; resnet34) echo 105 ;; resnet50) echo 156 ;; resnet101) echo 309 ;;
        resnet152) echo 462 ;;
        *) echo "unknown arch $1" >&2; return 1 ;;
    esac
}
