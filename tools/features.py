"""
Does a student learn features of its own (the paper's second claim)? Models compared with their
teacher and with each other, block i against block i, by linear CKA (Kornblith et al., ICML 2019)
of features X (n, d1) and Y (n, d2) of the same n samples, each centred over them (Xc, Yc):

    CKA = ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)

1 for features that differ by a rotation, a scale or a shift; near 0 for unrelated ones. The
samples: every token at a block's output (the residual stream before the final norm) of every test
image, and the class token alone. Beside it, each classifier's top-1 on the same images, fp32.

    python -m tools.features --teacher teachers/fashion-mnist-mae.pt --out-dir runs/features \
        --models results/fashion-mnist/features/models/{scratch,finetune,copy,distill}-{0,1,2}.pt

Streamed over the test split: Xc^T Yc = X^T Y - (sum x)(sum y)^T / n needs only sums over the
samples. With every model's features side by side, Z = [X_1 ... X_M] (n, W), one pass adds up
Z^T Z and sum z in float64: W^2 numbers a block whatever n (13 models of width 64: 5 MB; of
ViT-L's 1024: 1.4 GB, so compare a few --blocks at a time). A file <method>-<seed>.pt is a seed
of its method. Each group, the teacher and a method, two seeds of one method (the control: how
alike one recipe's runs are anyway) or two methods, is the mean and spread over its pairs.
"""
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from itertools import combinations, combinations_with_replacement
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Subset

from data import build_eval_set, class_names
from ensemble import check_classes, load_models
from util.checkpoints import build_from_checkpoint
from util.config import BATCH, DEPTH, STEPS, ConfigError, at_least, option
from util.engine import accuracy
from util.errors import say, show
from util.files import check_outputs, cpu_name, page_commit
from util.launch import parse_config, run_main

KINDS = {'tokens': 'every token of every image a sample, block i against block i',
         'class_token': 'the class token alone'}


@dataclass
class FeaturesConfig:
    models: list[str] = option(factory=list, help='classifiers, files named <method>-<seed>.pt')
    teacher: str = option('', 'the teacher the students learnt from (copy students run with it)')
    images: int = option(0, 'the first this many test images; 0 (or more than the split has) = all',
                         at_least(0, 'all', STEPS))
    blocks: list[int] = option(factory=list, help='the blocks compared; none = all',
                               rule=(lambda v: all(0 <= b < DEPTH for b in v),
                                     f'must be 0 to {DEPTH - 1}'))
    batch_size: int = option(200, rule=at_least(1, most=BATCH))
    data_dir: str = option('./data', "the models' data set's folder (util/datafiles.py: or where)")
    out_dir: str = option('', 'features.json and TABLE.md here (neither may exist yet); '
                          'empty = print the tables')
    dirty: bool = option(False, 'write them from code with uncommitted changes (they record it); '
                                'otherwise such a tree is refused')

    def checks(self):
        names = [name(p) for p in self.models]
        return [('models', len(names) > 0, 'is required: e.g. --models scratch-0.pt distill-0.pt'),
                ('teacher', self.teacher != '', 'is required: e.g. --teacher teachers/mae.pt'),
                ('models', len(set(names + ['teacher'])) == len(names) + 1,
                 "need distinct file names, none of them 'teacher': rename the files")]


def name(path):
    return os.path.splitext(os.path.basename(path))[0]


def method_seed(model):
    """'distill-2' -> ('distill', 2); a name without a seed is a method of its own (the teacher)."""
    m = re.fullmatch(r'(.+)-(\d+)', model)
    return (m[1], int(m[2])) if m else (model, None)

# -----------------------------------------------------------------------------
# Linear CKA, streamed


class Gram:
    """Zc^T Zc of features Z (n, W) seen batch by batch. Each batch is shifted by the first one's
    mean (CKA is blind to a shift): a large mean would cancel digits in Z^T Z - (sum z)(sum z)^T / n."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.sum = 0.0
        self.cross = 0.0

    def add(self, z):
        z = z.double()                                                # (n, W)
        if self.shift is None:
            self.shift = z.mean(0)
        z = z - self.shift
        self.n += len(z)
        self.sum += z.sum(0)                                          # (W,)
        self.cross += z.T @ z                                         # (W, W)

    def cka(self, widths):
        """[i][j]: the CKA of models i and j, whose features are `widths` columns of Z each."""
        c = self.cross - torch.outer(self.sum, self.sum) / self.n     # (W, W) = Zc^T Zc
        g = [row.split(widths, 1) for row in c.split(widths)]         # g[i][j] = Xc_i^T Xc_j
        m = range(len(widths))
        return [[(g[i][j].square().sum() / (g[i][i].norm() * g[j][j].norm())).item() for j in m]
                for i in m]


def keeper(outputs, key):
    def hook(module, args, out):
        outputs[key] = out[0]                                         # (tokens (B, N, D), kept)
    return hook


@torch.no_grad()
def one_pass(models, vits, loader, blocks, device):
    """({kind: [block][i][j] the CKA of models i and j}, {classifier: top-1}) in one pass: the
    outputs of the blocks of `vits` (a copy student's own) while `models` run on each batch."""
    outputs = {}
    grams = {(kind, i): Gram() for kind in KINDS for i in blocks}
    hooks = [vit.blocks[i].register_forward_hook(keeper(outputs, (k, i)))
             for k, vit in vits.items() for i in blocks]
    logits = {k: [] for k, vit in vits.items() if vit.num_classes}
    labels = []
    for x, y in loader:
        x = x.to(device)                                              # once for every model
        for k, model in models.items():
            out = model(x)                                            # (B, C); teacher: features
            if k in logits:
                logits[k].append(out.float().cpu())
        labels.append(y)
        for i in blocks:
            z = torch.cat([outputs[k, i] for k in models], -1)        # (B, N, W)
            grams['tokens', i].add(z.flatten(0, 1))                   # (B * N, W)
            grams['class_token', i].add(z[:, 0])                      # (B, W)
    for h in hooks:
        h.remove()
    widths = [outputs[k, blocks[0]].shape[-1] for k in models]
    top1 = {k: accuracy(torch.cat(v), torch.cat(labels)) for k, v in logits.items()}
    return {kind: [grams[kind, i].cka(widths) for i in blocks] for kind in KINDS}, top1


def groups(names):
    """[(a, b, pairs)]: each method with itself (two seeds) and with each other (the teacher one),
    over models of different seeds: the same seed of two methods may share its start."""
    of = {}
    for k in names:
        of.setdefault(method_seed(k)[0], []).append(k)
    out = []
    for a, b in combinations_with_replacement(of, 2):
        if a == b:
            pairs = list(combinations(of[a], 2))
        else:
            pairs = [(x, y) for x in of[a] for y in of[b] if method_seed(x)[1] != method_seed(y)[1]]
        if pairs:
            out.append((a, b, pairs))
    return out


def spread(values):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {'mean': statistics.fmean(values), 'std': std, 'min': min(values), 'max': max(values)}

# -----------------------------------------------------------------------------
# The models, the pass, the record


def analyse(cfg, device):
    """features.json's result: each model's top-1, each pair's CKA a block, each group's spread."""
    classifiers, records, size = load_models(cfg.models, cfg.teacher)
    teacher = build_from_checkpoint(cfg.teacher, num_classes=0, img_size=size).eval().to(device)
    models = {'teacher': teacher,
              **{name(p): m.to(device) for p, m in zip(cfg.models, classifiers)}}
    vits = {k: getattr(m, 'student', m) for k, m in models.items()}   # a copy student's own ViT
    blocks = sorted(set(cfg.blocks)) or list(range(teacher.depth))
    if blocks[-1] >= teacher.depth:
        raise ConfigError(f'--blocks {show(cfg.blocks)}: the models have blocks 0 to '
                          f'{teacher.depth - 1}')
    data = records[0]['data']                                         # check_classes: all of theirs
    test_set, classes = build_eval_set(SimpleNamespace(data=data, data_dir=cfg.data_dir, val_size=0,
                                                       img_size=size))
    check_classes(cfg.models, records, class_names(test_set, classes), data)
    # the first: the same every run (at most the whole split)
    images = Subset(test_set, range(len(test_set))[:cfg.images or None])
    cka, top1 = one_pass(models, vits, DataLoader(images, cfg.batch_size), blocks, device)
    at = {k: i for i, k in enumerate(models)}

    def value(kind, a, b):   # per block: the CKA of models a and b
        return [c[at[a]][at[b]] for c in cka[kind]]
    pairs_cka = [{'a': a, 'b': b, **{kind: value(kind, a, b) for kind in KINDS}}
                 for a, b in combinations(models, 2)]
    group_cka = []
    for a, b, pairs in groups(models):
        group = {'a': a, 'b': b, 'pairs': [list(p) for p in pairs]}
        for kind in KINDS:
            per_pair = [value(kind, *p) for p in pairs]                  # [pair][block]
            group[kind] = [spread(block) for block in zip(*per_pair)]    # per block, over the pairs
        group_cka.append(group)
    return {
        'images': len(images), 'data': data, 'blocks': blocks, 'teacher': 'teacher',
        'models': {k: {'method': method_seed(k)[0], 'seed': method_seed(k)[1], 'top1': top1.get(k)}
                   for k in models},
        'cka': pairs_cka,
        'groups': group_cka}


def tables(r):
    """TABLE.md: top-1 per method and seed, each group's CKA per block; cells 'mean ±std'."""
    def pm(s):   # 'mean ±std'; no spread (one value): the mean alone
        if s['std']:
            return f"{s['mean']:.2f} ±{s['std']:.2f}"
        return f"{s['mean']:.2f}"
    top1 = {}
    for m in r['models'].values():
        if m['top1'] is not None:
            top1.setdefault(m['method'], []).append(m['top1'])
    seeds = max(map(len, top1.values()))
    out = ['# The top-1 and CKA tables of features.json', '',
           '## Top-1 (%) on these images, fp32', '',
           f"| top-1 (%) | {' | '.join(f'model {i + 1}' for i in range(seeds))} | mean ± std |",
           f"|---|{'---:|' * (seeds + 1)}"]
    for k, v in top1.items():
        cells = ' | '.join(f'{t:.2f}' for t in v) + ' |' * (seeds - len(v))   # fewer seeds: blank
        out.append(f'| {k} | {cells} | {pm(spread(v))} |')
    # the teacher's groups first; then a method with itself before two methods
    def teacher_first(g):
        return (r['teacher'] not in (g['a'], g['b']), g['a'] != g['b'])
    for kind, title in KINDS.items():
        out += ['', f'## Linear CKA, {title}', '',
                f"| linear CKA | pairs | {' | '.join(f'block {i}' for i in r['blocks'])} |",
                f"|---|{'---:|' * (1 + len(r['blocks']))}"]
        for g in sorted(r['groups'], key=teacher_first):
            seed_to_seed = ' (seed to seed)' if g['a'] == g['b'] else ''
            cells = ' | '.join(map(pm, g[kind]))
            out.append(f"| {g['a']} vs {g['b']}{seed_to_seed} | {len(g['pairs'])} | {cells} |")
    return '\n'.join(out) + '\n'


def main():
    cfg = parse_config(FeaturesConfig)
    outputs = []
    if cfg.out_dir:
        outputs = [os.path.join(cfg.out_dir, f) for f in ('features.json', 'TABLE.md')]
    # refused before any work where they could not be written: nothing is written over
    write = check_outputs('--out-dir', *outputs)
    made = page_commit(cfg.dirty) if outputs else None   # a page is made from committed code
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    torch.backends.cudnn.allow_tf32 = False                           # fp32 on a GPU too
    start = time.time()
    result = analyse(cfg, device)
    table = tables(result)
    say(table)
    if outputs:
        machine = torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()
        record = {'command': shlex.join(['python', '-m', 'tools.features', *sys.argv[1:]]),
                  'git_commit': made['git_commit'], 'clean': made['clean'], 'machine': machine,
                  'threads': torch.get_num_threads(), 'torch': torch.__version__,
                  'wall_s': time.time() - start, 'config': asdict(cfg), 'result': result}
        write(outputs[0], lambda f: f.write(json.dumps(record, indent=2).encode()))
        write(outputs[1], lambda f: f.write(table.encode()))


if __name__ == '__main__':
    run_main(main)
