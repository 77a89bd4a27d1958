#!/usr/bin/env bash
# The whole GPU check in one call (one H100 / H200): set-up, CUDA tests, kernels / generate / ppo / trl runners beside
# their baselines, one summary table + raw logs in $OUT (see benchmarks/run_gpu_check.py for the stages and their limits).
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget-s 440] [--only STAGE ...]
#
# Set-up (about 30 s; skipped by --dry-run, which only checks it):
#  1. fastrlhf/kernels and fastrlhf/benchmarks point at the top-level kernels/ and benchmarks/ (links made if missing);
#  2. optional wheels (fetched on a machine with a registry by benchmarks/gpu_wheels.sh): .whl/*.whl (trl 1.16, Liger,
#     datasets and its missing needs) installed into /tmp/site on PYTHONPATH; .whl/trl029/*.whl (trl 0.29.1, whose
#     PPOTrainer the ppo runner compares against) into /tmp/trl029, passed as FASTRLHF_TRL_PATH;
#  3. the C++ extension built in place (python3 setup.py build_ext --inplace; on failure the check goes on without it);
#  4. versions of the driver, torch, triton and ptxas written to $OUT/setup.log.
# Triton assembles with the ptxas it bundles (3.9: CUDA 13.4), which can be newer than the driver. If its cubins do not
# load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION / "no kernel image" in tests.log), rerun with FASTRLHF_SYSTEM_PTXAS=1: Triton
# then assembles with the machine's own ptxas (TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH = `command -v ptxas`).
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=0
OUTDIR=${OUT:-}
prev=""
for a in "$@"; do
  [ "$a" = "--dry-run" ] && DRY=1
  [ "$prev" = "--out" ] && OUTDIR=$a
  prev=$a
done
if [ -z "$OUTDIR" ]; then
  if [ $DRY = 1 ]; then OUTDIR=$(mktemp -d); else echo "gpu_check.sh: set \$OUT or pass --out DIR" >&2; exit 2; fi
fi
mkdir -p "$OUTDIR"
LOG="$OUTDIR/setup.log"
PY=${PYTHON:-python3}
say() { echo "[gpu_check.sh] $*" | tee -a "$LOG"; }
: > "$LOG"

for pkg in kernels benchmarks; do
  if [ ! -e "fastrlhf/$pkg" ]; then
    if [ $DRY = 1 ]; then say "would link fastrlhf/$pkg -> ../$pkg"; else ln -s "../$pkg" "fastrlhf/$pkg" && say "linked fastrlhf/$pkg"; fi
  fi
done

# wheels: one version of each distribution per folder (two stop pip); list what would be installed
check_wheels() {  # $1 folder
  local names
  names=$(ls "$1"/*.whl 2>/dev/null | xargs -r -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort)
  [ -z "$names" ] && return 0
  if [ -n "$(echo "$names" | uniq -d)" ]; then say "ERROR: two versions of $(echo "$names" | uniq -d | tr '\n' ' ')in $1"; return 1; fi
  for w in "$1"/*.whl; do
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).testzip()" "$w" || { say "ERROR: $w is not a wheel"; return 1; }
  done
  say "wheels in $1: $(echo $names)"
}
check_wheels .whl || exit 2
check_wheels .whl/trl029 || exit 2
if [ $DRY = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || say "WARNING: wheel install failed (see above)"
  else
    say "no .whl/*.whl: the trl / liger providers and the trl stage may be missing (benchmarks/gpu_wheels.sh fetches them)"
  fi
  if ls .whl/trl029/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/trl029 \
      .whl/trl029/*.whl >> "$LOG" 2>&1 && export FASTRLHF_TRL_PATH=/tmp/trl029 || say "WARNING: trl 0.29 install failed"
  else
    say "no .whl/trl029/*.whl: the ppo stage runs without its TRL arm"
  fi
  t0=$(date +%s)
  if "$PY" setup.py -q build_ext --inplace >> "$LOG" 2>&1; then
    say "C++ extension built in $(( $(date +%s) - t0 )) s"
  else  # the CPU ops are optional (the kernels fall back to their references); the GPU paths do not use them
    say "WARNING: building the C++ extension failed (see above); going on without it"
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
SYS_PTXAS=$(command -v ptxas || ls /usr/local/cuda/bin/ptxas 2>/dev/null || true)
if [ "${FASTRLHF_SYSTEM_PTXAS:-0}" = 1 ]; then
  if [ -n "$SYS_PTXAS" ]; then
    export TRITON_PTXAS_PATH=$SYS_PTXAS TRITON_PTXAS_BLACKWELL_PATH=$SYS_PTXAS; say "Triton uses $SYS_PTXAS"
  else
    say "FASTRLHF_SYSTEM_PTXAS=1 but no ptxas on this machine"
  fi
fi
{
  echo "--- environment"
  (command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
     --format=csv) || echo "nvidia-smi: not found"
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__, '| cuda available', torch.cuda.is_available())"
  "$PY" -c "from triton import knobs; import subprocess; [print('triton', t, subprocess.run([getattr(knobs.nvidia, t).path, '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]) for t in ('ptxas', 'ptxas_blackwell') if hasattr(knobs.nvidia, t)]" 2>&1
  [ -n "$SYS_PTXAS" ] && echo "system ptxas $SYS_PTXAS: $("$SYS_PTXAS" --version | tail -1)"
  "$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>&1 | tail -1
  for m in trl liger_kernel datasets bitsandbytes; do "$PY" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1; done
} >> "$LOG" 2>&1
exec "$PY" -m benchmarks.run_gpu_check --out "$OUTDIR" "$@"
