#!/usr/bin/env bash
# Fetch, on a machine with a package registry, the wheels benchmarks/gpu_check.sh installs on a GPU machine that has
# none (Python 3.12, x86-64; that machine already has torch, triton, transformers, accelerate, pyarrow, pandas, xxhash).
#   bash benchmarks/gpu_wheels.sh     -> .whl/*.whl (trl 1.16, Liger, datasets + needs) and .whl/trl029/*.whl (trl 0.29.1)
# .whl/ is git-ignored; pass it to the device call as a carried path.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
get() {  # $1 folder, then NAME==VERSION ...
  local dir=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
    -d "$dir" "$@"
}
get .whl trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
get .whl/trl029 trl==0.29.1
du -sh .whl
