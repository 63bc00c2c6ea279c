#!/usr/bin/env bash
# The follow-up's finding in miniature ("Attention Transfer Is Not Universally Effective for Vision Transformers",
# arXiv 2605.07191: a student that lacks its teacher's components fails to take its attention). An MAE teacher built
# like a failing family, pre-trained as the shipped one is (mae_pretrain.py's fashion-mnist preset, 24 epochs); then
# copy and distillation into a plain student (--student-arch plain) and into a matched one (--student-arch teacher: the
# teacher's components, randomly initialised), each beside its own scratch baseline (finetune.py, built the same
# way), seeds 0-2, on the committed reproduction's budget (3 epochs, warm-up 0.3 epoch, blr 4e-3, the test split).
# Every run is one process on one core; seed 0 of every arm before any seed 1. A run whose records are in $OUT is
# skipped, so the script resumes where it stopped, and a run another invocation is training is left to it, so two
# share the work: CORE=0 bash tools/followup.sh & CORE=1 bash tools/followup.sh, once the teacher exists. Run from the
# repository root: bash tools/followup.sh (hours on one core: a teacher took 25 min here, a run 3.5 to 6).
#
# The teacher holds out 5000 training images (--val-size 5000) whatever the runs do: its masked MSE on them, the
# family's teacher against the other's, is what FAMILY was chosen on, before any transfer ran. STOP=teacher ends the
# script once the teacher is made (how the other family's teacher is made for that comparison).
#
# FAMILY=clip (default): CLIP's LayerNorm before the blocks and QuickGELU, both at every layer of a plain student's
#   shape; dinov2: DINOv2's layer scale from its 1e-5. Not DINOv2's registers: a plain student cannot take maps that
#   cover register tokens (teacher.student_arch refuses it), so the plain arm would not exist.
# VAL_SIZE=5000: every run, the teacher's included, on 5000 training images held out (the split to choose FAMILY on).
# OUT= the records (default results/fashion-mnist/followup[-<family>][-val]), R= the run directories (default
# runs/followup/...), RIVAL_OUT= the other family's OUT ('' = no choice stated), CORE= the core (1), SEEDS= ("0 1 2"),
# TRY= flags added to every run (a dry run: TRY="--max-steps 2" OUT=/tmp/f R=/tmp/f/runs; not a result). REDO_PAGE=1
# only re-collects the page.
set -euo pipefail
FAMILY=${FAMILY:-clip} CORE=${CORE:-1} SEEDS=${SEEDS:-0 1 2} VAL_SIZE=${VAL_SIZE:-0} FAILED=0
read -r -a TRY <<< "${TRY:-}"
case $FAMILY in
  clip)   COMP=(--norm-pre true --act quick_gelu) RIVAL=followup-dinov2 ;;
  dinov2) COMP=(--layer-scale 1e-5) RIVAL=followup ;;
  *) echo "error: FAMILY=$FAMILY: use clip or dinov2" >&2; exit 2 ;;
esac
NAME=followup
[ "$FAMILY" = clip ] || NAME+=-$FAMILY
SPLIT=()
if [ "$VAL_SIZE" != 0 ]; then NAME+=-val; SPLIT=(--val-size "$VAL_SIZE"); fi
OUT=${OUT:-results/fashion-mnist/$NAME}        # what is committed: each run's log, metrics, config, wall time
RIVAL=${RIVAL_OUT-results/fashion-mnist/$RIVAL}  # the other family's (its teacher holds out the same images in every mode)
R=${R:-runs/$NAME}                              # run directories, checkpoints included (ignored by git)
TEACHER=$R/teacher.pt
BUDGET=(--data fashion-mnist "${SPLIT[@]}" --epochs 3 --warmup-epochs 0.3 --blr 0.004)
one_core() { OMP_NUM_THREADS=1 taskset -c "$CORE" nice python "$@"; }

record() {   # record NAME SEED_DIR RUN_DIR T0: a finished run's records copied to $OUT/logs/NAME/SEED_DIR
  local dest=$OUT/logs/$1/$2
  mkdir -p "$dest"
  cp "$3/"{log.txt,config.json} "$dest/"
  echo $((SECONDS - $4)) > "$dest/wall_s.txt"
  cp "$3/metrics.jsonl" "$dest/"                      # last: its presence marks the run done
}

teacher() {   # the MAE teacher with the family's components, pre-trained once, its encoder exported
  [ -f "$OUT/logs/teacher/seed0/metrics.jsonl" ] && [ -f "$TEACHER" ] && return 0
  echo "$(date +%T) teacher (MAE, $FAMILY's components: ${COMP[*]})"
  local t0=$SECONDS
  one_core mae_pretrain.py --data fashion-mnist --val-size 5000 --num-workers 0 "${COMP[@]}" "${TRY[@]}" \
      --out-dir "$R/teacher" --overwrite true --export "$TEACHER" > "$R/teacher.out" 2>&1 \
      || { echo "FAILED: $R/teacher.out"; exit 1; }
  record teacher seed0 "$R/teacher" "$t0"
}

run() {   # run NAME SEED SCRIPT FLAGS...: one training run
  local name=$1 seed=$2 script=$3
  shift 3
  [ -f "$OUT/logs/$name/seed$seed/metrics.jsonl" ] && return 0
  local lock
  exec {lock}> "$R/$name-seed$seed.lock"               # held while the run trains; gone with the process
  flock -n "$lock" || { exec {lock}>&-; return 0; }    # another invocation trains it
  [ -f "$OUT/logs/$name/seed$seed/metrics.jsonl" ] && { exec {lock}>&-; return 0; }   # it finished meanwhile
  echo "$(date +%T) $name seed $seed"
  local t0=$SECONDS
  one_core "$script" "${BUDGET[@]}" --seed "$seed" "$@" "${TRY[@]}" --out-dir "$R/$name/seed$seed" \
      --overwrite true > "$R/$name-seed$seed.out" 2>&1 \
      || { echo "FAILED: $R/$name-seed$seed.out"; FAILED=1; exec {lock}>&-; return 0; }
  record "$name" "seed$seed" "$R/$name/seed$seed" "$t0"
  exec {lock}>&-
}

mkdir -p "$R" "$OUT"
if [ -z "${REDO_PAGE:-}" ]; then
  teacher
  [ "${STOP:-}" = teacher ] && exit 0
  for seed in $SEEDS; do
    run scratch-plain "$seed" finetune.py                                           # the baselines
    run scratch-matched "$seed" finetune.py "${COMP[@]}"
    for method in copy distill; do                                                 # the two students
      run $method-plain "$seed" attention_$method.py --teacher "$TEACHER" --student-arch plain
      run $method-matched "$seed" attention_$method.py --teacher "$TEACHER" --student-arch teacher
    done
  done
  python -c "import os, torch; from util.files import cpu_name
print(f'{cpu_name()}, {os.cpu_count()} cores (one a run), torch {torch.__version__}')" > "$OUT/machine.txt"
fi
COMMAND="bash tools/followup.sh"
[ "$VAL_SIZE" = 0 ] || COMMAND="VAL_SIZE=$VAL_SIZE $COMMAND"
[ "$FAMILY" = clip ] || COMMAND="FAMILY=$FAMILY $COMMAND"
[ -z "${TRY:-}" ] || COMMAND="TRY='${TRY[*]}' $COMMAND"
python -m tools.followup --out "$OUT" --family "$FAMILY" --command "$COMMAND" --rival "$RIVAL"
exit $FAILED                                                                     # a failed run: named above
