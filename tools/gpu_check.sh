#!/usr/bin/env bash
# The GPU checks in one call (at most 9 minutes on one H100 / H200: each part has its timeout, 530 s in all, under
# the 600 s a device call may run): the machine and the attention kernels torch picks per shape; the `gpu` tests
# (with the fused attention's at ViT-L/16's shapes, whose measurements are printed apart),
# while a ViT-B/16 distillation on `auto` runs beside one on `eager` on the same batches (and ViT-L/16 at 448 px meets
# the start-up check); then the benchmark of the GPU issue alone on the GPU: ViT-L/16 at 224 px, batch 104, plain,
# copy and distillation on eager and sdpa, their peak memory and the kernels of the sdpa path, distillation profiled;
# last, Fashion-MNIST's preset end to end beside its step alone (tools/benchmark_input.py).
#   bash tools/gpu_check.sh OUT_DIR        # results/benchmark-<gpu>/README.md says what came of it
#   bash tools/gpu_check.sh OUT_DIR reproduce   # a second call: the committed reproduction timed (at most 7 min)
#   GPU_CHECK_DRY=1 bash tools/gpu_check.sh OUT_DIR   # on a CPU: the script's own steps, each cut to seconds
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [checks | reproduce]}
part=${2:-checks}
py=${PYTHON:-python3}
dry=${GPU_CHECK_DRY:-}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1

if [ "$part" = reproduce ]; then   # Fashion-MNIST's 3 seeds, every stage, from the shipped teacher (its files carried)
  quick=''
  [ -n "$dry" ] && quick='--quick true'
  nvidia-smi -L 2>/dev/null
  timeout 420 $py -m tools.reproduce --data fashion-mnist --out-dir "$out/reproduce" $quick \
    > "$out/reproduce.log" 2>&1
  echo "tools.reproduce exit $? after $SECONDS s"
  tail -9 "$out/reproduce.log"
  exit 0
fi
if [ -n "$dry" ]; then   # what can run without a GPU: small shapes, one step, the tests that skip without CUDA
  device=cpu; shapes='tiny'; runs='--max-steps 1 --fake-size 64 --batch-size 8 --img-size 32'; bench='--quick true'
  stretch=20   # a shared 2-core CPU: ViT-L's one tiny step passed 80 s there; not counted in the 530 s
else
  device=cuda; shapes='vit_b-224 vit_l-224 vit_l-448'; runs=''; bench='--models vit_large --batch-size 104'
  stretch=1
fi

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nproc; $py - "$device" $shapes <<'EOF'
import sys, torch
from einops import rearrange
from attention_distill import CUDA_LSE, first_that_runs
from util.attention_check import sdpa_backend
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version())
device, shapes = sys.argv[1], {'vit_b-224': (64, 12, 197), 'vit_l-224': (104, 16, 197), 'vit_l-448': (8, 16, 785),
                               'tiny': (2, 4, 17)}
for name in sys.argv[2:]:
    b, h, n = shapes[name]
    qkv = torch.randn(b, n, 3 * h * 64, device=device, dtype=torch.bfloat16)   # q, k, v as a layer makes them
    q, k, v = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=h).unbind(0)
    lse = first_that_runs(CUDA_LSE, q, k, v)[0] if device == 'cuda' else "the CPU's flash"
    print(f'{name}: q {tuple(q.shape)} bf16: F.scaled_dot_product_attention picks {sdpa_backend(q, k, v)}; '
          f"the map-free loss's log-sum-exp entry point: {lse}")
EOF
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

# 1. the tests, and beside them two short distillations (losses only: their speeds are not measured here)
workers=$($py -c 'import xdist' 2>/dev/null && echo '-n 6')   # pytest-xdist where it is installed
timeout 180 $py -m pytest -m gpu tests --ignore tests/test_tutorial.py --ignore tests/test_palette.py $workers -rs -q --durations 10 -p no:cacheprovider \
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
  # each under its own timeout, the five together within the tests' 180 s (on an H200: distill-b 22 s of training)
  timeout $((25 * stretch)) $py finetune.py "${fake[@]}" --model vit_base --depth 12 --img-size 224 --patch-size 16 --batch-size 64 \
    --fake-size 256 --max-steps 1 --out-dir "$r/teacher-b" $runs && sharpen "$r/teacher-b/checkpoint.pt" "$r/teacher-b.pt"
  for impl in auto eager; do
    timeout $((65 * stretch)) $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-b.pt" --img-size 224 --layers 0-8 --batch-size 64 \
      --fake-size 19200 --max-steps 300 --log-every 10 --attn-implementation $impl --out-dir "$r/distill-b-$impl" $runs
  done
  timeout $((10 * stretch)) $py finetune.py "${fake[@]}" --model vit_large --depth 24 --img-size 448 --patch-size 16 --batch-size 8 \
    --fake-size 64 --max-steps 1 --out-dir "$r/teacher-l448" $runs && sharpen "$r/teacher-l448/checkpoint.pt" "$r/teacher-l448.pt"
  timeout $((15 * stretch)) $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-l448.pt" --img-size 448 --layers 0-17 --batch-size 8 \
    --fake-size 64 --max-steps 2 --log-every 1 --out-dir "$r/distill-l448-auto" $runs
} > "$out/runs.log" 2>&1
wait $tests; echo "pytest exit $?" >> "$out/pytest-gpu.txt"
tail -4 "$out/pytest-gpu.txt"; grep -h 'start-up check' "$out"/logs/*/log.txt
# what the fused attention's gpu tests measured (the log-sum-exp entry point per shape, cuDNN's value gradient given
# an incoming gradient with its output's strides), printed
timeout 60 $py -m pytest -m gpu tests/test_fused_gpu.py -k 'entry_point or fault_is_met' -s -q -p no:cacheprovider \
  > "$out/pytest-fused.txt" 2>&1
grep -hE 'entry point|cuDNN value gradient|passed|skipped|failed' "$out/pytest-fused.txt"

# 2. the benchmark, alone on the GPU (issue 66): ViT-L/16 at 224 px, batch 104, eager against sdpa
timeout 210 $py -m tools.benchmark --device $device $bench --methods train copy distill --paths eager sdpa \
  --rounds 3 --profile distill --out-dir "$out/bench-vit_large" > "$out/bench-vit_large.log" 2>&1
grep -E '^\| vit|^Kernels' "$out/bench-vit_large/BENCHMARK.md" || tail -5 "$out/bench-vit_large.log"

# 3. the input bound: Fashion-MNIST's preset end to end beside its step alone (its files in data/, carried, or Debian's)
timeout 80 $py -m tools.benchmark_input --device $device --presets fashion-mnist --out-dir "$out/input" > "$out/input.log" 2>&1
grep -E '^\| fashion' "$out/input/INPUT.md" || tail -3 "$out/input.log"
echo "took $SECONDS s"
