#!/usr/bin/env bash
# The GPU checks in one call (about 8 minutes on one H100 / H200): the machine and the attention kernel torch picks
# per shape; the `gpu` tests, while a ViT-B/16 distillation on `auto` runs beside one on `eager` on the same batches
# (and ViT-L/16 at 448 px meets the start-up check); then the benchmark alone on the GPU (eager against sdpa), and
# Fashion-MNIST's preset end to end (tools/benchmark_input.py).
#   bash tools/gpu_check.sh OUT_DIR        # results/benchmark-<gpu>/README.md says what came of it
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR}
py=${PYTHON:-python3}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nproc; $py - <<'EOF'
import sys, torch
from einops import rearrange
from util.run import sdpa_backend
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version())
for name, (b, h, n) in {'vit_b-224': (64, 12, 197), 'vit_l-224': (104, 16, 197), 'vit_l-448': (8, 16, 785)}.items():
    qkv = torch.randn(b, n, 3 * h * 64, device='cuda', dtype=torch.bfloat16)   # q, k, v as a layer makes them
    q, k, v = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=h).unbind(0)
    print(f'{name}: F.scaled_dot_product_attention picks {sdpa_backend(q, k, v)} for q {tuple(q.shape)} bf16')
EOF
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

# 1. the tests, and beside them two short distillations (losses only: their speeds are not measured here)
timeout 250 $py -m pytest -m gpu tests --ignore tests/test_tutorial.py --ignore tests/test_palette.py -n 6 -rs -q --durations 10 -p no:cacheprovider \
  > "$out/pytest-gpu.txt" 2>&1 &
tests=$!
{
  r=$out/logs
  sharpen() {   # a random teacher's maps are near uniform; scaled q and k rows make them peaked, as a trained one's
    $py -c "import sys, torch; ck = torch.load(sys.argv[1], weights_only=True)
for key, w in ck['model'].items():
    if key.endswith('attn.qkv.weight'): w[:2 * w.shape[0] // 3] *= 4
torch.save(ck, sys.argv[2])" "$1" "$2"
  }
  fake=(--data fake --epochs 1 --warmup-epochs 0 --num-workers 6)
  $py finetune.py "${fake[@]}" --model vit_base --depth 12 --img-size 224 --patch-size 16 --batch-size 64 \
    --fake-size 256 --max-steps 1 --out-dir "$r/teacher-b" && sharpen "$r/teacher-b/checkpoint.pt" "$r/teacher-b.pt"
  for impl in auto eager; do
    $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-b.pt" --img-size 224 --layers 0-8 --batch-size 64 \
      --fake-size 19200 --max-steps 300 --log-every 10 --attn-implementation $impl --out-dir "$r/distill-b-$impl"
  done
  $py finetune.py "${fake[@]}" --model vit_large --depth 24 --img-size 448 --patch-size 16 --batch-size 8 \
    --fake-size 64 --max-steps 1 --out-dir "$r/teacher-l448" && sharpen "$r/teacher-l448/checkpoint.pt" "$r/teacher-l448.pt"
  $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-l448.pt" --img-size 448 --layers 0-17 --batch-size 8 \
    --fake-size 64 --max-steps 2 --log-every 1 --out-dir "$r/distill-l448-auto"
} > "$out/runs.log" 2>&1
wait $tests; echo "pytest exit $?" >> "$out/pytest-gpu.txt"
tail -4 "$out/pytest-gpu.txt"; grep -h 'start-up check' "$out"/runs/*/log.txt

# 2. the benchmark, alone on the GPU: the batches of the earlier H100 run
for m in 'vit_base 328' 'vit_large 104'; do
  set -- $m
  timeout 150 $py -m tools.benchmark --device cuda --models $1 --batch-size $2 --methods train copy distill \
    --paths eager sdpa --rounds 3 --profile distill --out-dir "$out/bench-$1" > "$out/bench-$1.log" 2>&1
  grep -E '^\| vit' "$out/bench-$1/BENCHMARK.md" || tail -5 "$out/bench-$1.log"
done

# 3. the input bound: Fashion-MNIST's preset end to end beside its step alone (its files in data/, carried, or Debian's)
timeout 120 $py -m tools.benchmark_input --device cuda --presets fashion-mnist --out-dir "$out/input" > "$out/input.log" 2>&1
grep -E '^\| fashion' "$out/input/INPUT.md" || tail -3 "$out/input.log"
echo "took $SECONDS s"
