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
# sweep    (~8 min): issue 7's check: the 8 fine-tunes of configs/sweep_gpu8.py packed on one
#          GPU (one wave, vmap) against the same 8 one after another (runs_per_device=1);
#          both train-stage wall times and their ratio in $OUT/sweep_timing.json.
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
  $PY -m flaxdose.bench --merge="$OUT/flax.json,$OUT/torch.json" --out "$OUT/bench.json" > "$OUT/summary.txt" 2>&1
  cat "$OUT/summary.txt"
  ;;
levers|pipeline)
  if [ "$MODE" = levers ]; then
    LEVERS=(
      "baseline|"
      "no_donate|--nodonate"
      "pmap|--flax_step pmap"
      "groupnorm_fused|--groupnorm fused"
      "adam_flat|--optimizer adam_flat"
      "xla_autotune0|--xla_flags=autotune0"
      "xla_cmdbuf_off|--xla_flags=cmdbuf_off"
      "xla_runtime_fusion|--xla_flags=runtime_fusion"
      "xla_lhs|--xla_flags=lhs"
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
  [ ${#FILES[@]} -gt 0 ] && $PY -m flaxdose.bench --merge="$(IFS=,; echo "${FILES[*]}")" --out "$OUT/$MODE.json" > "$OUT/$MODE.txt" 2>&1
  cat "$OUT/$MODE.txt" 2>/dev/null
  ;;
sweep)
  W=$OUT/sweep
  SW="$PY -m flaxdose.launch.sweep --config=${SWEEP_CONFIG:-sweep_gpu8}"
  # The sequential sweep reuses the packed sweep's data and source model: only the fine-tunes differ.
  SEQ="--config.runs_per_device=1 --config.source.path=$W/packed/source --config.data.folders={'internal_a':'$W/packed/data/internal_a'}"
  timeout 240 $SW --workdir "$W/packed" --stage=prepare > "$OUT/sweep_prepare.log" 2>&1; log "prepare done (rc $?)"
  # shellcheck disable=SC2086
  timeout 60 $SW --workdir "$W/sequential" $SEQ --stage=prepare > "$OUT/sweep_prepare_seq.log" 2>&1; log "sequential prepare done (rc $?)"
  t0=$(date +%s.%N)
  timeout 120 $SW --workdir "$W/packed" --stage=train > "$OUT/sweep_packed.log" 2>&1; rc1=$?
  t1=$(date +%s.%N)
  # shellcheck disable=SC2086
  timeout 240 $SW --workdir "$W/sequential" $SEQ --stage=train > "$OUT/sweep_sequential.log" 2>&1; rc2=$?
  t2=$(date +%s.%N)
  log "packed rc $rc1, sequential rc $rc2"
  $PY - "$t0" "$t1" "$t2" "$rc1" "$rc2" "$OUT/sweep_timing.json" "${SWEEP_CONFIG:-sweep_gpu8}" <<'PY'
import json, sys
t0, t1, t2 = map(float, sys.argv[1:4])
result = {"packed_s": round(t1 - t0, 1), "sequential_s": round(t2 - t1, 1), "ratio_packed_over_sequential": round((t1 - t0) / (t2 - t1), 3),
          "packed_rc": int(sys.argv[4]), "sequential_rc": int(sys.argv[5]), "what": f"train stage of sweep config {sys.argv[7]}, evaluation included"}
json.dump(result, open(sys.argv[6], "w"), indent=1)
print(result)
PY
  $PY -m flaxdose.launch.sweep --config="${SWEEP_CONFIG:-sweep_gpu8}" --workdir "$W/packed" --stage=report > /dev/null 2>&1
  cp -r "$W/packed/report" "$OUT/sweep_report" 2>/dev/null
  tail -n 3 "$OUT/sweep_packed.log" "$OUT/sweep_sequential.log"
  ;;
*)
  echo "unknown mode $MODE; use main, levers, pipeline or sweep" >&2; exit 2 ;;
esac
log "finished $MODE"
