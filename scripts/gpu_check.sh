#!/usr/bin/env bash
# The checks only a GPU can make, as one prepared command for a lent GPU machine whose image
# has JAX, flax, optax, orbax and PyTorch but not ml-collections or grain.
#
#   bash scripts/gpu_check.sh study tests bench     # parts in the order given
#
# Parts, each under its own time limit (seconds, from the environment) and with its own log:
#   study  configs/study.py:gpu into runs/study-gpu (T_STUDY, default 420); a second call on
#          the same machine resumes it. Its report, records and metrics (no checkpoints) are
#          packed into $OUT/study-gpu.tgz.
#   tests  python -m pytest -m gpu (T_TESTS, default 120)
#   suite  the full suite (T_SUITE, default 240)
#   bench  scripts/benchmark.py: the default step against PyTorch eager and torch.compile
#          (bf16, channels_last), batch 128 and 512 (T_BENCH each, default 150)
# Before it runs, here: wheels of ml-collections and grain (+ array-record, portpicker) for
# Python 3.12 in .whl/, the CIFAR-10 JPEG tar in .gpudata/ (both git-ignored, named in the
# device call's carry). The compiled programs go to runs/gpu-jit, kept while the machine is.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" runs
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/parts.log"; }
part() {  # part NAME LIMIT COMMAND...: runs COMMAND under LIMIT seconds, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  log "$name: start (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  log "$name: exit $? after $((SECONDS - t0))s"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ROTJAX_COMPILE_CACHE="$PWD/runs/gpu-jit"
DATA="$HOME/.cache/rotjax/cifar10-jpeg"
if [ ! -d "$DATA/train" ] && [ -f .gpudata/cifar10-jpeg.tar.xz ]; then
  mkdir -p "$DATA" && tar -xJf .gpudata/cifar10-jpeg.tar.xz -C "$DATA"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; uname -r
  python3 -c 'import sys, jax, flax, optax, orbax.checkpoint as o, numpy, torch
print(sys.version.split()[0], "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "orbax", o.__version__, "numpy", numpy.__version__, "torch", torch.__version__, jax.devices())'
} > "$OUT/machine.txt" 2>&1

for what in "$@"; do
  case $what in
    study)
      part study "${T_STUDY:-420}" python3 -m rotjax.study --config configs/study.py:gpu \
        --config.workdir=runs/study-gpu
      tar czf "$OUT/study-gpu.tgz" --exclude=checkpoints --exclude=best --exclude='events.out.*' \
        runs/study-gpu 2>> "$OUT/parts.log" ;;
    tests)
      part tests "${T_TESTS:-120}" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest -m gpu \
        -p no:cacheprovider --timeout=100 -rfEs tests ;;
    suite)
      part suite "${T_SUITE:-240}" env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 -m pytest \
        -p no:cacheprovider --timeout=100 -n 4 -rfE tests ;;
    bench)
      for batch in 128 512; do
        part "bench$batch" "${T_BENCH:-150}" python3 scripts/benchmark.py --batch "$batch" \
          --rounds 1 --only '^rotjax default \(auto\)$|^PyTorch (eager|compile) channels_last bf16$' \
          --json "$OUT/bench$batch.json"
      done ;;
    *) log "unknown part $what" ;;
  esac
done
log done
