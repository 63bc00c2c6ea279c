"""
Speed and memory of every method's step on this device: the two attention implementations against a naive path.

    python -m tools.benchmark                        # CPU: vit_tiny, vit_small, vit_base at batch 8
    python -m tools.benchmark --models vit_base --rounds 9
    python -m tools.benchmark --compile true         # also the training steps as --compile true trains them
    python -m tools.benchmark --quick true           # a tiny model, 2 steps: checks that it all runs
    python -m tools.benchmark --models vit_base --img-size 448 --batch-size 2 --timing false   # saved bytes only
    python -m tools.benchmark --device cuda --profile train copy distill --out-dir results/benchmark-h100
                                               # GPU: vit_base and vit_large, batches that fill it

The cases and paths (eager, sdpa, naive, ...) are benchmark_cases.py's, with the measures of their memory;
this file times them and writes the report (BENCHMARK.md, at its end). Each case is timed (the cases interleaved,
medians), its FLOPs counted against a GEMM peak measured here (a step's share of its precision's peak: its MFU on
a GPU in bf16), the bytes it saves for backward measured (the same on every device: what attention transfer adds
to a step's activation memory), and its peak memory (benchmark_cases.peak_memory says how). Writes
<out-dir>/benchmark.json and BENCHMARK.md, and with --profile a torch.profiler table per method (and one of its
compiled step with --compile true): by default in runs/benchmark (runs/benchmark-quick, runs/benchmark-<gpu>), which
git ignores; the committed results/ folders are written only when named (each one's README or BENCHMARK.md gives its
command).
"""
import gc
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from tools.benchmark_cases import (METHODS, PATHS, TRAINED, Parts, autocast_dtype, cases,
                                   fill_batch, peak_memory)
from util.config import (BATCH, DEPTH, FRACTION, SIZE, STEPS, WORKERS, ConfigError, at_least,
                         check, option)
from util.files import check_out_dir, cpu_name, git_commit, write_json, write_text
from util.launch import amp_dtype, parse_config, run_main
from vit import SIZES

TIMED = [p for p in PATHS if p != 'compile']   # the paths --paths chooses from


def own(most):
    """A model size's number that 0 leaves to the size (vit.SIZES)."""
    return option(0, "0 = the size's own", at_least(0, "the size's own", most))


@dataclass
class BenchConfig:
    device: str = option('auto', 'auto | cpu | cuda', choices=('auto', 'cpu', 'cuda'))
    rounds: int = option(5, 'timed rounds', at_least(1, most=STEPS))
    steps: int = option(2, 'steps of each case in a round', at_least(1, most=STEPS))
    warmup: int = option(1, 'untimed rounds before them', at_least(0, most=STEPS))
    models: list[str] = option(factory=lambda: ['vit_tiny', 'vit_small', 'vit_base'],
                               help='GPU: base, large', choices=SIZES)
    paths: list[str] = option(factory=TIMED.copy, choices=TIMED,
                              help='a subset of eager sdpa naive naive-bf16 '
                                   '(--compile true adds compile)')
    batch_size: int = option(8, 'per step; 0 = fill the GPU (see fill), its default there',
                             at_least(0, 'fill a GPU', BATCH))
    memory_batch_size: int = option(32, 'peak memory is measured at this batch; 0 = not measured; '
                                        '-1 = the timed one',
                                    at_least(-1, 'the timed batch', BATCH))
    fill: float = option(0.85, "--batch-size 0: share of the GPU's memory the fullest case may use",
                         FRACTION)
    img_size: int = option(224, rule=at_least(1, most=SIZE))
    patch_size: int = option(16, rule=at_least(1, most=SIZE))
    depth: int = own(DEPTH)
    embed_dim: int = own(SIZE)
    num_heads: int = own(DEPTH)
    num_classes: int = option(1000, rule=at_least(1, most=SIZE))
    distill_frac: float = option(0.75, 'distil the first 3/4 of the layers (the paper: 18 of 24)',
                                 FRACTION)
    copy_frac: float = option(1.0, 'copy all layers (the paper)', FRACTION)
    methods: list[str] = option(factory=lambda: list(METHODS), choices=METHODS,
                                help='a subset of train copy distill eval-*')
    compile: bool = option(False, 'also time each training step as --compile true trains it (its loss function '
                                  'compiled whole, the teacher in it)')
    profile: list[str] = option(factory=list, choices=TRAINED,
                                help="methods whose default step (and --compile true's) torch.profiler breaks down")
    threads: int = option(0, "torch threads; 0 = torch's default",
                          at_least(0, "torch's default", WORKERS))
    saved_bytes: bool = option(True, 'bytes saved for backward by one step of each trained case '
                                     '(one forward pass)')
    timing: bool = option(True, 'false: only the saved bytes '
                                '(no FLOPs, timings, peak memory, profiles)')
    gemm_size: int = option(4096, 'square matmul that measures the GEMM peak',
                            at_least(1, most=2 ** 20))
    quick: bool = option(False, 'tiny model, 2 steps, no warm-up: checks that everything runs')
    out_dir: str = option('runs/benchmark',
                          'GPU: runs/benchmark-<device>, e.g. runs/benchmark-h100 '
                          '(results/: name it)')

    def checks(self):
        return [('img_size', self.img_size % self.patch_size == 0,
                 f'must be a multiple of --patch-size {self.patch_size}')]


# each replaces what you left at its default; where both give one, --quick's (its steps are the
# default, 2, so a quick run on a GPU takes the GPU's 3)
QUICK = dict(models=['vit_tiny'], batch_size=4, memory_batch_size=4, img_size=32, patch_size=8,
             depth=2, rounds=1, warmup=0, gemm_size=512, out_dir='runs/benchmark-quick')
ON_GPU = dict(models=['vit_base', 'vit_large'], batch_size=0, memory_batch_size=-1, steps=3,
              gemm_size=8192)
PRECISION = {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}   # None: autocast off


def configure(cfg):
    """Apply --quick's and the GPU's defaults, and check every flag:
    one error line, before anything runs."""
    # cuda where asked or (auto) available
    gpu = cfg.device != 'cpu' and torch.cuda.is_available()
    # --batch-size 0 given on a CPU (a GPU's default): refused with a missing GPU
    if not gpu and (cfg.device == 'cuda' or cfg.batch_size == 0):
        raise ConfigError(f'--device {cfg.device} --batch-size {cfg.batch_size}: '
                          f'no CUDA device here (0 fills a GPU); run on a GPU machine, '
                          f'or --device cpu with a positive --batch-size')
    device = torch.device('cuda' if gpu else 'cpu')
    changes = {}
    if gpu:
        slug = device_slug(torch.cuda.get_device_name(device))
        changes.update(ON_GPU, out_dir=f'runs/benchmark-{slug}')
    if cfg.quick:
        changes.update(QUICK)
    default = asdict(BenchConfig())
    # checked with --quick's and the GPU's sizes: they may not fit the flags given beside them
    cfg = check(replace(cfg, **{k: v for k, v in changes.items() if getattr(cfg, k) == default[k]}))
    # a file, a read-only folder, or a user's own BENCHMARK.md (no benchmark.json): refused now, not
    # after the timings
    check_out_dir(cfg.out_dir, '--out-dir', 'benchmark.json')
    return cfg, device


def device_slug(name):
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'Tesla T4' -> 't4';
    else the whole name (less NVIDIA), lower-case."""
    name = name.replace('NVIDIA', '')
    m = re.search(r'\b([A-Z]+\d+[A-Z]?)\b', name)
    if m:
        return m.group(1).lower()
    return re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()

# -----------------------------------------------------------------------------
# Measurements


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def seconds(run, calls, device):
    """The wall time of `calls` calls of run(), the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        run()
    sync(device)
    return time.perf_counter() - t


def interleaved(cases, cfg, device):
    """{case: its seconds a step in each timed round}: each of `cases` (name: a step) runs --steps steps a round
    for --rounds rounds after --warmup rounds, the cases interleaved (A B C, A B C, ...) so that a machine's
    drift hits all of them."""
    rounds = [{c: seconds(run, cfg.steps, device) / cfg.steps for c, run in cases.items()}
              for _ in range(cfg.warmup + cfg.rounds)][cfg.warmup:]
    return {c: [r[c] for r in rounds] for c in cases}


def gemm_peak(dtype, n, device):
    """FLOP/s of an n x n x n matmul in `dtype` (None: fp32), the best of 5 timings of enough
    calls for ~50 ms."""
    a, b = torch.randn(2, n, n, device=device, dtype=dtype)

    def matmul():
        return a @ b
    matmul()             # the library's first call picks its kernel
    calls = max(1, round(0.05 / seconds(matmul, 1, device)))   # how many calls make one of ~50 ms
    return 2 * n ** 3 / min(seconds(matmul, calls, device) / calls for _ in range(5))


# torch's counter has no formula for the CPU's fused attention kernel: the same as its other SDPA kernels'
CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: sdpa_flop_count(q, k, v),
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: sdpa_backward_flop_count(g, q, k, v)}


def count_flops(run):
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        run()
    return counter.get_total_flops()


def profile(run, path, device):
    """One step under torch.profiler, written to `path`: the 25 operators taking most of their own time (a
    kernel's, on a GPU). The profiler records the CPU, and CUDA where torch has it."""
    with torch.profiler.profile() as prof:
        run()
        sync(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    write_text(path, prof.key_averages().table(sort_by=key, row_limit=25))

# -----------------------------------------------------------------------------
# One model size


def measure(cfg, size, device, peak):
    """The rows of one model size: the bytes each case saves for backward, its cases timed
    together, then each one's peak memory alone."""
    parts = Parts(cfg, size, device)
    todo = cases(cfg)
    uncompiled = [c for c in todo if c[1] != 'compile']
    batch = cfg.batch_size or fill_batch(parts, uncompiled, cfg.fill, device)
    rows = {(m, p): {'model': size, 'method': m, 'path': p, 'auto': p in (parts.auto, 'compile'),
                     'batch': batch}
            for m, p in todo}
    if any(p == 'sdpa' or p == 'compile' and parts.auto == 'sdpa' for _, p in todo):
        rows[todo[0]]['kernels'] = parts.kernels(batch)   # which fused kernel each sdpa call gets
    saved = {c: parts.saved_for_backward(*c, batch)[0] / 2 ** 20 for c in uncompiled
             if cfg.saved_bytes and c[0] in TRAINED}
    for (method, path), mb in saved.items():
        train = saved.get(('train', path))
        rows[method, path].update(saved_mb=mb, saved_vs_train=train and mb / train)
    if not cfg.timing:
        return list(rows.values())
    steps = {c: parts.step(*c, batch) for c in todo}
    flops = {}
    for c in todo:   # FLOPs of one step, also its first; a compiled step's: auto's, uncompiled
        twin = (c[0], parts.auto) if c[1] == 'compile' else c
        try:
            flops[c] = flops.get(twin) or count_flops(steps.get(twin) or parts.step(*twin, batch))
        except torch.OutOfMemoryError:
            del steps[c]
            rows[c]['error'] = 'out of memory'
            torch.cuda.empty_cache()
    for m in cfg.profile:   # where the time of auto's step goes
        if (m, parts.auto) in steps:
            profile(steps[m, parts.auto], f'{cfg.out_dir}/profile-{size}-{m}.txt', device)
    times = interleaved(steps, cfg, device)
    for m in cfg.profile:   # the compiled step's, once the timed rounds have compiled it and warmed its CUDA graphs
        if (m, 'compile') in steps:
            profile(steps[m, 'compile'], f'{cfg.out_dir}/profile-{size}-{m}-compile.txt', device)
    del parts, steps     # each case's memory is measured alone (compiled graphs hold their module)
    torch._dynamo.reset()
    gc.collect()
    mem_batch = batch if cfg.memory_batch_size < 0 else cfg.memory_batch_size
    for c, t in times.items():   # the cases that ran (not out of memory)
        method, path = c
        row = rows[c]
        f = flops[c]
        prec = PRECISION[autocast_dtype(path, amp_dtype('auto', device))]
        step_s = statistics.median(t)
        row.update(img_s=batch / step_s, step_s=step_s, step_times=t, flops=f,
                   precision=prec, peak_fraction=f / step_s / peak[prec] if prec in peak else None)
        # peak memory: the trained cases, uncompiled; --quick: distillation's default and naive paths
        measured = mem_batch and method in TRAINED and path != 'compile'
        if cfg.quick:
            measured = measured and method == 'distill' and (row['auto'] or path == 'naive')
        if measured:
            row.update(peak_memory(cfg, size, method, path, mem_batch, device))
    return list(rows.values())


# -----------------------------------------------------------------------------
# The report: the machine, then the table of every case


def machine(device):
    return {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name(),
            'cpus': os.cpu_count(), 'threads': torch.get_num_threads(),
            'platform': platform.platform(), 'torch': torch.__version__, 'commit': git_commit(),
            'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}


# each column after model, method, path (and batch): (heading, the row's number, its format)
COLUMNS = [('img/s', 'img_s', '{:.2f}'),
           ('vs naive', 'vs_naive', '{:.2f}x'),
           ('GFLOP / step', 'gflop', '{:.1f}'),
           ('% of GEMM peak (its precision; MFU on a GPU in bf16)', 'peak_pct', '{:.1f}'),
           ('peak memory (MB)', 'peak_mb', '{:.0f}'),
           ('step needs (MB)', 'step_mb', '{:.0f}'),
           ('saved for backward (MB)', 'saved_mb', '{:.1f}'),
           ('saved vs train', 'saved_vs_train', '{:.3f}x')]


def table(rows, gpu):
    """The markdown table of every case, each against the naive path of its model and method
    ('vs naive'); a case that did not run gives its error in place of its speed."""
    naive = {(r['model'], r['method']): r.get('img_s') for r in rows if r['path'] == 'naive'}
    headings = ['model', 'method', 'path']
    if gpu:
        headings.append('batch')
    headings += [c[0] for c in COLUMNS]
    lines = [f"| {' | '.join(headings)} |", '|---|---|---|' + '---:|' * (len(headings) - 3)]
    for r in rows:
        base = naive.get((r['model'], r['method']))
        v = dict(r)
        if base and 'img_s' in r:
            v['vs_naive'] = r['img_s'] / base
        if r.get('flops'):
            v['gflop'] = r['flops'] / 1e9
        if r.get('peak_fraction'):
            v['peak_pct'] = 100 * r['peak_fraction']
        cells = ['' if v.get(key) is None else form.format(v[key]) for _, key, form in COLUMNS]
        cells[0] = cells[0] or r.get('error', '')
        path = r['path']
        if r['auto'] and r['path'] != 'compile':
            path += ' (auto)'
        row = [r['model'], r['method'], path]
        if gpu:
            row.append(str(r['batch']))
        lines.append(f"| {' | '.join(row + cells)} |")
    return lines


def markdown(result):
    cfg = result['config']
    m = result['machine']
    gpu = result['device'].startswith('cuda')
    if cfg['memory_batch_size'] < 0:
        at = 'the timed batch'
    else:
        at = f"batch {cfg['memory_batch_size']}"
    if gpu:
        if cfg['batch_size']:
            rule = 'given'
        else:
            rule = (f"the largest multiple of 8 at which every case fits in {cfg['fill']:.0%} "
                    f"of the GPU's memory")
        batches = ', '.join(f'{k} {v}' for k, v in result['batches'].items())
        batch = f'Batch per model ({rule}): {batches}'
        memory = (f'Memory: peak `max_memory_allocated` of each case built alone '
                  f'(models, optimiser, two steps) at {at}')
    else:
        batch = f"Batch {cfg['batch_size']}"
        memory = f'Memory: peak at {at} (RSS of a fresh process)'
    peaks = ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in result['gemm_peak'].items())
    commit = m['commit'][:10] + m['commit'][40:]
    lines = [f"# Benchmark: {m['device']}", '',
             f"`python {' '.join(result['argv'])}` | {m['cpus']} CPUs, "
             f"{m['threads']} torch threads | torch {m['torch']} | commit {commit} | "
             f"{m['date']}", '',
             f"{batch}, {cfg['img_size']}x{cfg['img_size']} images, patch {cfg['patch_size']}; "
             f"median of {cfg['rounds']} interleaved rounds x {cfg['steps']} steps after "
             f"{cfg['warmup']} warm-up round(s). Distillation: the first {cfg['distill_frac']:.0%} "
             f"of the layers; copy: the first {cfg['copy_frac']:.0%}. GEMM peak measured here: "
             f"{peaks or 'not measured'}. {memory}. Saved for backward: the bytes autograd keeps "
             "from one step's forward pass for its backward, at the timed batch "
             '(saved_tensors_hooks, each storage once, the parameters left out): the same on every '
             'device; "vs train": against the plain train step on the same path.', '',
             *table(result['rows'], gpu), '', 'Paths:', '']
    for p, what in PATHS.items():
        if any(r['path'] == p for r in result['rows']):
            lines.append(f'- `{p}`: {what}')
    lines.append('')
    for r in result['rows']:
        if 'kernels' in r:
            lines.append(f"Kernels of the sdpa path, {r['model']} at batch {r['batch']}: "
                         f"F.scaled_dot_product_attention picks {r['kernels']['sdpa']}; "
                         f"the map-free loss's S K and log-sum-exp: {r['kernels']['lse']}")
    return '\n'.join(lines) + '\n'

# -----------------------------------------------------------------------------
# Main


def main():
    # read when CUDA starts, below: less fragmentation at a batch that fills the GPU
    if not {'PYTORCH_ALLOC_CONF', 'PYTORCH_CUDA_ALLOC_CONF'} & set(os.environ):
        os.environ['PYTORCH_ALLOC_CONF'] = 'expandable_segments:True'
    cfg, device = configure(parse_config(BenchConfig))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)   # profiles are written into it as they are made
    auto = amp_dtype('auto', device)
    dtypes = [None, auto] if auto else [None]   # fp32 (autocast off) and --amp auto's
    peak = {}
    if cfg.timing:
        peak = {PRECISION[dt]: gemm_peak(dt, cfg.gemm_size, device) for dt in dtypes}
    rows = []
    for size in cfg.models:
        rows += measure(cfg, size, device, peak)
        print(f'{size}: measured', flush=True)
    result = {'config': asdict(cfg), 'machine': machine(device), 'device': str(device),
              'argv': ['benchmark.py', *sys.argv[1:]], 'gemm_peak': peak, 'rows': rows,
              'batches': {r['model']: r['batch'] for r in rows}}
    # each whole or not at all
    write_json(f'{cfg.out_dir}/benchmark.json', result)
    md = markdown(result)
    write_text(f'{cfg.out_dir}/BENCHMARK.md', md)
    print(md)
    print(f'wrote {cfg.out_dir}/benchmark.json and BENCHMARK.md')


if __name__ == '__main__':
    run_main(main)
