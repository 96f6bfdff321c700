#!/bin/bash
# Runs every benchmark in bench/ (files named NN-*.sh) against the build dir.
set -u
BUILD=${1:-build}
here=$(cd "$(dirname "$0")" && pwd)
export PMEMSNAP=$(cd "$BUILD" && pwd)/tools/pmemsnap
export BUILDDIR=$(cd "$BUILD" && pwd)
rc=0
for b in "$here"/[0-9]*-*.sh; do
    [ -e "$b" ] || continue
    echo "=== $(basename "$b") ==="
    bash "$b" || rc=1
done
exit $rc
