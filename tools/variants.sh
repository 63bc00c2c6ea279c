#!/usr/bin/env bash
# results/fashion-mnist/variants/README.md: the paper's other findings in miniature, on the committed reproduction's
# budget (3 epochs a stage, warm-up 0.3 epoch, blr 4e-3, the shipped MAE teacher, the test split). Every run is one
# process on one core; one at a time, the most important questions first and seeds 0 and 1 of every variant before
# any seed 2. A run whose records are already in results/ is skipped, so the script resumes where it stopped.
# The baselines (scratch, fine-tune, copy and distillation of the map with layers 0-4, all 8 heads) are the committed
# reproduction's runs (results/fashion-mnist/logs) and models (results/fashion-mnist/features/models), not re-made.
# Run from the repository root: bash tools/variants.sh   (about 14 hours on one core of a 2-core Xeon; see the page)
# CORE=1 (default) names the core; REDO_PAGE=1 only re-collects variants.json and redraws the figure.
set -euo pipefail
CORE=${CORE:-1} FAILED=0
R=runs/variants                                # run directories, checkpoints included (ignored by git)
OUT=results/fashion-mnist/variants             # what is committed: each run's log, metrics, config, wall time
MODELS=results/fashion-mnist/features/models   # the committed reproduction's models, seeds 0-2
BUDGET=(--data fashion-mnist --epochs 3 --warmup-epochs 0.3 --blr 0.004 --teacher teachers/fashion-mnist-mae.pt)
one_core() { OMP_NUM_THREADS=1 taskset -c "$CORE" nice python "$@"; }

run() {   # run NAME SEED SCRIPT FLAGS...: one training run, its records copied to $OUT/logs/NAME/seedSEED
  local name=$1 seed=$2 script=$3 dest=$OUT/logs/$1/seed$2
  shift 3
  [ -f "$dest/metrics.jsonl" ] && return 0
  echo "$(date +%T) $name seed $seed"
  local t0=$SECONDS
  one_core "$script" "${BUDGET[@]}" --seed "$seed" "$@" --out-dir "$R/$name/seed$seed" --overwrite true \
      > "$R/$name-seed$seed.out" 2>&1 || { echo "FAILED: $R/$name-seed$seed.out"; FAILED=1; return 0; }
  mkdir -p "$dest"
  cp "$R/$name/seed$seed/"{log.txt,config.json} "$dest/"
  echo $((SECONDS - t0)) > "$dest/wall_s.txt"
  cp "$R/$name/seed$seed/metrics.jsonl" "$dest/"      # last: its presence marks the run done
}

shifted() {   # the committed models of one seed on each shifted test split (no training)
  local seed=$1 dest=$OUT/shift/seed$1 m=$MODELS
  [ -f "$dest/robustness.json" ] && return 0
  echo "$(date +%T) shifted test images, seed $seed"
  local t0=$SECONDS
  one_core evaluate.py --data fashion-mnist --num-workers 1 --out "$dest" --ensembles 1,3 \
      --models "$m/scratch-$seed.pt" "$m/finetune-$seed.pt" "$m/copy-$seed.pt" "$m/distill-$seed.pt" \
      --shift none translate invert rotate blur noise > "$R/shift-seed$seed.out" 2>&1 \
      || { echo "FAILED: $R/shift-seed$seed.out"; FAILED=1; return 0; }
  echo $((SECONDS - t0)) > "$dest/wall_s.txt"
}

variants() {   # every variant of phases 1-4 for one seed
  local seed=$1
  for w in q k v; do                                                     # 1. what is transferred
    run distill-$w "$seed" attention_distill.py --transfer $w
    run copy-$w "$seed" attention_copy.py --transfer $w
  done
  run distill-heads2 "$seed" attention_distill.py --heads 0-1           # 2. how many of the 8 heads
  run distill-heads4 "$seed" attention_distill.py --heads 0-3
  run distill-layers0-2 "$seed" attention_distill.py --layers 0-2       # 3. which layers (of 0-5)
  run distill-layers3-5 "$seed" attention_distill.py --layers 3-5
  for over in batch queries; do                                          # 4. the maps averaged
    run distill-mean-$over "$seed" attention_distill.py --average-maps $over
    run copy-mean-$over "$seed" attention_copy.py --average-maps $over
  done
}

mkdir -p "$R" "$OUT"
if [ -z "${REDO_PAGE:-}" ]; then
  for seed in 0 1 2; do shifted $seed; done                              # 5. shifted test images
  for seed in 0 1 2; do variants $seed; done                             # seeds 0 and 1 first, then 2
  for seed in 0 1 2; do                                                  # 6. one layer at a time
    for layer in 0 1 2 3 4 5; do run distill-layer$layer "$seed" attention_distill.py --layers $layer; done
  done
  for seed in 0 1 2; do                                                  # 7. controls: no teacher in the maps
    run distill-uniform "$seed" attention_distill.py --maps uniform
    run distill-local "$seed" attention_distill.py --maps local
  done
fi
python -m tools.variants                                                 # variants.json and variants.png
exit $FAILED                                                             # a failed run: named above, not recorded
