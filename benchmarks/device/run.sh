#!/usr/bin/env bash
# The device machine's whole GPU check in one call: installs the carried wheels, runs benchmarks/gpu.py under a
# time limit, keeps the log and every number under $OUT, and exits non-zero if any section failed or ran over.
#
# From a session with a lent GPU (see docs/benchmarks.md, "GPU"), after `bash benchmarks/device/wheels.sh`:
#   run(command="bash benchmarks/device/run.sh", carry=[".whl"], timeout_s=600)
# It leaves $OUT/gpu.log (everything printed) and $OUT/gpu.json (every number, per section).
#
# Settings (environment; the defaults are the device run's):
#   MOE_GPU_ARGS     extra arguments of gpu.py (a test runs "--device cpu --quick")
#   MOE_GPU_TIMEOUT  seconds before gpu.py is stopped (540: inside the call's 600, with room for the install)
#   MOE_GPU_WHEELS   folder of wheels to install (.whl); MOE_GPU_SITE where to (/tmp/site)
#   MOE_GPU_PYTHON   the interpreter (python3: on the device image, the one that holds torch)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
: "${OUT:?OUT must name the folder for gpu.log and gpu.json (the device tool sets it)}"
WHEELS="${MOE_GPU_WHEELS:-.whl}"
SITE="${MOE_GPU_SITE:-/tmp/site}"
PY="${MOE_GPU_PYTHON:-python3}"
LIMIT="${MOE_GPU_TIMEOUT:-540}"
read -r -a ARGS <<<"${MOE_GPU_ARGS:-}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
    start=$(date +%s)
    echo "## run.sh: $(date -u +%FT%TZ), $(uname -m), $($PY --version 2>&1)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not available"
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ "${#wheels[@]}" -gt 0 ]; then
        echo "installing ${#wheels[@]} wheels into $SITE: ${wheels[*]##*/}"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" || { echo "run.sh: installing the wheels failed"; exit 3; }
    else
        echo "no wheels in $WHEELS (run benchmarks/device/wheels.sh here and carry .whl): nothing installed"
    fi
    export PYTHONPATH="$PWD:$SITE"
    echo "PYTHONPATH=$PYTHONPATH"
    $PY -m pip list 2>/dev/null | grep -iE '^(torch|lightning|transformers|megatron-core|moewatch|pandas|pyarrow|tensorboard|numpy|triton|pytest) ' || true
    # --device cuda: on the device machine a missing GPU is an error, not a CPU run (MOE_GPU_ARGS may override it).
    timeout --kill-after=15 "$LIMIT" $PY benchmarks/gpu.py --device cuda --json "$OUT/gpu.json" "${ARGS[@]}"
    code=$?
    [ "$code" -eq 124 ] || [ "$code" -eq 137 ] && echo "run.sh: gpu.py ran past $LIMIT s and was stopped"
    echo "run.sh: gpu.py exit code $code after $(( $(date +%s) - start )) s"
    exit "$code"
} 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
