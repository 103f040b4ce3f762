#!/usr/bin/env bash
# Download the wheels of scripts/gpu_wheels.txt into .whl/ (git-ignored through .git/info/exclude), for the device
# machine's Python 3.12 on x86-64: run here, in the repo root, before a device run that carries `.whl`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
mkdir -p .whl
grep -v '^\s*#' scripts/gpu_wheels.txt | grep -v '^\s*$' | while read -r req; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$req"
done
# two versions of one package stop the whole install there
dups=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "two versions in .whl/ of: $dups (remove the old ones)" >&2; exit 1; fi
ls -l .whl/*.whl | awk '{print $5, $9}'
du -ch .whl/*.whl | tail -1
