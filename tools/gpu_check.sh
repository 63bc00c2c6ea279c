#!/usr/bin/env bash
# The GPU checks in one call (about 4 minutes on one H100 / H200, each command under its timeout): the machine and
# the attention kernels torch picks per shape; then four jobs side by side, none of them timed: the `gpu` tests; the
# start-up checks at ViT-B/16 and at ViT-L/16 448 px, their printed errors compared line by line with round six's
# (results/benchmark-h100/round6/checks.txt); the paths only a GPU takes, each script on the `fake` set (held on the
# device and, memory said short, on the host; fp16 with its GradScaler, a mid-epoch resume against an unbroken run,
# bit for bit, and so for the graphed step, and it against eager in fp32; fp32 with TF32 on; compiled against eager
# gradients; ensemble.py, and evaluate.py under every shift;
# torchrun); and each training script's steps with every per-step option on under
# torch.cuda.set_sync_debug_mode('error'): a host sync inside a step stops its run with a traceback.
#   bash tools/gpu_check.sh OUT_DIR        # results/benchmark-<gpu>/README.md says what came of it
#   bash tools/gpu_check.sh OUT_DIR bench  # the fused attention's measurements, the benchmark of ViT-L/16 (270 s),
#                                          # then its steps compiled as --compile true trains (at most 300 s)
#   bash tools/gpu_check.sh OUT_DIR reproduce   # the committed reproduction timed (at most 7 min)
#   bash tools/gpu_check.sh OUT_DIR notebook    # tutorial.ipynb in full mode, timed (at most 580 s)
#   bash tools/gpu_check.sh OUT_DIR small  # under 5 minutes: the graphed step against eager and against itself
#                                          # resumed (as the checks do); the Fashion-MNIST preset one epoch
#                                          # eager, graphed (--cuda-graph) and compiled, each with its img/s per
#                                          # interval and wall time from the command's start; the graphed step
#                                          # under torch.profiler;
#                                          # then the reproduction timed whole (--jobs 0: auto), the GPU sampled beside
#   GPU_CHECK_UNTIL=<epoch s> bash tools/gpu_check.sh ...   # each command cut to end by then (parts in one call)
#   GPU_CHECK_DRY=1 bash tools/gpu_check.sh OUT_DIR   # on a CPU: the script's own steps, each cut to seconds
set -uo pipefail
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [checks | bench | small | reproduce | notebook]}
part=${2:-checks}
py=${PYTHON:-python3}
dry=${GPU_CHECK_DRY:-}
mkdir -p "$out/logs"
export PYTHONUNBUFFERED=1

left() {   # seconds to GPU_CHECK_UNTIL (epoch seconds), less $1; 100000 without a deadline
  [ -z "${GPU_CHECK_UNTIL:-}" ] && { echo 100000; return; }
  echo $((GPU_CHECK_UNTIL - $(date +%s) - ${1:-0}))
}
within() {   # within LIMIT COMMAND...: the command under LIMIT seconds, or what is left to the deadline if less
  local limit=$1 rest
  rest=$(left 5)
  [ "$rest" -lt "$limit" ] && limit=$rest
  [ "$limit" -lt 10 ] && { echo "not run (the deadline): ${*:2:3}"; return 124; }
  timeout "$limit" "${@:2}"
}

if [ -n "$dry" ]; then   # what can run without a GPU: small shapes, one step, the tests that skip without CUDA
  device=cpu; shapes='tiny'; runs='--max-steps 1 --fake-size 64 --batch-size 8 --img-size 32'; bench='--quick true'
  stretch=20   # a shared 2-core CPU: ViT-L's one tiny step passed 80 s there; not counted in the 535 s
else
  device=cuda; shapes='vit_b-224 vit_l-224 vit_l-448'; runs=''; bench='--models vit_large --batch-size 104'
  stretch=1
fi
t() { timeout $(($1 * stretch)) "${@:2}" || echo "FAILED (exit $?, timeout $(($1 * stretch)) s): ${*:2:4}"; }
tiny=(--data fake --fake-size 256 --num-workers 0 --epochs 1 --warmup-epochs 0 --log-every 1)
# deterministic kernels (cuBLAS's workspace fixed): two runs of the same steps are the same bits
det=(env CUBLAS_WORKSPACE_CONFIG=:4096:8 $py -c 'import runpy, sys, torch
torch.use_deterministic_algorithms(True)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")')
p=$out/paths   # the device paths' runs (graph_checks, the checks)
graph_checks() {   # the graphed step (--cuda-graph) against itself resumed and against eager, into $p
  local graphed=true graph
  mkdir -p "$p"
  # the graphed step (--cuda-graph, bf16, drop-path): 12 steps unbroken, and 5 then resumed mid-epoch to the same 12
  # (each process captures after its first 3 eager steps), bit for bit; then fp32, eager against graphed, 12 steps
  [ "$device" = cpu ] && graphed=auto   # a CPU captures nothing: auto runs eager
  graph=("${tiny[@]}" --epochs 2 --drop-path 0.1 --cuda-graph $graphed)
  t 25 "${det[@]}" finetune.py "${graph[@]}" --amp bf16 --max-steps 12 --out-dir "$p/graph-whole"
  t 25 "${det[@]}" finetune.py "${graph[@]}" --amp bf16 --max-steps 5 --out-dir "$p/graph-resumed"
  t 25 "${det[@]}" finetune.py "${graph[@]}" --amp bf16 --max-steps 12 --out-dir "$p/graph-resumed" --resume true
  t 25 "${det[@]}" finetune.py "${graph[@]}" --amp off --max-steps 12 --out-dir "$p/graph-fp32"
  t 25 "${det[@]}" finetune.py "${graph[@]}" --amp off --max-steps 12 --cuda-graph false --out-dir "$p/eager-fp32"
  t 10 $py -c "import sys, torch
a, b, c, d = (torch.load(f + '/checkpoint.pt', weights_only=True)['model'] for f in sys.argv[1:])
print('graphed, mid-epoch resume against the unbroken run:', 'bit for bit' if all(torch.equal(a[k], b[k]) for k in a)
      else 'DIFFERS')
far = max(((c[k] - d[k]).norm() / d[k].norm().clamp_min(1e-12)).item() for k in d)
print(f'graphed against eager, fp32, 12 steps: the farthest weight {far:.1e} apart (relative)')" \
    "$p/graph-whole" "$p/graph-resumed" "$p/graph-fp32" "$p/eager-fp32"
  grep -h 'captured' "$p"/graph-*/log.txt
}

if [ "$part" = small ]; then   # Fashion-MNIST's preset one epoch eager, graphed, compiled; a profile; the reproduction
  # under 5 minutes on one H100 / H200: each run's wall time from this command's start, its
  # img/s per interval (the progress line's speed since the line before) and its last line's mean; first, the
  # graphed step against eager and against itself resumed (graph_checks, about 40 s)
  graph_checks > "$out/graph.log" 2>&1
  grep -hE 'bit for bit|DIFFERS|against eager|captured|FAILED|Error' "$out/graph.log" | cut -c1-220
  cut='' graph=true limit=90
  # on a CPU: 12 steps of 32 images in fp32, evaluated on 256 held-out images; no graph (auto says why: eager)
  [ -n "$dry" ] && cut='--max-steps 12 --batch-size 32 --amp off --val-size 256' graph=auto limit=300
  for mode in "eager --compile false --cuda-graph false" "graphed --compile false --cuda-graph $graph" \
              "compiled --compile true --cuda-graph false"; do
    name=fm-finetune-${mode%% *}
    within $limit $py finetune.py --data fashion-mnist --epochs 1 --log-every 50 ${mode#* } $cut \
      --out-dir "$out/$name" > "$out/$name.log" 2>&1
    echo "$name (1 epoch): exit $?, done $SECONDS s after the command's start; $(grep -h '^step: ' \
      "$out/$name.log" | head -1 | cut -c1-160)"
    echo "   img/s per interval: $(grep -oE '\| [0-9]+ img/s \(' "$out/$name.log" | grep -oE '[0-9]+' | tr '\n' ' ')"
    echo "   mean since the model was ready: $(grep -oE '[0-9]+ since the start' "$out/$name.log" | tail -1)"
  done
  # one profile of the graphed step: 20 replays under torch.profiler, their kernels' own time against the wall's
  profiled=graph window='' limit=60
  [ -n "$dry" ] && profiled=eager window='--max-steps 40 --batch-size 32 --amp off --val-size 256' limit=600
  within $limit $py - "$profiled" $window --out-dir "$out/fm-profile" > "$out/fm-profile.txt" 2>&1 <<'EOF'
import runpy, sys, time, torch
from torch.profiler import ProfilerActivity, profile
from util import engine
cuda = torch.cuda.is_available()
prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
graphed, window = sys.argv[1] == 'graph', {'steps': 0}
step = engine.GraphedStep.__call__ if graphed else engine.train_step


def profiled(*args, **kwargs):   # the epoch's steps 20 to 39 (the capture before them)
    n = window['steps'] = window['steps'] + 1
    if n == 20:
        torch.cuda.synchronize() if cuda else None
        window['start'] = time.perf_counter()
        prof.start()
    step(*args, **kwargs)
    if n == 39:
        torch.cuda.synchronize() if cuda else None
        window['wall'] = time.perf_counter() - window['start']
        prof.stop()
if graphed:
    engine.GraphedStep.__call__ = profiled
else:
    engine.train_step = profiled
sys.argv = ['finetune.py', '--data', 'fashion-mnist', '--epochs', '1', '--log-every', '100', '--compile', 'false',
            '--cuda-graph', 'true' if graphed else 'false', *sys.argv[2:]]
runpy.run_path('finetune.py', run_name='__main__')
table = prof.key_averages()
kernels = sum(e.self_device_time_total for e in table) / 1e3 / 20
print(table.table(sort_by='self_device_time_total' if cuda else 'self_cpu_time_total', row_limit=12))
print(f"the {'graphed' if graphed else 'eager'} step, 20 steps: {1e3 * window['wall'] / 20:.2f} ms a step on the "
      f"wall, {kernels:.2f} ms of kernels a step (the profiler's self device time)")
EOF
  echo "the profile: exit $?; $(tail -1 "$out/fm-profile.txt")"
  [ "$(left)" -lt 150 ] && { echo "the reproduction not run: $(left) s left to the deadline"; exit 0; }
  part=reproduce
fi
if [ "$part" = reproduce ]; then   # Fashion-MNIST's 3 seeds, every stage, from the shipped teacher (its files carried)
  quick=''
  [ -n "$dry" ] && quick='--quick true'
  nvidia-smi -L 2>/dev/null
  # the GPU's utilisation and memory sampled every half second beside it
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    > "$out/reproduce-gpu.csv" 2>/dev/null &
  sampler=$!
  t0=$SECONDS
  within 420 $py -m tools.reproduce --data fashion-mnist --jobs 0 --out-dir "$out/reproduce" $quick \
    > "$out/reproduce.log" 2>&1
  echo "tools.reproduce --jobs 0 (auto) exit $? after $((SECONDS - t0)) s, whole"
  kill $sampler 2>/dev/null
  awk -F', ' 'NF == 2 { n++; u += $1; if ($1 > top) top = $1; if ($2 > mem) mem = $2 }
    END { if (n) printf "GPU utilisation over %d samples: mean %.0f%%, max %d%%; memory up to %d MiB\n", n, u / n,
          top, mem }' "$out/reproduce-gpu.csv"
  tail -9 "$out/reproduce.log"
  exit 0
fi
if [ "$part" = notebook ]; then   # tutorial.ipynb in full mode (the scripts' preset, Fashion-MNIST carried), timed
  # the kernel's packages, where the machine has none: wheels in .whl/, fetched before the call (README of `device`):
  #   python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
  #     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 nbclient nbformat ipykernel   # then remove
  #     from .whl what the machine has (attrs, packaging, psutil, pygments, python-dateutil, typing-extensions)
  if ! $py -c 'import nbclient, ipykernel' 2>/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  mode=full
  [ -n "$dry" ] && mode=quick
  TUTORIAL_MODE=$mode TUTORIAL_RUNS="$out/tutorial" within 580 $py - "$out/tutorial-$mode.ipynb" <<'EOF'
import os, sys, time
sys.path.insert(0, 'tests')
import nbformat
from test_tutorial import NOTEBOOK, execute, key_numbers
nb = nbformat.read(NOTEBOOK, as_version=4)
for cell in nb.cells:
    if cell.cell_type == 'code':
        cell.outputs = []
start = time.time()
execute(nb, dict(os.environ))   # TUTORIAL_MODE and TUTORIAL_RUNS as set here
print(f"tutorial.ipynb in {os.environ['TUTORIAL_MODE']} mode: {time.time() - start:.0f} s, top to bottom")
print('KEY_NUMBERS', key_numbers(nb))
nbformat.write(nb, sys.argv[1])
EOF
  echo "exit $?"
  exit 0
fi
if [ "$part" = bench ]; then   # the fused attention's measurements and the benchmark (270 s), then compiled (300 s)
# what the fused attention's gpu tests measured (the log-sum-exp entry point per shape, cuDNN's value gradient in the
# model's gradient layout and in a second one after it), printed
timeout 60 $py -m pytest -m gpu tests/test_fused_gpu.py -k 'entry_point or one_layout' -s -q -p no:cacheprovider \
  > "$out/pytest-fused.txt" 2>&1
grep -hE 'entry point|cuDNN value gradient|passed|skipped|failed' "$out/pytest-fused.txt"

# the benchmark, alone on the GPU (issue 66): ViT-L/16 at 224 px, batch 104, eager against sdpa
timeout 210 $py -m tools.benchmark --device $device $bench --methods train copy distill --paths eager sdpa \
  --rounds 3 --profile distill --out-dir "$out/bench-vit_large" > "$out/bench-vit_large.log" 2>&1
grep -E '^\| vit|^Kernels' "$out/bench-vit_large/BENCHMARK.md" || tail -5 "$out/bench-vit_large.log"
# the same shape's steps as --compile true trains them (the loss function one graph, the teacher's forward in it, on
# CUDA graphs; the optimizer's step eager, as a run's) beside sdpa's: compiled distillation against a compiled plain
# step
within 300 $py -m tools.benchmark --device $device $bench --methods train distill --paths sdpa --compile true \
  --rounds 3 --saved-bytes false --memory-batch-size 0 --out-dir "$out/bench-compiled" > "$out/bench-compiled.log" 2>&1
grep -E '^\| vit' "$out/bench-compiled/BENCHMARK.md" || tail -5 "$out/bench-compiled.log"
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

# four jobs side by side, none timed: the gpu tests; the start-up checks at ViT-B/16 and ViT-L/16 448 px; the paths
# only a GPU takes; each training script's steps under the sync debug mode (on an H100, round six: the tests 135 s)
workers=$($py -c 'import xdist' 2>/dev/null && echo '-n 6')   # pytest-xdist where it is installed
timeout 200 $py -m pytest -m gpu tests --ignore tests/test_tutorial.py --ignore tests/test_palette.py $workers -rs -q \
  --durations 10 -p no:cacheprovider > "$out/pytest-gpu.txt" 2>&1 &
tests=$!
mkdir -p "$p"
{   # the start-up checks at the shapes round six printed them: a ViT-B/16 teacher (fine-tuning's check) and its
    # distillation, a ViT-L/16 teacher at 448 px and its distillation
  r=$out/logs
  sharpen() {   # a random teacher's maps are near uniform; scaled q and k rows make them peaked, as a trained one's
    t 20 $py -c "import sys, torch; ck = torch.load(sys.argv[1], weights_only=True)
for key, w in ck['model'].items():
    if key.endswith('attn.qkv.weight'): w[:2 * w.shape[0] // 3] *= 4
torch.save(ck, sys.argv[2])" "$1" "$2"
  }
  fake=(--data fake --epochs 1 --warmup-epochs 0 --num-workers 6)
  t 40 $py finetune.py "${fake[@]}" --model vit_base --depth 12 --img-size 224 --patch-size 16 --batch-size 64 \
    --fake-size 256 --max-steps 1 --out-dir "$r/teacher-b" $runs && sharpen "$r/teacher-b/checkpoint.pt" "$r/teacher-b.pt"
  t 50 $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-b.pt" --img-size 224 --layers 0-8 --batch-size 64 \
    --fake-size 1280 --max-steps 20 --log-every 10 --out-dir "$r/distill-b" $runs
  t 50 $py finetune.py "${fake[@]}" --model vit_large --depth 24 --img-size 448 --patch-size 16 --batch-size 8 \
    --fake-size 64 --max-steps 1 --out-dir "$r/teacher-l448" $runs && sharpen "$r/teacher-l448/checkpoint.pt" "$r/teacher-l448.pt"
  t 60 $py attention_distill.py "${fake[@]}" --teacher "$r/teacher-l448.pt" --img-size 448 --layers 0-17 --batch-size 8 \
    --fake-size 64 --max-steps 2 --log-every 1 --out-dir "$r/distill-l448" $runs
} > "$out/runs.log" 2>&1 &
checks=$!
{
  # held on the device, batched RandAugment, drop-path (the CUDA generator), fp16 with its GradScaler: 6 steps unbroken,
  # and 3 steps, then resumed mid-epoch to the same 6
  same=("${tiny[@]}" --amp fp16 --randaug rand-m9-mstd0.5-inc1 --drop-path 0.1)
  t 25 "${det[@]}" finetune.py "${same[@]}" --max-steps 6 --out-dir "$p/whole"
  t 25 "${det[@]}" finetune.py "${same[@]}" --max-steps 3 --out-dir "$p/resumed"
  t 25 "${det[@]}" finetune.py "${same[@]}" --max-steps 6 --out-dir "$p/resumed" --resume true
  t 10 $py -c "import sys, torch
a, b = (torch.load(f + '/checkpoint.pt', weights_only=True)['model'] for f in sys.argv[1:])
print('mid-epoch resume against the unbroken run:', 'bit for bit' if all(torch.equal(a[k], b[k]) for k in a)
      else 'DIFFERS')" "$p/whole" "$p/resumed"
  graph_checks
  # fp32 with TF32 on (processes()): the start-up check's verdict against its fp32 definition
  t 25 $py finetune.py "${tiny[@]}" --amp off --max-steps 2 --out-dir "$p/fp32"
  # ensemble.py, and evaluate.py under every shift, on the held set, on the device
  models=(--models "$p/whole/checkpoint.pt" "$p/fp32/checkpoint.pt" --data fake --num-workers 0)
  t 25 $py ensemble.py "${models[@]}" --out "$p/ensemble.json"
  t 40 $py evaluate.py "${models[@]}" --ensembles 0,1 --shift $($py -c 'import data; print(*data.SHIFTS)') \
    --out "$p/robustness" && cat "$p/robustness"/*.md
  # torchrun: two processes (gloo on a CPU; NCCL takes a GPU a rank: one process where one GPU is all there is)
  procs=2
  [ "$device" = cuda ] && procs=$(timeout 20 $py -c 'import torch; print(min(2, torch.cuda.device_count()))')
  t 40 $py -m torch.distributed.run --standalone --nproc_per_node "${procs:-1}" finetune.py "${tiny[@]}" \
    --max-steps 2 --out-dir "$p/procs"
} > "$out/paths.log" 2>&1 &
paths=$!
# each training step under the sync debug mode 'error' (a progress line, an evaluation and a save read the device:
# they run with it off), every per-step option on, the set held on the device
strict=($py -c 'import runpy, sys, torch
from util import engine, run
def mode(value, fn):
    def within(*args, **kwargs):
        was = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(value)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(was)
    return within if torch.cuda.is_available() else fn
for owner, name in ((engine, "log_progress"), (run.Run, "save"), (run.Run, "evaluate")):
    setattr(owner, name, mode(0, getattr(owner, name)))
engine.train_one_epoch = mode("error", engine.train_one_epoch)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")')
every=(--randaug rand-m9-mstd0.5-inc1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --drop-path 0.1 --clip-grad 1.0
       --batch-size 16 --accum-steps 2 --ema 0.99 --max-steps 3)
{
  t 30 "${strict[@]}" finetune.py "${tiny[@]}" "${every[@]}" --out-dir "$p/strict-finetune"
  for script in attention_distill.py attention_copy.py; do
    t 30 "${strict[@]}" $script "${tiny[@]}" "${every[@]}" --teacher "$p/strict-finetune/checkpoint.pt" \
      --out-dir "$p/strict-${script%.py}"
  done
  t 30 "${strict[@]}" mae_pretrain.py "${tiny[@]}" --max-steps 3 --out-dir "$p/strict-mae"
  # the host fallback (the GPU's free memory said too small for the set), compiled, on sdpa (a CPU too): the start-up
  # check runs the student's layer compiled by inductor, as the run compiles it; a wrong verdict stops it in one line
  t 60 $py -c 'import runpy, sys, data
device_of = data.data_device   # its free memory said 0 to where the set is held (the model still fits)
data.data_device = lambda device, need, free, log: device_of(device, need, 0, log)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")' finetune.py "${tiny[@]}" --max-steps 2 --compile true \
    --attn-implementation sdpa --out-dir "$p/host"
  # compiled against eager: a ViT's gradients, fp32 without TF32 (inductor on CUDA; aot_eager on a CPU)
  t 60 $py - "$device" <<'EOF'
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
} > "$out/steps.log" 2>&1 &
steps=$!
wait $tests; echo "pytest exit $?" >> "$out/pytest-gpu.txt"
wait $checks $paths $steps
tail -4 "$out/pytest-gpu.txt"
# the start-up checks' printed errors against round six's, line by line (a run's kernel, dtype and shape its key)
$py - results/benchmark-h100/round6/checks.txt "$out"/logs/*/log.txt "$out"/paths/*/log.txt <<'EOF' \
  | tee "$out/checks-compared.txt"
import re, sys
line = re.compile(r'start-up check: (.+?), forward and backward, .*?: \d+ tensors, the farthest (.+?) at ([\d.e-]+) '
                  r'\(eager in [\w.]+: ([\d.e-]+); tolerance ([\d.e-]+)\); checked in [\d.]+ s: (.+)$')
def checks(paths):
    found = {}
    for path in paths:
        for m in filter(None, map(line.search, open(path, errors='replace'))):
            found.setdefault(m.group(1), m.groups()[1:])
    return found
then, now = checks(sys.argv[1:2]), checks(sys.argv[2:])
print('| run (kernel, device, dtype, q) | farthest tensor | round six | now | eager\'s own (its dtype): then, now | '
      'tolerance | verdict now |\n|---|---|---:|---:|---|---:|---|')
for key in sorted(set(then) | set(now)):
    a, b = then.get(key, ('-',) * 5), now.get(key, ('-',) * 5)
    print(f'| {key} | {b[0] if b[0] != "-" else a[0]} | {a[1]} | {b[1]} | {a[2]}, {b[2]} | {b[3]} | {b[4]} |')
EOF
said='held on cuda|held in the host|bit for bit|DIFFERS|against eager|captured|\((nccl|gloo)\)|FAILED|error|Error'
grep -hE "$said" "$out/paths.log" "$out/steps.log" "$out/runs.log" | cut -c1-220
echo "took $SECONDS s"
