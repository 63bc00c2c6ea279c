#!/usr/bin/env bash
# The study of results/student-study/STUDY.md: which students take which teachers' attention, on Fashion-MNIST's
# validation split (5000 training images held out from every run, the teachers' training included).
# Every student: one epoch at blr 4e-3 (reproduce.py's fashion-mnist budget), seed 0. Run from the repository
# root: bash tools/student_study.sh  (about 15 min on 2 CPU cores; run directories under runs/study/)
set -euo pipefail
R=runs/study
MAE=teachers/fashion-mnist-mae.pt
V=(--data fashion-mnist --val-size 5000 --seed 0)
ONE=(--epochs 1 --warmup-epochs 0.1 --blr 4e-3)
COMP=(--layer-scale 0.1 --norm-pre true --act quick_gelu)      # DINOv2's layer scale, CLIP's pre-norm and activation
run() { local d=$R/$1; shift; [ -f "$d/done" ] && return 0; python "$@" --out-dir "$d" && touch "$d/done"; }

# a supervised teacher built like another family (3 epochs, the held-out images never seen)
run sup-comp-teacher finetune.py "${V[@]}" "${COMP[@]}" --epochs 3 --warmup-epochs 0.3 --blr 4e-3
SUP=$R/sup-comp-teacher/checkpoint.pt

run scratch                 finetune.py          "${V[@]}" "${ONE[@]}"
run scratch-comp            finetune.py          "${V[@]}" "${ONE[@]}" "${COMP[@]}"
run distill-mae             attention_distill.py "${V[@]}" "${ONE[@]}" --teacher $MAE
run copy-mae                attention_copy.py    "${V[@]}" "${ONE[@]}" --teacher $MAE
run distill-sup-plain       attention_distill.py "${V[@]}" "${ONE[@]}" --teacher $SUP --student-arch plain
run distill-sup-teacherarch attention_distill.py "${V[@]}" "${ONE[@]}" --teacher $SUP --student-arch teacher
run copy-sup-plain          attention_copy.py    "${V[@]}" "${ONE[@]}" --teacher $SUP --student-arch plain
run copy-sup-teacherarch    attention_copy.py    "${V[@]}" "${ONE[@]}" --teacher $SUP --student-arch teacher
# a smaller student: 3 layers of 2 heads from the 6-layer, 4-head MAE teacher (--layer-map auto, heads in pairs)
run scratch-small           finetune.py          "${V[@]}" "${ONE[@]}" --depth 3 --num-heads 2
run distill-mae-small       attention_distill.py "${V[@]}" "${ONE[@]}" --teacher $MAE --depth 3 --num-heads 2
run copy-mae-small          attention_copy.py    "${V[@]}" "${ONE[@]}" --teacher $MAE --depth 3 --num-heads 2
