#!/usr/bin/env bash
# The device checks that need a CUDA GPU, in one run (issues 26, 30 and 31): the optimizers' CUDA
# conformance cases, the step compiled with CUDA graphs, discovery of a 1B Llama on the device, and
# the step benchmark. Every output goes to $OUT (default ./gpu-out); each check runs even if an
# earlier one failed, and the script exits non-zero if any did. Uses $PYTHON (default python3) with
# this checkout's sources on the path.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="src:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=0
check() {  # check NAME COMMAND...: run, log to $OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1 || { echo "   FAILED (exit $?)"; failed=1; }
    echo "   $((SECONDS - start)) s"
}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
check conformance "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_optimizer_conformance.py -k cuda
check host_syncs "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_host_reads.py -k cuda
check cuda_graphs "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_step_edges.py -k "cuda_graphs_on_a_gpu"
check discovery "$PYTHON" -m benchmarks.discovery --device cuda --llama 1b --widths 768 --depths 12 --out "$OUT/discovery"
check step "$PYTHON" -m benchmarks.cuda --out "$OUT/cuda"
exit $failed
