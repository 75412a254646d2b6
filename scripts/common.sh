# Sourced by scripts/config.sh and classification/scripts/config.sh.
# run CMD...: run it, or print it (shell-quoted, one line) when DRY_RUN=1
run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '%q ' "$@"
        echo
    else
        echo "+ $*"
        "$@"
    fi
}
