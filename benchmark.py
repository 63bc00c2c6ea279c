"""
Speed and memory of every method's step on this device: our default path against a naive one.

    python benchmark.py                        # vit_tiny, vit_small, vit_base (+ vit_large on a GPU), batch 8
    python benchmark.py --models vit_base --rounds 9
    python benchmark.py --compile true         # also the default training steps under torch.compile
    python benchmark.py --quick true           # a tiny model, 2 steps: checks that it all runs

The naive path (naive.py) is this repository's code run the way the authors' release runs: fp32 (its autocast is
commented out), the teacher run through all its blocks and its head with drop-path masks, every
layer's maps kept for a loss that autograd differentiates, copy students that compute their own q, k
and softmax before the teacher's map replaces it, AdamW without fused or foreach kernels. `naive-bf16`
is that path under bf16 autocast. The default path is what the scripts run (see README, "Speed").

Timing: each case runs `--steps` steps per round for `--rounds` rounds after `--warmup` rounds, the
cases interleaved (A B C A B C ...) so that a machine's drift hits all of them; medians are reported.
Memory: peak RSS of a fresh process that builds one case and runs two steps (CPU), or
max_memory_allocated (CUDA), at --memory-batch-size. FLOPs: torch.utils.flop_counter over one step,
teacher included, against a GEMM peak measured here in the step's precision.
Writes <out-dir>/benchmark.json and BENCHMARK.md (machine, torch, commit).
"""
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
from torch.utils.flop_counter import FlopCounterMode

from attention_copy import CopyConfig, CopyModel, copy_loss
from attention_distill import DistillConfig, FusedAttentionCrossEntropy, attention_cross_entropy, distill_loss_fn
from config import ConfigError, TrainConfig, parse_config
from engine import amp_dtype, autocast, build_optimizer, git_commit, run_main, soft_cross_entropy
from naive import (DROP_PATH, SMOOTHING, fast_teacher, maps_first_distill_loss, naive_copy_forward,
                   naive_copy_loss, naive_distill_loss, qk_copy_loss, set_drop_path)
from teacher import cast_matmul_weights
from vit import VisionTransformer, model_arch


METHODS = {   # paths between default and naive drop one optimisation each, to show what it is worth
    'train': ('default', 'naive', 'naive-bf16'),           # a plain ViT step: scratch or fine-tuning
    'copy': ('default', 'qk-computed', 'uncast-teacher', 'naive', 'naive-bf16'),
    'distill': ('default', 'all-maps-first', 'autograd-loss', 'uncast-teacher', 'naive', 'naive-bf16'),
    'eval-distill': ('default', 'naive'),                  # the distilled student alone
    'eval-copy': ('default', 'naive')}                     # the copy student with its teacher
PATHS = {'default': 'what the scripts run',
         'naive': "the authors' release: fp32, full-depth teacher with drop-path, all maps kept, autograd "
                  "loss, q/k computed in copy students, for-loop AdamW",
         'naive-bf16': 'naive under bf16 autocast',
         'qk-computed': 'default, but the copy student computes q, k and its own softmax, then overwrites them',
         'uncast-teacher': "default, but the teacher's weights stay fp32 (autocast re-casts them every step)",
         'all-maps-first': "default, but all the teacher's maps first, then the student's (not layer by layer)",
         'autograd-loss': 'all-maps-first, and the attention loss differentiated by autograd (not fused)',
         'compile': 'default under torch.compile'}


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: ['vit_tiny', 'vit_small', 'vit_base'])  # + vit_large on CUDA
    batch_size: int = 8
    memory_batch_size: int = 32     # peak memory is measured at this batch; 0 = not measured
    img_size: int = 224
    patch_size: int = 16
    depth: int = 0                  # 0 = the size's own
    rounds: int = 5                 # timed rounds
    steps: int = 2                  # steps of each case in a round
    warmup: int = 1                 # untimed rounds before them
    distill_frac: float = 0.75      # distil the first 3/4 of the layers (the paper: 18 of 24); copy copies all
    methods: list[str] = field(default_factory=lambda: list(METHODS))   # a subset of train copy distill eval-*
    compile: bool = False           # also time the default training steps under torch.compile
    profile: list[str] = field(default_factory=list)   # methods whose default step torch.profiler breaks down
    threads: int = 0                # torch threads; 0 = torch's default
    gemm_size: int = 4096           # square matmul that measures the GEMM peak
    quick: bool = False             # tiny model, 2 steps, no warm-up: checks that everything runs
    out_dir: str = 'results/benchmark'


QUICK = dict(models=['vit_tiny'], batch_size=4, memory_batch_size=4, img_size=32, patch_size=8, depth=2,
             rounds=1, steps=2, warmup=0, gemm_size=512, out_dir='results/benchmark-quick')
TRAINED = ('train', 'copy', 'distill')

# -----------------------------------------------------------------------------
# One model size: its models and optimisers, built once and shared by its cases


class Parts:
    def __init__(self, cfg, size, device):
        self.cfg, self.device, self.dtype = cfg, device, amp_dtype('auto', device)
        self.arch = model_arch(size, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=1000,
                               global_pool=True, depth=cfg.depth or None)
        self.depth = self.arch['depth']
        self.copied = list(range(self.depth))
        self.distilled = list(range(max(1, round(cfg.distill_frac * self.depth))))
        self.recipe = TrainConfig(blr=1e-4, weight_decay=0.05, layer_decay=0.75, beta2=0.999)

    def model(self, **kw):
        torch.manual_seed(0)
        return VisionTransformer(**{**self.arch, **kw}).to(self.device)

    def frozen(self, model):
        return model.requires_grad_(False).eval()

    @cached_property
    def teacher(self):            # fp32, as the naive path has it
        return self.frozen(self.model(num_classes=0))

    @cached_property
    def fast_teacher(self):       # as load_teacher gives it: matmul weights stored in the autocast dtype
        t = self.frozen(self.model(num_classes=0))
        return cast_matmul_weights(t, self.dtype) if self.dtype else t

    @cached_property
    def uncast_teacher(self):     # fp32 weights, eval mode
        return self.frozen(self.model(num_classes=0))

    @cached_property
    def student(self):
        return self.model()

    @cached_property
    def copy_student(self):       # as attention_copy.py builds it: no q/k in copied layers
        return self.model(no_qk_layers=self.copied)

    def optimizer(self, model, naive):
        opt = build_optimizer(self.recipe, model, lr=1e-4)
        if naive:   # the same groups, plain for-loop AdamW
            opt = torch.optim.AdamW(opt.param_groups, foreach=False, fused=False)
        return opt

    @cached_property
    def opt_fused(self):
        return self.optimizer(self.student, False)

    @cached_property
    def opt_naive(self):
        return self.optimizer(self.student, True)

    @cached_property
    def opt_copy(self):
        return self.optimizer(self.copy_student, False)

    def step(self, method, path):
        """() -> None running one step of `method` on `path`, with its own fixed batch."""
        dtype = None if path == 'naive' else torch.bfloat16 if path == 'naive-bf16' else self.dtype
        env = type('Env', (), {'device': self.device, 'dtype': dtype})
        naive = path.startswith('naive')
        batch = self.cfg.batch_size
        x = torch.randn(batch, 3, self.cfg.img_size, self.cfg.img_size, device=self.device)
        y = torch.randint(0, 1000, (batch,), device=self.device)
        if method.startswith('eval'):
            student = self.student if naive or method == 'eval-distill' else self.copy_student
            teacher = self.teacher if naive else self.fast_teacher
            if method == 'eval-distill':
                forward = student
            elif naive:
                forward = lambda x: naive_copy_forward(teacher, student, x, self.copied)   # noqa: E731
            else:
                forward = CopyModel(teacher, student, self.copied)
            grad_mode = torch.no_grad if naive else torch.inference_mode

            def run():
                student.eval()
                with grad_mode(), autocast(env):
                    forward(x)
            return run
        student = self.copy_student if method == 'copy' and path != 'qk-computed' and not naive else self.student
        opt = self.opt_copy if student is self.copy_student else self.opt_naive if naive else self.opt_fused
        teacher = self.teacher if naive else self.uncast_teacher if path == 'uncast-teacher' else self.fast_teacher
        layers = self.copied if method == 'copy' else self.distilled
        if method == 'train':
            def loss_fn(net, x, y):
                return soft_cross_entropy(net(x), y, SMOOTHING), {}
        elif method == 'copy':
            loss_fn = naive_copy_loss(teacher, layers) if naive else \
                qk_copy_loss(fast_teacher(teacher, layers)) if path == 'qk-computed' else \
                copy_loss(CopyConfig(smoothing=SMOOTHING), teacher, layers, None)
        elif naive:
            loss_fn = naive_distill_loss(teacher, layers)
        elif path in ('all-maps-first', 'autograd-loss'):
            ce = FusedAttentionCrossEntropy.apply if path == 'all-maps-first' else attention_cross_entropy
            loss_fn = maps_first_distill_loss(fast_teacher(teacher, layers), ce)
        else:
            loss_fn = distill_loss_fn(DistillConfig(smoothing=SMOOTHING), teacher, layers, None)
        net = torch.compile(student) if path == 'compile' else student

        def run():
            set_drop_path(student.train(), DROP_PATH[method])
            with autocast(env):
                loss, _ = loss_fn(net, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

# -----------------------------------------------------------------------------
# Measurements


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def gemm_peak(dtype, n, device, repeats=5):
    """FLOP/s of an n x n x n matmul in `dtype`, the best of `repeats`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times[1:])


def count_flops(run):
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def profile(run, path, device):
    """Where one step's time goes: torch.profiler's table of operators by their own time."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch.profiler.profile(activities=acts) as prof:
        run()
        sync(device)
    key = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    with open(path, 'w') as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=25))


def proc_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process; getrusage's ru_maxrss would count the parent's."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 2 ** 10


def peak_memory(cfg, size, method, path):
    """(peak MB, MB held before the first step) of one case's two steps, in this (fresh) process."""
    if not set(cfg.methods) <= set(METHODS):
        raise ConfigError(f"--methods {' '.join(cfg.methods)}: choose from {' '.join(METHODS)}")
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Parts(BenchConfig(**{**asdict(cfg), 'batch_size': cfg.memory_batch_size}), size, device).step(method, path)
    if device.type == 'cuda':
        before = torch.cuda.memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
        run(), run()
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, before
    before = proc_mb('VmRSS')
    run(), run()
    return proc_mb('VmHWM'), before



def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
        return pool.submit(fn, *args).result()


def machine(device):
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
               platform.processor()) if os.path.exists('/proc/cpuinfo') else platform.processor()
    return {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu,
            'cpus': os.cpu_count(), 'threads': torch.get_num_threads(), 'platform': platform.platform(),
            'torch': torch.__version__, 'commit': git_commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}

# -----------------------------------------------------------------------------
# Report


# (name, method, path, over method, over path, target): ratio = img/s of the first / img/s of the second
SPEED_TARGETS = [('distill vs naive fp32', 'distill', 'default', 'distill', 'naive', 4.0),
                 ('distill vs naive bf16', 'distill', 'default', 'distill', 'naive-bf16', 1.2),
                 ('distill vs a plain ViT step', 'distill', 'default', 'train', 'default', 0.78),
                 ('copy vs naive fp32', 'copy', 'default', 'copy', 'naive', 4.2),
                 ('copy vs naive bf16', 'copy', 'default', 'copy', 'naive-bf16', 1.3)]


def targets(rows, size):
    get = {(r['method'], r['path']): r for r in rows if r['model'] == size}
    out = []
    for name, m, p, m2, p2, want in SPEED_TARGETS:
        if (m, p) in get and (m2, p2) in get:
            got = get[m, p]['img_s'] / get[m2, p2]['img_s']
            out.append({'model': size, 'target': f'{name} >= {want}x', 'got': f'{got:.2f}x', 'met': got >= want})
    d = get.get(('distill', 'default'), {})
    if d.get('peak_fraction') is not None:
        out.append({'model': size, 'target': 'distill step >= 65% of GEMM peak', 'met': d['peak_fraction'] >= 0.65,
                    'got': f"{100 * d['peak_fraction']:.0f}%"})
    for p2 in ('naive', 'naive-bf16'):
        n = get.get(('distill', p2), {})
        if d.get('peak_mb') and n.get('peak_mb'):
            got = d['peak_mb'] / n['peak_mb']
            out.append({'model': size, 'target': f'distill peak memory vs {p2} <= 0.85x', 'got': f'{got:.2f}x',
                        'met': got <= 0.85})
    return out


def markdown(result):
    cfg, m = result['config'], result['machine']
    lines = [f"# Benchmark: {m['device']}", '',
             f"`python {' '.join(result['argv'])}` | {m['cpus']} CPUs, {m['threads']} torch threads | torch "
             f"{m['torch']} | commit {m['commit'][:10]} | {m['date']}", '',
             f"Batch {cfg['batch_size']}, {cfg['img_size']}x{cfg['img_size']} images, patch {cfg['patch_size']}; "
             f"median of {cfg['rounds']} interleaved rounds x {cfg['steps']} steps after {cfg['warmup']} warm-up "
             f"round(s). Distillation: the first {cfg['distill_frac']:.0%} of the layers; copy: all layers. "
             f"GEMM peak measured here: " + ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in result['gemm_peak'].items())
             + f". Memory: peak at batch {cfg['memory_batch_size']} ({'RSS of a fresh process' if 'cuda' not in result['device'] else 'max_memory_allocated'}).",
             '', '| model | method | path | img/s | vs naive | GFLOP / step | % of GEMM peak | peak memory (MB) | step needs (MB) |',
             '|---|---|---|---:|---:|---:|---:|---:|---:|']
    rows = result['rows']
    base = {(r['model'], r['method']): r['img_s'] for r in rows if r['path'] == 'naive'}
    for r in rows:
        ratio = r['img_s'] / base[r['model'], r['method']] if (r['model'], r['method']) in base else None
        f = lambda v, fmt: '' if v is None else format(v, fmt)   # noqa: E731
        lines.append(f"| {r['model']} | {r['method']} | {r['path']} | {r['img_s']:.2f} | {f(ratio, '.2f')}"
                     f"{'x' if ratio else ''} | {r['flops'] / 1e9:.1f} | {f(r['peak_fraction'] and 100 * r['peak_fraction'], '.0f')} | "
                     f"{f(r.get('peak_mb'), '.0f')} | {f(r.get('step_mb'), '.0f')} |")
    lines += ['', 'Paths:', ''] + [f'- `{p}`: {what}' for p, what in PATHS.items()
                                   if any(r['path'] == p for r in rows)]
    lines += ['', '## Targets', '', 'Set for ViT-B/16 at batch 8 on a CPU; the other sizes are shown for reference.', '',
              '| model | target | got | met |', '|---|---|---:|---|']
    lines += [f"| {t['model']} | {t['target']} | {t['got']} | {'yes' if t['met'] else '**no**'} |" for t in result['targets']]
    return '\n'.join(lines) + '\n'


def main():
    cfg = parse_config(BenchConfig, {}, None)
    if cfg.quick:   # QUICK replaces what you left at its default
        default = asdict(BenchConfig())
        cfg = BenchConfig(**{k: QUICK[k] if k in QUICK and v == default[k] else v for k, v in asdict(cfg).items()})
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == 'cuda' and 'vit_large' not in cfg.models and not any(a.startswith('--models') for a in sys.argv):
        cfg.models = [*cfg.models, 'vit_large']
    dtypes = {'fp32': torch.float32, **({'bf16': torch.bfloat16} if amp_dtype('auto', device) else {})}
    peak = {k: gemm_peak(dt, cfg.gemm_size, device) for k, dt in dtypes.items()}
    print(f"{machine(device)['device']}: GEMM peak " + ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in peak.items()))
    rows = []
    for size in cfg.models:
        parts = Parts(cfg, size, device)
        cases = [(m, p) for m, paths in METHODS.items() for p in paths if m in cfg.methods]
        cases += [(m, 'compile') for m in TRAINED if m in cfg.methods] if cfg.compile else []
        steps = {c: parts.step(*c) for c in cases}
        flops = {c: count_flops(run) for c, run in steps.items() if c[1] != 'compile'}   # also a first step
        flops.update({(m, 'compile'): flops[m, 'default'] for m, p in cases if p == 'compile'})
        for m in cfg.profile:
            os.makedirs(cfg.out_dir, exist_ok=True)
            profile(steps[m, 'default'], os.path.join(cfg.out_dir, f'profile-{size}-{m}.txt'), device)
        times = {c: [] for c in cases}
        for r in range(cfg.warmup + cfg.rounds):
            for c, run in steps.items():       # interleaved: A B C, A B C, ...
                sync(device)
                t = time.perf_counter()
                for _ in range(cfg.steps):
                    run()
                sync(device)
                if r >= cfg.warmup:
                    times[c].append((time.perf_counter() - t) / cfg.steps)
        for (method, path), ts in times.items():
            step_s = statistics.median(ts)
            prec = 'fp32' if path == 'naive' or parts.dtype is None else 'bf16'
            row = {'model': size, 'method': method, 'path': path, 'img_s': cfg.batch_size / step_s, 'step_s': step_s,
                   'step_times': ts, 'flops': flops[method, path], 'precision': prec,
                   'peak_fraction': flops[method, path] / step_s / peak[prec] if prec in peak else None}
            if cfg.memory_batch_size and method in TRAINED and path != 'compile' and \
                    (not cfg.quick or (method, path) in (('distill', 'default'), ('distill', 'naive'))):
                row['peak_mb'], before = in_fresh_process(peak_memory, cfg, size, method, path)
                row['step_mb'] = row['peak_mb'] - before
            rows.append(row)
            print(f"{size:10s} {method:13s} {path:11s} {row['img_s']:8.2f} img/s  {row['flops'] / 1e9:8.1f} GFLOP/step"
                  + (f"  {100 * row['peak_fraction']:4.0f}% of {prec} peak" if row['peak_fraction'] else '')
                  + (f"  peak {row['peak_mb']:.0f} MB" if 'peak_mb' in row else ''), flush=True)
        del parts, steps
    result = {'config': asdict(cfg), 'machine': machine(device), 'device': str(device), 'argv': ['benchmark.py', *sys.argv[1:]],
              'gemm_peak': peak, 'rows': rows, 'targets': [t for s in cfg.models for t in targets(rows, s)]}
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, 'benchmark.json'), 'w') as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(cfg.out_dir, 'BENCHMARK.md'), 'w') as f:
        f.write(markdown(result))
    print(markdown(result).split('## Targets')[1])
    print(f'wrote {cfg.out_dir}/benchmark.json and BENCHMARK.md')


if __name__ == '__main__':
    run_main(main)
