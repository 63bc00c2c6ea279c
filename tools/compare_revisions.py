"""
One training step of each method, timed at this checkout and at an earlier commit, side by side in one run.

    python -m tools.compare_revisions --rev cce9922 --out results/benchmark/REVISIONS.md

Answers "is this change slower than the code before it?" where the code before has paths the benchmark no
longer has. Each revision is checked out into a temporary git worktree; every round times both, in alternating
order, each in a fresh process on one thread (so a machine's drift hits both alike); medians are reported.
The step is what the scripts run with --attn-implementation auto (the earlier code: its only path), under
--amp auto's autocast, at the Fashion-MNIST preset's shape (batch 128, layers 0-4 transferred) and at ViT-B/16
224 px, batch 8 (distillation of the first 9 of 12 layers, copy of all 12).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from util.launch import amp_dtype
from util.files import cpu_name, git_commit

SHAPES = {'fashion-mnist': "dict(model='vit_tiny', embed_dim=64, depth=6, num_heads=8, img_size=28, patch_size=4, "
                           "num_classes=10, batch=128, distilled=5, copied=5)",
          'vit_base': "dict(model='vit_base', img_size=224, patch_size=16, num_classes=1000, batch=8, distilled=9, "
                      "copied=12)"}

# run in the revision's folder: prints {method: seconds per step} of `steps` steps after one untimed
STEP = '''
import json, sys, time, torch
sys.path.insert(0, '.')
import vit
from attention_copy import CopyConfig, copy_loss
from attention_distill import DistillConfig, distill_loss_fn
from teacher import cast_matmul_weights
from util.config import TrainConfig
from util.engine import build_optimizer, soft_cross_entropy
from util.launch import amp_dtype
torch.set_num_threads(1)
shape = {shape}
batch, distilled, copied = shape.pop('batch'), list(range(shape.pop('distilled'))), list(range(shape.pop('copied')))
arch = vit.model_arch(shape.pop('model'), global_pool=True, **shape)
dtype = amp_dtype('auto', torch.device('cpu'))
implementation = 'eager' if hasattr(vit, 'set_attn_implementation') else None   # what auto picks on a CPU

def model(**kw):
    torch.manual_seed(0)
    m = vit.VisionTransformer(**{{**arch, **kw}})
    return vit.set_attn_implementation(m, implementation) if implementation else m

teacher = model(num_classes=0).requires_grad_(False).eval()
teacher = cast_matmul_weights(teacher, dtype) if dtype else teacher
x = torch.randn(batch, 3, arch['img_size'], arch['img_size'])
y = torch.randint(0, arch['num_classes'], (batch,))
losses = {{'train': (model(), lambda net, x, y: (soft_cross_entropy(net(x), y, 0.1), {{}})),
          'copy': (model(no_qk_layers=copied), copy_loss(CopyConfig(), teacher, copied, None)),
          'distill': (model(), distill_loss_fn(DistillConfig(), teacher, distilled, None,
                                               *([implementation] if implementation else [])))}}
out = {{}}
for method, (student, loss_fn) in losses.items():
    opt = build_optimizer(TrainConfig(blr=1e-4), student, lr=1e-4)
    times = []
    for i in range({steps} + 1):
        start = time.perf_counter()
        with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = loss_fn(student.train(), x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    out[method] = statistics.median(times[1:])
print(json.dumps(out))
'''


def time_revision(folder, shape, steps):
    code = 'import statistics\n' + STEP.format(shape=SHAPES[shape], steps=steps)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    p = subprocess.run([sys.executable, '-c', code], cwd=folder, env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f'error: the step at {folder} failed: {p.stderr.strip().splitlines()[-1]}')
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument('--rev', required=True, help='the earlier commit')
    parser.add_argument('--shapes', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=3, help='timed steps of each method in each round')
    parser.add_argument('--out', default='runs/revisions.md')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = os.path.join(tmp, 'old')
        subprocess.run(['git', 'worktree', 'add', '--detach', old, args.rev], check=True, capture_output=True)
        try:
            runs = {(r, s): [] for r in ('old', 'new') for s in args.shapes}
            for i in range(args.rounds):
                for shape in args.shapes:
                    for rev in (('old', 'new') if i % 2 == 0 else ('new', 'old')):
                        runs[rev, shape].append(time_revision(old if rev == 'old' else '.', shape, args.steps))
                        print(rev, shape, runs[rev, shape][-1], flush=True)
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', old], capture_output=True)
    rows = ['| shape | method | ms/step before | ms/step now | now / before |', '|---|---|---:|---:|---:|']
    for shape in args.shapes:
        for method in ('train', 'copy', 'distill'):
            before, now = (1000 * statistics.median(r[method] for r in runs[rev, shape]) for rev in ('old', 'new'))
            rows.append(f'| {shape} | {method} | {before:.1f} | {now:.1f} | {now / before:.3f} |')
    dtype = amp_dtype('auto', __import__('torch').device('cpu'))
    text = (f'# One step before and after: {args.rev} against {git_commit()}\n\n'
            f'`python -m tools.compare_revisions --rev {args.rev} --rounds {args.rounds} --steps {args.steps}` on '
            f'{cpu_name()}, one thread, autocast {dtype}; medians of {args.rounds} rounds x {args.steps} steps, '
            f'the two revisions alternating. Now: `--attn-implementation auto` (eager on a CPU).\n\n'
            + '\n'.join(rows) + '\n')
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    main()
