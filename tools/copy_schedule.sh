#!/usr/bin/env bash
# results/fashion-mnist/VALIDATION.md#copy-schedule: attention copy's lr schedule chosen on the validation split
# (--val-size 5000), 3 seeds: the committed reproduction's (the cosine to 1e-6, no layer decay) against the
# release's copy command (its lr floor, a quarter of the peak, and layer decay 0.75 counted as its copy counts it,
# the head at the depth: RECIPES.md). Every other flag is the reproduction's copy stage. One run at a time on one
# core; a run whose records are already in results/ is skipped. Run from the repository root:
#     bash tools/copy_schedule.sh        # about an hour on one core of a 2-core AMD EPYC
set -euo pipefail
CORE=${CORE:-1} FAILED=0
R=runs/copy-schedule
OUT=results/fashion-mnist/validation/copy-schedule
BUDGET=(--data fashion-mnist --val-size 5000 --epochs 3 --warmup-epochs 0.3 --blr 0.004
        --teacher teachers/fashion-mnist-mae.pt)
RELEASE=(--min-lr-ratio 0.25 --layer-decay 0.75 --layer-decay-offset 0)

run() {   # run NAME SEED FLAGS...: one copy run on the validation split, its records copied to $OUT/NAME/seedSEED
  local name=$1 seed=$2 dest=$OUT/$1/seed$2
  shift 2
  [ -f "$dest/metrics.jsonl" ] && return 0
  echo "$(date +%T) $name seed $seed"
  local t0=$SECONDS
  OMP_NUM_THREADS=1 taskset -c "$CORE" nice python attention_copy.py "${BUDGET[@]}" --seed "$seed" "$@" \
      --out-dir "$R/$name/seed$seed" --overwrite true > "$R/$name-seed$seed.out" 2>&1 \
      || { echo "FAILED: $R/$name-seed$seed.out"; FAILED=1; return 0; }
  mkdir -p "$dest"
  cp "$R/$name/seed$seed/"{log.txt,config.json} "$dest/"
  echo $((SECONDS - t0)) > "$dest/wall_s.txt"
  cp "$R/$name/seed$seed/metrics.jsonl" "$dest/"      # last: its presence marks the run done
}

mkdir -p "$R" "$OUT"
for seed in 0 1 2; do
  run today "$seed"
  run release "$seed" "${RELEASE[@]}"
done
exit $FAILED
