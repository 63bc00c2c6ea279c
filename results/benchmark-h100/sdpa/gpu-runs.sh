export PYTHONUNBUFFERED=1
M=${M:-vit_base}; ML=${ML:-vit_large}; S=${S:-224}; SL=${SL:-448}; B=${B:-64}; ST=${ST:-300}; W=${W:-8}; FS=${FS:-4096}
O=${OUT:?name a folder for the logs}; T=/tmp/gpuruns; rm -rf $T; mkdir -p $T $O
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
C="--data fake --fake-size $FS --num-workers $W --patch-size 16"
python finetune.py $C --model $M --depth 12 --img-size $S --batch-size $B --max-steps 150 --epochs 3 --out-dir $T/tB > $O/teachers.log 2>&1; el "teacher B rc $?"
for impl in auto eager; do
  python attention_distill.py $C --teacher $T/tB/checkpoint.pt --img-size $S --batch-size $B --epochs 5 --max-steps $ST --log-every 25 --attn-implementation $impl --out-dir $T/d-$impl > $O/distill-B-$impl.log 2>&1; el "distill B $impl rc $?"
done
python attention_copy.py $C --teacher $T/tB/checkpoint.pt --img-size $S --batch-size $B --max-steps 2 --out-dir $T/cB > $O/checks.log 2>&1; el "copy B rc $?"
for s in $S $SL; do
  python finetune.py $C --model $ML --depth 24 --img-size $s --batch-size 16 --max-steps 10 --out-dir $T/tL$s >> $O/teachers.log 2>&1; el "teacher L $s rc $?"
  for sc in attention_distill attention_copy; do
    python $sc.py $C --teacher $T/tL$s/checkpoint.pt --img-size $s --batch-size 32 --max-steps 3 --log-every 1 --out-dir $T/$sc-L$s >> $O/checks.log 2>&1; el "$sc L $s rc $?"
  done
done
grep -h "start-up check\|attention:" $O/distill-B-*.log $O/checks.log
paste <(grep -o "step [0-9]*/[0-9]* | ce [0-9.]* attn [0-9.]*" $O/distill-B-auto.log) <(grep -o "ce [0-9.]* attn [0-9.]*" $O/distill-B-eager.log)
grep -h "^eval\|^final" $O/distill-B-*.log
