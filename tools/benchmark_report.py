"""
benchmark.py's results as BENCHMARK.md: the machine they were measured on, and the table of every case; on a
GPU with each model's batch.
"""
import os
import platform
import time

import torch

from tools.benchmark_cases import PATHS
from util.files import cpu_name, git_commit


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
        v = dict(r, vs_naive=None, gflop=r.get('flops'), peak_pct=r.get('peak_fraction'))
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
    if gpu:
        if cfg['batch_size']:
            rule = 'given'
        else:
            rule = (f"the largest multiple of 8 at which every case fits in {cfg['fill']:.0%} "
                    f"of the GPU's memory")
        batches = ', '.join(f'{k} {v}' for k, v in result['batches'].items())
        batch = f'Batch per model ({rule}): {batches}'
    else:
        batch = f"Batch {cfg['batch_size']}"
    if cfg['memory_batch_size'] < 0:
        at = 'the timed batch'
    else:
        at = f"batch {cfg['memory_batch_size']}"
    if gpu:
        memory = (f'Memory: peak `max_memory_allocated` of each case built alone '
                  f'(models, optimiser, two steps) at {at}')
    else:
        memory = f'Memory: peak at {at} (RSS of a fresh process)'
    peaks = ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in result['gemm_peak'].items())
    peaks = peaks or 'not measured'
    commit = m['commit'][:10] + m['commit'][40:]
    lines = [f"# Benchmark: {m['device']}", '',
             f"`python {' '.join(result['argv'])}` | {m['cpus']} CPUs, "
             f"{m['threads']} torch threads | torch {m['torch']} | commit {commit} | "
             f"{m['date']}", '',
             f"{batch}, {cfg['img_size']}x{cfg['img_size']} images, patch {cfg['patch_size']}; "
             f"median of {cfg['rounds']} interleaved rounds x {cfg['steps']} steps after "
             f"{cfg['warmup']} warm-up round(s). Distillation: the first {cfg['distill_frac']:.0%} "
             f"of the layers; copy: the first {cfg['copy_frac']:.0%}. GEMM peak measured here: "
             f"{peaks}. {memory}. Saved for backward: the bytes autograd keeps from one step's "
             'forward pass for its backward, at the timed batch (saved_tensors_hooks, each storage '
             'once, the parameters left out): the same on every device; "vs train": against the '
             'plain train step on the same path.', '',
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
