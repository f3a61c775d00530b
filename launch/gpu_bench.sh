#!/usr/bin/env bash
# The one prepared GPU run of the flaxdose vs PyTorch benchmark (issue 6; docs/performance.md).
#
#   bash launch/gpu_bench.sh [main|levers|pipeline]      results under $OUT (default /tmp/flaxdose_bench)
#
# main     (~7 min): paper preset, 96x96x48 patches, batch 8: flaxdose fp32/bf16 (train, grain
#          end-to-end, full-volume inference) in one process, PyTorch eager fp32, eager bf16
#          autocast +/- channels_last_3d and torch.compile bf16 in another; merged into
#          $OUT/bench.json and $OUT/bench.md with the flaxdose/PyTorch ratios.
# levers   (~7 min): flaxdose bf16 batch 8 training, one lever per process (a fresh process is
#          needed for XLA flags): baseline, no donation, pmap, fused GroupNorm, flattened Adam,
#          XLA flag presets; merged into $OUT/levers.json / .md.
# pipeline (~6 min): grain end-to-end levers (prefetch depth, worker processes) and batch size.
#
# Python packages the GPU image lacks (grain, pydicom, ml-collections, tensorboardX and their
# dependencies) are carried as wheels in .whl/ (see docs/performance.md for the download line).
set -u
MODE=${1:-main}
OUT=${OUT:-/tmp/flaxdose_bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$(date +%s)
log() { echo "[$(( $(date +%s) - START ))s] $*"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && log "installed carried wheels"
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
else
  log "no .whl/ folder: relying on the image for grain, pydicom, ml-collections, tensorboardX"
fi
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || log "pip install -e . failed; using PYTHONPATH"
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import jax, torch, grain, flax; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.get_device_name(0)); print('flax', flax.__version__, 'grain ok')" 2>&1
} | tee "$OUT/machine.txt"

# PRESET=tiny BATCH=2 gives a quick dry run of the script on a CPU.
BENCH="$PY -m flaxdose.bench --preset ${PRESET:-paper} --batch ${BATCH:-8} --steps 20 --warmup 3"

case "$MODE" in
main)
  timeout 230 $BENCH --frameworks flax --dtypes fp32,bf16 --out "$OUT/flax.json" > "$OUT/flax.log" 2>&1
  log "flax done (rc $?)"; tail -n 25 "$OUT/flax.log"
  timeout 230 $BENCH --frameworks torch --out "$OUT/torch.json" > "$OUT/torch.log" 2>&1
  log "torch done (rc $?)"; tail -n 25 "$OUT/torch.log"
  $PY -m flaxdose.bench --merge "$OUT/flax.json" "$OUT/torch.json" --out "$OUT/bench.json" > "$OUT/summary.txt" 2>&1
  cat "$OUT/summary.txt"
  ;;
levers|pipeline)
  if [ "$MODE" = levers ]; then
    LEVERS=(
      "baseline|"
      "no_donate|--no-donate"
      "pmap|--flax-step pmap"
      "groupnorm_fused|--groupnorm fused"
      "adam_flat|--optimizer adam_flat"
      "xla_autotune0|--xla-flags autotune0"
      "xla_cmdbuf_off|--xla-flags cmdbuf_off"
      "xla_runtime_fusion|--xla-flags runtime_fusion"
      "xla_lhs|--xla-flags lhs"
    )
    COMMON="--frameworks flax --dtypes bf16 --tasks train --steps 15"
  else
    LEVERS=(
      "e2e_prefetch2|--prefetch 2"
      "e2e_prefetch4|--prefetch 4"
      "e2e_workers4|--workers 4 --prefetch 4"
      "batch4|--batch 4 --tasks train"
      "batch16|--batch 16 --tasks train"
    )
    COMMON="--frameworks flax --dtypes bf16 --tasks train,e2e --steps 30"
  fi
  FILES=()
  for item in "${LEVERS[@]}"; do
    name=${item%%|*}; args=${item#*|}
    if [ $(( $(date +%s) - START )) -gt 400 ]; then log "time budget reached; skipping $name and later levers"; break; fi
    # shellcheck disable=SC2086
    timeout 90 $BENCH $COMMON $args --tag "$name" --out "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    log "$name done (rc $?)"; grep -E "ms/step" "$OUT/$name.log" | tail -n 3
    [ -f "$OUT/$name.json" ] && FILES+=("$OUT/$name.json")
  done
  [ ${#FILES[@]} -gt 0 ] && $PY -m flaxdose.bench --merge "${FILES[@]}" --out "$OUT/$MODE.json" > "$OUT/$MODE.txt" 2>&1
  cat "$OUT/$MODE.txt" 2>/dev/null
  ;;
*)
  echo "unknown mode $MODE; use main, levers or pipeline" >&2; exit 2 ;;
esac
log "finished $MODE"
