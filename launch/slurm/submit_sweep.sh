#!/usr/bin/env bash
# Submit a fine-tuning sweep as three dependent SLURM jobs: prepare -> job array of shards -> report.
#
#   CONFIG=sweep_cpu WORKDIR=/shared/sweeps/mine SHARDS=8 [SWEEP_ARGS="--config.base.train.steps=400"] \
#     bash launch/slurm/submit_sweep.sh
#
# Extra sbatch options (partition, account) go in SBATCH_ARGS. Run it from the repository root.
set -euo pipefail
: "${CONFIG:?set CONFIG}" "${WORKDIR:?set WORKDIR (on a shared filesystem)}"
SHARDS=${SHARDS:-4}
export CONFIG WORKDIR SWEEP_ARGS="${SWEEP_ARGS:-}" FLAXDOSE_REPO=$PWD
# shellcheck disable=SC2086
prep=$(sbatch --parsable ${SBATCH_ARGS:-} --job-name=flaxdose-sweep-prepare --gres=gpu:1 --time=04:00:00 \
  --wrap "python -m flaxdose.launch.sweep --config=$CONFIG --workdir=$WORKDIR --stage=prepare $SWEEP_ARGS")
# shellcheck disable=SC2086
array=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency=afterok:$prep --array=0-$((SHARDS - 1)) launch/slurm/sweep_array.sbatch)
# shellcheck disable=SC2086
report=$(sbatch --parsable ${SBATCH_ARGS:-} --dependency=afterany:$array --job-name=flaxdose-sweep-report --time=00:30:00 \
  --wrap "python -m flaxdose.launch.sweep --config=$CONFIG --workdir=$WORKDIR --stage=report $SWEEP_ARGS")
echo "prepare $prep -> shards $array (x$SHARDS) -> report $report; results: $WORKDIR/report/summary.md"
