"""
The input bound: each small-data preset's batches as the scripts make them, a training step end to
end on them, and the step alone on one batch, in images a second on this device; beside them the
per-image loader the small data sets had before (each image through build_transform in loader
worker processes), for comparison.

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
from torch.utils.data import Dataset

from data import build_data, build_splits, build_transform
from finetune import PRESETS, FinetuneConfig, build_model
from tools.benchmark import seconds, some_of
from tools.benchmark_report import machine
from util.config import STEPS, WORKERS, ConfigError, at_least, one_of, option
from util.datafiles import unwrap
from util.engine import autocast, build_loader, build_optimizer, soft_cross_entropy
from util.files import check_out_dir, write_text
from util.launch import amp_dtype, attn_implementation, parse_config, run_main
from vit import set_attn_implementation

SMALL = ('fashion-mnist', 'cifar10', 'cifar100', 'fake')
CASES = ('loader, per image', 'loader, in memory', 'end to end, per image', 'end to end, in memory',
         'step alone')


@dataclass
class InputConfig:
    presets: list[str] = some_of(SMALL, ['fashion-mnist'], 'data sets, each timed at its preset')
    data_dir: str = './data'
    device: str = option('auto', 'auto | cpu | cuda',
                         one_of(('auto', 'cpu', 'cuda'), 'must be auto, cpu or cuda'))
    rounds: int = option(5, 'timed rounds', at_least(1, most=STEPS))
    steps: int = option(10, 'batches (or steps) of each case in a round', at_least(1, most=STEPS))
    warmup: int = option(1, 'untimed rounds before them', at_least(0, most=STEPS))
    per_image: bool = option(True, 'also the per-image loader the small data sets had before')
    workers: int = option(1, "the per-image loader's processes (Fashion-MNIST's preset had 1)",
                          at_least(0, 'load in the main process', WORKERS))
    quick: bool = option(False, '1 round of 2 steps, no warm-up: checks that everything runs')
    out_dir: str = 'runs/benchmark-input'


class PerImage(Dataset):
    """A data set held in memory, read as the small data sets were before they were batched where
    they are held: each image (grey repeated to 3 channels) through build_transform's transforms."""

    def __init__(self, held, transform):
        self.images = held.images
        self.labels = held.labels
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i].expand(3, -1, -1)), int(self.labels[i])


def per_image_loader(cfg, train=True, rank=0, world=1):
    """The training (or test) split of cfg's in-memory data set in the per-image loader it had
    before: SeededDataset and --num-workers processes (util/engine.py's build_loader on a data set
    not held in memory)."""
    data = build_splits(cfg)
    split = unwrap(data.train if train else data.eval)
    return build_loader(cfg, PerImage(split, build_transform(cfg, train)), train, rank, world)


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
    new = forever(loader, device)
    x0, y0 = next(new)
    cases = {'loader, in memory': lambda: next(new),
             'end to end, in memory': lambda: step(*next(new)),
             'step alone': lambda: step(x0, y0)}
    if cfg.per_image:
        old = forever(per_image_loader(replace(run, num_workers=cfg.workers)), device)
        cases['loader, per image'] = lambda: next(old)
        cases['end to end, per image'] = lambda: step(*next(old))
    cases = {name: cases[name] for name in CASES if name in cases}
    rounds = [{name: seconds(run_case, cfg.steps, device) / cfg.steps
               for name, run_case in cases.items()}
              for _ in range(cfg.warmup + cfg.rounds)][cfg.warmup:]
    rows = []
    for name in cases:
        times = [r[name] for r in rounds]
        workers = cfg.workers if 'per image' in name else 0
        rows.append({'data': data, 'case': name, 'batch': run.batch_size, 'workers': workers,
                     'img_s': run.batch_size / statistics.median(times), 'times': times})
    return rows


def markdown(result):
    m = result['machine']
    c = result['config']
    lines = [f"# The input bound: batches and steps of the small-data presets\n\n"
             f"{m['device']} ({m['cpus']} CPUs, {m['threads']} torch threads), torch {m['torch']}, "
             f"{m['date']}, commit {m['commit']}; `{' '.join(result['argv'])}`. Medians of "
             f"{c['rounds']} interleaved rounds of {c['steps']} batches or steps.\n",
             '| data | case | loader workers | batch | img/s | batches/s | vs step alone |',
             '|---|---|---:|---:|---:|---:|---:|']
    alone = {r['data']: r['img_s'] for r in result['rows'] if r['case'] == 'step alone'}
    for r in result['rows']:
        lines.append(f"| {r['data']} | {r['case']} | {r['workers']} | {r['batch']} | "
                     f"{r['img_s']:,.0f} | {r['img_s'] / r['batch']:,.1f} | "
                     f"{r['img_s'] / alone[r['data']]:.2f}x |")
    return '\n'.join(lines) + '\n'


def main():
    cfg = parse_config(InputConfig)
    if cfg.quick:
        cfg = replace(cfg, rounds=1, steps=2, warmup=0)
    gpu = cfg.device != 'cpu' and torch.cuda.is_available()
    if cfg.device == 'cuda' and not gpu:
        raise ConfigError('--device cuda: torch sees no CUDA device here; run on a GPU machine, '
                          'or --device cpu')
    device = torch.device('cuda' if gpu else 'cpu')
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
