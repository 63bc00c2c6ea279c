"""
benchmark.py's results as BENCHMARK.md: the machine they were measured on, and the table of every case; on a
GPU with each model's batch. Where a step's time goes: torch.profiler's table of its operators.
"""
import os
import platform
import time

import torch

from tools.benchmark_cases import PATHS
from util.files import cpu_name, git_commit, write_text


def machine(device):
    return {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name(),
            'cpus': os.cpu_count(), 'threads': torch.get_num_threads(), 'platform': platform.platform(),
            'torch': torch.__version__, 'commit': git_commit(), 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}


def profile(run, path, device):
    """One step under torch.profiler, written to `path`: the 25 operators taking most of their own time (a
    kernel's, on a GPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with torch.profiler.profile(activities=acts) as prof:
        run()
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    write_text(path, prof.key_averages().table(sort_by=key, row_limit=25))


def cell(value, form):
    return '' if value is None else form.format(value)


# each column after model, method, path (batch), img/s and 'vs naive': (heading, the row's number, its format)
COLUMNS = [('GFLOP / step', 'gflop', '{:.1f}'),
           ('% of GEMM peak (its precision; MFU on a GPU in bf16)', 'peak_pct', '{:.1f}'),
           ('peak memory (MB)', 'peak_mb', '{:.0f}'), ('step needs (MB)', 'step_mb', '{:.0f}'),
           ('saved for backward (MB)', 'saved_mb', '{:.1f}'), ('saved vs train', 'saved_vs_train', '{:.3f}x')]


def table(rows, gpu):
    """The markdown table of every case, each against the naive path of its model and method ('vs naive')."""
    naive = {(r['model'], r['method']): r['img_s'] for r in rows if r['path'] == 'naive' and 'img_s' in r}
    heads = ['model', 'method', 'path', *['batch'] * gpu, 'img/s', 'vs naive', *[c[0] for c in COLUMNS]]
    lines = ['| ' + ' | '.join(heads) + ' |', '|---|---|---|' + '---:|' * (len(heads) - 3)]
    for r in rows:
        v = {**r, 'gflop': r.get('flops') and r['flops'] / 1e9,
             'peak_pct': r.get('peak_fraction') and 100 * r['peak_fraction']}
        ratio = r['img_s'] / naive[r['model'], r['method']] if 'img_s' in r and (r['model'], r['method']) in naive \
            else None
        cells = [r['model'], r['method'], r['path'] + ' (auto)' * (r['auto'] and r['path'] != 'compile'),
                 *[str(r['batch'])] * gpu, cell(r.get('img_s'), '{:.2f}') or r.get('error', ''),
                 cell(ratio, '{:.2f}x'), *[cell(v.get(key), form) for _, key, form in COLUMNS]]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def markdown(result):
    cfg, m, gpu = result['config'], result['machine'], result['device'].startswith('cuda')
    if gpu:
        rule = 'given' if cfg['batch_size'] else \
            f"the largest multiple of 8 at which every case fits in {cfg['fill']:.0%} of the GPU's memory"
        batch = f"Batch per model ({rule}): " + ', '.join(f'{k} {v}' for k, v in result['batches'].items())
    else:
        batch = f"Batch {cfg['batch_size']}"
    at = 'the timed batch' if cfg['memory_batch_size'] < 0 else f"batch {cfg['memory_batch_size']}"
    memory = (f'Memory: peak `max_memory_allocated` of each case built alone (models, optimiser, two steps) at {at}'
              if gpu else f'Memory: peak at {at} (RSS of a fresh process)')
    peaks = ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in result['gemm_peak'].items()) or 'not measured'
    lines = [f"# Benchmark: {m['device']}", '',
             f"`python {' '.join(result['argv'])}` | {m['cpus']} CPUs, {m['threads']} torch threads | torch "
             f"{m['torch']} | commit {m['commit'][:10] + m['commit'][40:]} | {m['date']}", '',
             f"{batch}, {cfg['img_size']}x{cfg['img_size']} images, patch {cfg['patch_size']}; "
             f"median of {cfg['rounds']} interleaved rounds x {cfg['steps']} steps after {cfg['warmup']} warm-up "
             f"round(s). Distillation: the first {cfg['distill_frac']:.0%} of the layers; copy: the first "
             f"{cfg['copy_frac']:.0%}. GEMM peak measured here: {peaks}. {memory}. Saved for backward: the bytes "
             "autograd keeps from one step's forward pass for its backward, at the timed batch (saved_tensors_hooks, "
             'each storage once, the parameters left out): the same on every device; "vs train": against the plain '
             'train step on the same path.', '', *table(result['rows'], gpu), '', 'Paths:', '']
    lines += [f'- `{p}`: {what}' for p, what in PATHS.items() if any(r['path'] == p for r in result['rows'])]
    return '\n'.join(lines) + '\n'
