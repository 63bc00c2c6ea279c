"""
The input bound: each small-data preset's batches as the scripts make them, a training step end to
end on them, and the step alone on one batch, in images a second on this device. The per-image
loader the small data sets had before (each image through build_transform in a loader worker) is
measured in results/benchmark/INPUT.md, at the commit it names; tests/test_batches.py keeps it as
the oracle the held batches are compared against.

    python -m tools.benchmark_input                          # Fashion-MNIST's preset, this device
    python -m tools.benchmark_input --presets fashion-mnist cifar10 --device cuda \
        --out-dir runs/benchmark-input-h100
    python -m tools.benchmark_input --presets fake --quick true   # checks that it all runs

The step is train_one_epoch's for training from scratch (finetune.py at the preset): autocast at
--amp auto, the label-smoothed cross-entropy, backward, AdamW (no lr schedule; no GradScaler, which
bf16 and fp32 need not). Each case runs --steps batches or steps a round, the cases interleaved
round by round (a shared machine's drift hits each alike), the device synchronised around each; the
medians are reported. Writes <out-dir>/input.json and INPUT.md.
"""
import itertools
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch

from data import build_data
from finetune import PRESETS, FinetuneConfig, build_model
from tools.benchmark import Timing, interleaved, machine, pick_device, some_of
from util.config import option
from util.engine import autocast, build_optimizer, soft_cross_entropy
from util.files import check_out_dir, write_text
from util.launch import amp_dtype, attn_implementation, parse_config, run_main
from vit import set_attn_implementation

SMALL = ('fashion-mnist', 'cifar10', 'cifar100', 'fake')


@dataclass
class InputConfig(Timing):
    presets: list[str] = some_of(SMALL, ['fashion-mnist'], 'data sets, each timed at its preset')
    data_dir: str = './data'
    steps: int = option(10, 'batches (or steps) of each case in a round')
    quick: bool = option(False, '1 round of 2 steps, no warm-up: checks that everything runs')
    out_dir: str = 'runs/benchmark-input'


def forever(loader, device):
    """A loader's batches, epoch after epoch, moved to `device` as train_one_epoch moves them."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def measure(cfg, data, device):
    """The rows of one preset: each case's img/s over interleaved rounds (medians)."""
    run = FinetuneConfig(**{**PRESETS[data], 'data': data, 'data_dir': cfg.data_dir})
    plan = SimpleNamespace(cfg=run, rank=0, world=1, device=device, dtype=amp_dtype('auto', device),
                           log=print)
    splits, loader, _ = build_data(plan)
    torch.manual_seed(0)
    model = build_model(run, splits.num_classes)
    model = set_attn_implementation(model, attn_implementation('auto', device)[0])
    model = model.to(device).train()
    opt = build_optimizer(run, model, run.blr * run.batch_size / 256)

    def step(x, y):
        with autocast(plan):
            loss = soft_cross_entropy(model(x), y, run.smoothing)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    batches = forever(loader, device)
    x0, y0 = next(batches)
    cases = {'loader, in memory': lambda: next(batches),
             'end to end, in memory': lambda: step(*next(batches)),
             'step alone': lambda: step(x0, y0)}
    rows = []
    for name, times in interleaved(cases, cfg, device).items():
        rows.append({'data': data, 'case': name, 'batch': run.batch_size,
                     'img_s': run.batch_size / statistics.median(times), 'times': times})
    return rows


def markdown(result):
    m = result['machine']
    c = result['config']
    lines = [f"# The input bound: batches and steps of the small-data presets\n\n"
             f"{m['device']} ({m['cpus']} CPUs, {m['threads']} torch threads), torch {m['torch']}, "
             f"{m['date']}, commit {m['commit']}; `{' '.join(result['argv'])}`. Medians of "
             f"{c['rounds']} interleaved rounds of {c['steps']} batches or steps.\n",
             '| data | case | batch | img/s | batches/s | vs step alone |',
             '|---|---|---:|---:|---:|---:|']
    alone = {r['data']: r['img_s'] for r in result['rows'] if r['case'] == 'step alone'}
    for r in result['rows']:
        lines.append(f"| {r['data']} | {r['case']} | {r['batch']} | "
                     f"{r['img_s']:,.0f} | {r['img_s'] / r['batch']:,.1f} | "
                     f"{r['img_s'] / alone[r['data']]:.2f}x |")
    return '\n'.join(lines) + '\n'


def main():
    cfg = parse_config(InputConfig)
    if cfg.quick:
        cfg = replace(cfg, rounds=1, steps=2, warmup=0)
    device = pick_device(cfg.device)
    check_out_dir(cfg.out_dir, '--out-dir', 'input.json', ('INPUT.md',))
    rows = [row for data in cfg.presets for row in measure(cfg, data, device)]
    os.makedirs(cfg.out_dir, exist_ok=True)
    result = {'config': asdict(cfg), 'machine': machine(device),
              'argv': ['benchmark_input.py', *sys.argv[1:]], 'rows': rows}
    write_text(f'{cfg.out_dir}/input.json', json.dumps(result, indent=1))
    md = markdown(result)
    write_text(f'{cfg.out_dir}/INPUT.md', md)
    print(md)


if __name__ == '__main__':
    run_main(main)
