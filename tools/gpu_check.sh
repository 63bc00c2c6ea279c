#!/usr/bin/env bash
# The GPU checks in one call (at most 9 minutes on one H100 / H200: each command has its timeout, 535 s in all, under
# the 600 s a device call may run): the machine and the attention kernels torch picks per shape; the `gpu` tests
# (with the fused attention's at ViT-L/16's shapes, whose measurements are printed apart), while a ViT-B/16
# distillation on `auto` runs beside one on `eager` on the same batches (and ViT-L/16 at 448 px meets the start-up
# check); then the paths only a GPU takes, each script on the `fake` set: held on the device and, memory said short,
# on the host; batched RandAugment; fp16 with its GradScaler; fp32 with TF32 on; a mid-epoch resume against an
# unbroken run, bit for bit (deterministic kernels); compiled against eager gradients, and a compiled run's start-up
# check (its layer compiled as the run compiles it); ensemble.py and evaluate.py
# (--shift) on a held set; torchrun with two processes (one where one GPU is all there is: NCCL takes one GPU a rank).
#   bash tools/gpu_check.sh OUT_DIR        # results/benchmark-<gpu>/README.md says what came of it
#   bash tools/gpu_check.sh OUT_DIR bench  # a second call: the fused attention's measurements, the benchmark of
#                                          # ViT-L/16 (270 s)
#   bash tools/gpu_check.sh OUT_DIR reproduce   # a third: the committed reproduction timed (at most 7 min)
#   bash tools/gpu_check.sh OUT_DIR small  # the Fashion-MNIST preset end to end, each method eager and compiled
#                                          # (the compilation counted: --compile auto's measurement), its step
#                                          # alone (9 min at most), then the reproduction: GPU_CHECK_UNTIL=<epoch s>
#                                          # cuts it to fit
#   GPU_CHECK_DRY=1 bash tools/gpu_check.sh OUT_DIR   # on a CPU: the script's own steps, each cut to seconds
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [checks | bench | small | reproduce]}
part=${2:-checks}
py=${PYTHON:-python3}
dry=${GPU_CHECK_DRY:-}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1

if [ "$part" = small ]; then   # the Fashion-MNIST preset end to end, eager and compiled; its step alone; the reproduction
  cut='' dev=cuda rounds='--rounds 5 --steps 50' eager=45 compiled=110
  [ -n "$dry" ] && cut='--max-steps 20' dev=cpu rounds='--rounds 1 --steps 2' eager=300 compiled=600
  # one epoch of each method, eager then compiled (--compile auto's choice on a GPU): img/s end to end counts from the
  # model built, the compilation included (the log's last line), and the wall time from the command's start; with
  # fashion-mnist's teacher (shipped) for copy and distillation
  teacher=(--teacher teachers/fashion-mnist-mae.pt)
  for run in 'finetune.py' "attention_distill.py ${teacher[*]}" "attention_copy.py ${teacher[*]}"; do
    for compile in false true; do
      name=fm-$(basename ${run%% *} .py)-compile-$compile
      t0=$SECONDS
      limit=$eager
      [ $compile = true ] && limit=$compiled
      timeout $limit $py $run --data fashion-mnist --epochs 1 --log-every 100 --compile $compile $cut \
        --out-dir "$out/$name" > "$out/$name.log" 2>&1
      echo "$name (1 epoch, end to end): exit $? after $((SECONDS - t0)) s, $(grep -h 'img/s' "$out/$name.log" | \
        tail -1 | grep -oE '[0-9]+ img/s') with the compilation counted"
    done
  done
  timeout 90 $py -m tools.benchmark --device $dev --models vit_tiny --img-size 28 --patch-size 4 --embed-dim 64 \
    --depth 6 --num-heads 8 --num-classes 10 --batch-size 128 --methods train --paths sdpa $rounds \
    --memory-batch-size 0 --saved-bytes false --out-dir "$out/fm-step" > "$out/fm-step.log" 2>&1
  echo "the step alone (tools.benchmark at the preset's shape, batch 128): exit $?"
  grep -E '^\| vit' "$out/fm-step/BENCHMARK.md"
  part=reproduce
fi
if [ "$part" = reproduce ]; then   # Fashion-MNIST's 3 seeds, every stage, from the shipped teacher (its files carried)
  quick=''
  [ -n "$dry" ] && quick='--quick true'
  nvidia-smi -L 2>/dev/null
  t0=$SECONDS limit=420
  [ -n "${GPU_CHECK_UNTIL:-}" ] && limit=$((GPU_CHECK_UNTIL - $(date +%s)))   # a deadline (epoch seconds) to fit a call
  timeout $limit $py -m tools.reproduce --data fashion-mnist --out-dir "$out/reproduce" $quick \
    > "$out/reproduce.log" 2>&1
  echo "tools.reproduce exit $? after $((SECONDS - t0)) s"
  tail -9 "$out/reproduce.log"
  exit 0
fi
if [ -n "$dry" ]; then   # what can run without a GPU: small shapes, one step, the tests that skip without CUDA
  device=cpu; shapes='tiny'; runs='--max-steps 1 --fake-size 64 --batch-size 8 --img-size 32'; bench='--quick true'
  stretch=20   # a shared 2-core CPU: ViT-L's one tiny step passed 80 s there; not counted in the 535 s
else
  device=cuda; shapes='vit_b-224 vit_l-224 vit_l-448'; runs=''; bench='--models vit_large --batch-size 104'
  stretch=1
fi

if [ "$part" = bench ]; then   # the fused attention's measurements and the benchmark (270 s)
# what the fused attention's gpu tests measured (the log-sum-exp entry point per shape, cuDNN's value gradient in the
# model's gradient layout and in a second one after it), printed
timeout 60 $py -m pytest -m gpu tests/test_fused_gpu.py -k 'entry_point or one_layout' -s -q -p no:cacheprovider \
  > "$out/pytest-fused.txt" 2>&1
grep -hE 'entry point|cuDNN value gradient|passed|skipped|failed' "$out/pytest-fused.txt"

# the benchmark, alone on the GPU (issue 66): ViT-L/16 at 224 px, batch 104, eager against sdpa
timeout 210 $py -m tools.benchmark --device $device $bench --methods train copy distill --paths eager sdpa \
  --rounds 3 --profile distill --out-dir "$out/bench-vit_large" > "$out/bench-vit_large.log" 2>&1
grep -E '^\| vit|^Kernels' "$out/bench-vit_large/BENCHMARK.md" || tail -5 "$out/bench-vit_large.log"
  echo "took $SECONDS s"
  exit 0
fi
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nproc; timeout 20 $py - "$device" $shapes <<'EOF'
import sys, torch
from einops import rearrange
from attention_distill import cuda_lse
from util.attention_check import sdpa_backend
print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| cuDNN', torch.backends.cudnn.version())
device, shapes = sys.argv[1], {'vit_b-224': (64, 12, 197), 'vit_l-224': (104, 16, 197), 'vit_l-448': (8, 16, 785),
                               'tiny': (2, 4, 17)}
for name in sys.argv[2:]:
    b, h, n = shapes[name]
    qkv = torch.randn(b, n, 3 * h * 64, device=device, dtype=torch.bfloat16)   # q, k, v as a layer makes them
    q, k, v = rearrange(qkv, 'b n (three h d) -> three b h n d', three=3, h=h).unbind(0)
    lse = cuda_lse(q, k, v)[0] if device == 'cuda' else "the CPU's flash"
    print(f'{name}: q {tuple(q.shape)} bf16: F.scaled_dot_product_attention picks {sdpa_backend(q, k, v)}; '
          f"the map-free loss's log-sum-exp entry point: {lse}")
EOF
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

# 1. the tests, and beside them two short distillations (losses only: their speeds are not measured here)
workers=$($py -c 'import xdist' 2>/dev/null && echo '-n 6')   # pytest-xdist where it is installed
timeout 240 $py -m pytest -m gpu tests --ignore tests/test_tutorial.py --ignore tests/test_palette.py $workers -rs -q --durations 10 -p no:cacheprovider \
  > "$out/pytest-gpu.txt" 2>&1 &
tests=$!
{
  r=$out/logs
  sharpen() {   # a random teacher's maps are near uniform; scaled q and k rows make them peaked, as a trained one's
    timeout $((20 * stretch)) $py -c "import sys, torch; ck = torch.load(sys.argv[1], weights_only=True)
for key, w in ck['model'].items():
    if key.endswith('attn.qkv.weight'): w[:2 * w.shape[0] // 3] *= 4
torch.save(ck, sys.argv[2])" "$1" "$2"
  }
  fake=(--data fake --epochs 1 --warmup-epochs 0 --num-workers 6)
  # each under its own timeout, the five and two sharpenings together within 255 s, beside the tests' 240 s (on an
  # H200: distill-b 22 s of training; on a fresh H100 the 448 px teacher and its sharpening took 42 s, the
  # distillation 35 s in all)
  timeout $((25 * stretch)) $py finetune.py "${fake[@]}" --model vit_base --depth 12 --img-size 224 --patch-size 16 --batch-size 64 \
    --fake-size 256 --max-steps 1 --out-dir "$r/teacher-b" $runs && sharpen "$r/teacher-b/checkpoint.pt" "$r/teacher-b.pt"
  for impl in auto eager; do
    timeout $((50 * stretch)) $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-b.pt" --img-size 224 --layers 0-8 --batch-size 64 \
      --fake-size 19200 --max-steps 300 --log-every 10 --attn-implementation $impl --out-dir "$r/distill-b-$impl" $runs
  done
  timeout $((40 * stretch)) $py finetune.py "${fake[@]}" --model vit_large --depth 24 --img-size 448 --patch-size 16 --batch-size 8 \
    --fake-size 64 --max-steps 1 --out-dir "$r/teacher-l448" $runs && sharpen "$r/teacher-l448/checkpoint.pt" "$r/teacher-l448.pt"
  timeout $((50 * stretch)) $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-l448.pt" --img-size 448 --layers 0-17 --batch-size 8 \
    --fake-size 64 --max-steps 2 --log-every 1 --out-dir "$r/distill-l448-auto" $runs
} > "$out/runs.log" 2>&1
wait $tests; echo "pytest exit $?" >> "$out/pytest-gpu.txt"
tail -4 "$out/pytest-gpu.txt"; grep -h 'start-up check' "$out"/logs/*/log.txt
# 2. the paths only a GPU takes, on the `fake` set held in memory (8 steps an epoch), each command under its timeout
p=$out/paths
mkdir -p "$p"
tiny=(--data fake --fake-size 256 --num-workers 0 --epochs 1 --warmup-epochs 0 --log-every 1)
t() { timeout $(($1 * stretch)) "${@:2}" || echo "FAILED (exit $?, timeout $(($1 * stretch)) s): ${*:2:4}"; }
# deterministic kernels (cuBLAS's workspace fixed): two runs of the same steps are the same bits
det=(env CUBLAS_WORKSPACE_CONFIG=:4096:8 $py -c 'import runpy, sys, torch
torch.use_deterministic_algorithms(True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")')
{
  # held on the device, batched RandAugment, drop-path (the CUDA generator), fp16 with its GradScaler: 6 steps unbroken,
  # and 3 steps, then resumed mid-epoch to the same 6
  same=("${tiny[@]}" --amp fp16 --randaug rand-m9-mstd0.5-inc1 --drop-path 0.1)
  t 20 "${det[@]}" finetune.py "${same[@]}" --max-steps 6 --out-dir "$p/whole"
  t 20 "${det[@]}" finetune.py "${same[@]}" --max-steps 3 --out-dir "$p/resumed"
  t 20 "${det[@]}" finetune.py "${same[@]}" --max-steps 6 --out-dir "$p/resumed" --resume true
  t 10 $py -c "import sys, torch
a, b = (torch.load(f + '/checkpoint.pt', weights_only=True)['model'] for f in sys.argv[1:])
print('mid-epoch resume against the unbroken run:', 'bit for bit' if all(torch.equal(a[k], b[k]) for k in a)
      else 'DIFFERS')" "$p/whole" "$p/resumed"
  # the host fallback (the GPU's free memory said too small for the set), compiled, on sdpa (a CPU too): the start-up
  # check runs the student's layer compiled by inductor, as the run compiles it (two compilations, the check's and
  # the run's); a wrong verdict stops it in one line
  t 45 $py -c 'import runpy, sys, torch
torch.cuda.mem_get_info = lambda *device: (0, 2 ** 34)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")' finetune.py "${tiny[@]}" --max-steps 2 --compile true \
    --attn-implementation sdpa --out-dir "$p/host"
  # fp32 with TF32 on (processes()): the start-up check's verdict against its fp32 definition
  t 20 $py finetune.py "${tiny[@]}" --amp off --max-steps 2 --out-dir "$p/fp32"
  # compiled against eager: a ViT's gradients, fp32 without TF32 (inductor on CUDA; aot_eager on a CPU)
  t 50 $py - "$device" <<'EOF'
import sys, torch
from vit import VisionTransformer, set_attn_implementation
device = torch.device(sys.argv[1])
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
for implementation in ('eager', 'sdpa'):
    torch.manual_seed(0)
    model = set_attn_implementation(VisionTransformer(img_size=32, patch_size=8, num_classes=10, embed_dim=192,
                                                      depth=2, num_heads=3), implementation).to(device)
    x, grads = torch.randn(8, 3, 32, 32, device=device), []
    for run in (model, torch.compile(model, backend='inductor' if device.type == 'cuda' else 'aot_eager')):
        model.zero_grad()
        run(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    far = ((grads[0] - grads[1]).norm() / grads[0].norm()).item()
    print(f'compiled against eager, {implementation}: gradients {far:.1e} apart', 'ok' if far < 1e-4 else 'FAR')
EOF
  # ensemble.py and evaluate.py (--shift) on the held set, on the device
  models=(--models "$p/whole/checkpoint.pt" "$p/fp32/checkpoint.pt" --data fake --num-workers 0)
  t 20 $py ensemble.py "${models[@]}" --out "$p/ensemble.json"
  t 20 $py evaluate.py "${models[@]}" --ensembles 0,1 --shift none noise --out "$p/robustness"
  # torchrun: two processes (gloo on a CPU; NCCL takes a GPU a rank: one process where one GPU is all there is)
  procs=2
  [ "$device" = cuda ] && procs=$(timeout 20 $py -c 'import torch; print(min(2, torch.cuda.device_count()))')
  t 35 $py -m torch.distributed.run --standalone --nproc_per_node "${procs:-1}" finetune.py "${tiny[@]}" \
    --max-steps 2 --out-dir "$p/procs"
} > "$out/paths.log" 2>&1
echo "paths exit $?"
grep -hE 'bit for bit|DIFFERS|compiled against|held in the host|process\(es\) on|start-up check|FAILED|error' \
  "$out/paths.log" | cut -c1-200
echo "took $SECONDS s"
