#!/usr/bin/env bash
# Downloads here (where pip reaches PyPI) the wheels that benchmarks/gpu.py and the CUDA tests need and the device
# machine's image lacks, into .whl/ at the repository root, for its Python 3.12 on manylinux x86_64.
#
# The image (/work/.library/device/KINDS.md) has torch 2.11, lightning, transformers, pandas, pyarrow, tensorboard,
# numpy, packaging, pytest and triton. Missing, and named here one by one with every dependency it needs that the
# image lacks (pip runs with --no-deps, so nothing else comes along):
#   megatron-core 0.16.1: tests/families/test_megatron.py (its own needs: torch, numpy, packaging: in the image);
#   moewatch 0.1.0: the MoEWatch rows of gpu.py's overhead section (needs numpy, torch, transformers: in the image).
# wandb, trl and the other peer libraries are not imported by the CUDA tests or gpu.py, so they stay behind.
#
# .whl/ is git-ignored through the repository's info/exclude (never committed); the device call carries it:
# run(command="bash benchmarks/device/run.sh", carry=[".whl"]). The call carries at most 64 MiB with the working
# tree, so the wheels must stay under MAX_MIB. Usage: bash benchmarks/device/wheels.sh [DEST]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
DEST="${1:-.whl}"
MAX_MIB="${MAX_MIB:-50}"
WHEELS=(
    "megatron-core==0.16.1"
    "moewatch==0.1.0"
)
EXCLUDE="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$EXCLUDE")"
grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >>"$EXCLUDE"
mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"
status=0
for spec in "${WHEELS[@]}"; do
    name="${spec%%==*}"
    pattern="$(echo "$name" | tr '-' '_')-${spec##*==}-*.whl"
    found=$(find "$DEST" -maxdepth 1 -type f -iname "$pattern" | wc -l)
    if [ "$found" -ne 1 ]; then
        echo "wheels.sh: expected one wheel $pattern in $DEST, found $found (two versions stop the install there)" >&2
        status=1
    fi
done
others=$(find "$DEST" -maxdepth 1 -type f -name "*.whl" | wc -l)
if [ "$others" -ne "${#WHEELS[@]}" ]; then
    echo "wheels.sh: $DEST holds $others wheels, expected ${#WHEELS[@]}: remove the others (rm -r $DEST)" >&2
    status=1
fi
bytes=$(du -sb "$DEST" | cut -f1)
mib=$(( (bytes + 1048575) / 1048576 ))
echo "wheels.sh: $others wheels, $bytes bytes (about $mib MiB) in $DEST:"
ls -l "$DEST"
if [ "$bytes" -gt $(( MAX_MIB * 1048576 )) ]; then
    echo "wheels.sh: $DEST is over $MAX_MIB MiB: the device call carries 64 MiB with the working tree" >&2
    status=1
fi
exit "$status"
