"""
Top-1 of trained models, and of their ensembles, on ImageNet and its distribution-shift test sets.

The paper reports that attention transfer stays close to fine-tuning on ImageNet-V2 and falls behind
it on ImageNet-A, -R and -Sketch. This script makes that table for any models: fine-tuned, from
scratch, distilled students, copy students (loaded with their teachers), and ensembles of them.

    python evaluate.py --models mae_vit_large_ft runs/distill/checkpoint.pt runs/copy/checkpoint.pt \
        --ensembles 0,1 --imagenet /datasets/imagenet/val \
        --imagenet-v2 /datasets/imagenetv2-matched-frequency-format-val \
        --imagenet-sketch /datasets/sketch --imagenet-r /datasets/imagenet-r \
        --imagenet-a /datasets/imagenet-a --out results/robustness

Each test set is a folder of class folders, as its authors distribute it:
    --imagenet         <dir>/<wnid>/*       ImageNet's validation split, 1000 folders
    --imagenet-v2      <dir>/<0..999>/*     the class is the folder's number, not its sorted position
    --imagenet-sketch  <dir>/<wnid>/*       1000 folders
    --imagenet-r       <dir>/<wnid>/*       200 folders; predictions restricted to those 200 classes
    --imagenet-a       <dir>/<wnid>/*       200 folders; likewise
Classes are ImageNet-1k's indices (util/classes/imagenet.txt); the 200-class lists are
util/classes/imagenet-r.txt and util/classes/imagenet-a.txt. Writes <out>/robustness.md and
<out>/robustness.json. One process, on a GPU if there is one. A small data set's test
split stands in for the folders, its images shifted (data.SHIFTS):
    python evaluate.py --data fashion-mnist --models a.pt b.pt --ensembles 0,1 --shift none invert rotate
"""
import json
import os
import re
import signal
import sys
from dataclasses import asdict, dataclass
from types import SimpleNamespace

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch

from data import SHIFTS, build_eval_set, build_transform, class_names, held_where
from ensemble import check_classes, ensemble_probs, load_models
from util.config import DATA, ConfigError, ModelsConfig, option
from util.datafiles import DataError, build_loader, read_classes
from util.engine import accuracy, predict_all
from util.errors import say
from util.launch import on_device, parse_config, run_main
from util.files import check_outputs

# -----------------------------------------------------------------------------
# Config


@dataclass
class EvaluateConfig(ModelsConfig):
    ensembles: list[str] = option(factory=list,
                                  help='groups of --models positions: --ensembles 0,1 0,1,2')
    imagenet: str = option('', "the test sets' folders (empty: skipped), layouts above")
    imagenet_v2: str = ''
    imagenet_sketch: str = ''
    imagenet_r: str = ''
    imagenet_a: str = ''
    data: str = option('', "instead of the folders: this data set's test split "
                           '(fashion-mnist, cifar10, ...)',
                       choices=('', *DATA))
    data_dir: str = option('./data',
                           '--data: where its files are '
                           '(util/datafiles.py looks in other places too)')
    shift: list[str] = option(factory=lambda: ['none'],
                              help='--data: its images changed, labels not, one column each: '
                                   f"{' '.join(SHIFTS)}")
    out: str = option('runs/robustness', 'robustness.md and robustness.json go here')
    batch_size: int = 128
    num_workers: int = 8

    def checks(self):
        return super().checks() + [
            ('data', not (self.data and folders(self)), 'or the folders: not both'),
            ('shift', self.shift and set(self.shift) <= set(SHIFTS)
             and (self.data or self.shift == ['none']),
             f"with --data: one or more of {', '.join(SHIFTS)}")]

# -----------------------------------------------------------------------------
# The test sets: which folder is which ImageNet class, and which classes a prediction may take


WNIDS = read_classes('imagenet')                         # class index -> wnid
INDEX = {w: i for i, w in enumerate(WNIDS)}


def subset_set(name):
    index = {w: INDEX[w] for w in read_classes(name)}
    return f'wnids, the {len(index)} of util/classes/{name}.txt', index, sorted(index.values())


# name -> (how its folders are named, folder name -> class index, classes a prediction may take)
SETS = {
    'imagenet': ('wnids (n01440764 ...), the 1000 ImageNet classes', INDEX, None),
    'imagenet-v2': ('0 .. 999, the class index', {str(i): i for i in range(1000)}, None),
    'imagenet-sketch': ('wnids (n01440764 ...), the 1000 ImageNet classes', INDEX, None),
    'imagenet-r': subset_set('imagenet-r'),
    'imagenet-a': subset_set('imagenet-a'),
}


def folders(cfg):
    """{test set: its folder} of those given."""
    given = {}
    for name in SETS:
        path = getattr(cfg, name.replace('-', '_'))
        if path:
            given[name] = path
    return given


def load_set(name, root, transform):
    """(dataset, allowed classes or None) of one test set; DataError naming the layout
    if it is not one."""
    layout, index, allowed = SETS[name]
    expected = f"--{name} expects <dir>/<class folder>/<image>, the folders named {layout}"
    if not os.path.isdir(root):
        raise DataError(f'no folder {root}: {expected}')
    from util.folders import ClassFolder   # torchvision's ImageFolder: imported for folders alone
    return ClassFolder(root, index, transform, expected), allowed

# -----------------------------------------------------------------------------
# Scores


def restrict(logits, classes):
    """Logits (N, C) with every class outside `classes` at -inf: argmax, top-k and
    softmax stay among them (the datasets' own evaluation keeps just those columns,
    which ranks them the same)."""
    outside = torch.full_like(logits, float('-inf'))
    outside[:, classes] = 0.0
    return logits + outside                                                   # (N, C)


def top1_row(logits, labels, allowed, groups):
    """Top-1 (%) of each model, then of each ensemble group (mean of probabilities), on
    one test set. logits: [(N, 1000)] per model; labels (N,); allowed: the classes
    predictions may take, or None."""
    if allowed:
        logits = [restrict(l, allowed) for l in logits]
    row = [accuracy(l, labels) for l in logits]
    row += [accuracy(ensemble_probs([logits[i] for i in g]), labels) for g in groups]
    return row


def parse_groups(specs, n):
    """['0,1', '0,2'] -> [[0, 1], [0, 2]]: positions in --models, at least two each."""
    groups = []
    for spec in specs:
        g = []
        if re.fullmatch(r'\d+(,\d+)+', spec):
            g = [int(i) for i in spec.split(',')]
        if not g or len(set(g)) < len(g) or max(g) >= n:
            raise ConfigError(f"--ensembles {spec}: two or more distinct positions in --models "
                              f"(0..{n - 1}), comma-separated, e.g. 0,1")
        groups.append(g)
    return groups


def markdown(names, top1):
    """The table: a row per model or ensemble (names), a column per test set
    (top1: {test set: each row's top-1})."""
    lines = [f"| model | {' | '.join(top1)} |", f"|---|{'---:|' * len(top1)}"]
    for i, name in enumerate(names):
        cells = ' | '.join(f'{v[i]:.2f}' for v in top1.values())
        lines.append(f'| {name} | {cells} |')
    return '\n'.join(lines)

# -----------------------------------------------------------------------------
# Main


def main():
    cfg = parse_config(EvaluateConfig)
    paths = folders(cfg)
    if not cfg.models or not (paths or cfg.data):
        raise ConfigError('give --models (checkpoints or names) and at least one test set folder: '
                          '--imagenet, --imagenet-v2, --imagenet-sketch, --imagenet-r, '
                          '--imagenet-a (or --data)')
    groups = parse_groups(cfg.ensembles, len(cfg.models))
    files = [os.path.join(cfg.out, f) for f in ('robustness.md', 'robustness.json')]
    # written after every model has run: refused before any does (a file there, a folder that cannot be
    # written), and again as each is written (a file put there meanwhile is kept)
    write = check_outputs('--out', *files, reads=cfg.models)
    score(cfg, groups, paths, write, files)


def score(cfg, groups, paths, write, files):
    """Every model and ensemble on every test set; the table, into the files checked
    (write: util/files.check_outputs')."""
    models, records, img_size = load_models(cfg.models, num_heads=cfg.num_heads,
                                            img_size=cfg.img_size)
    # the test images' size and normalisation; --data: its test split
    data = SimpleNamespace(data=cfg.data or 'imagenet', data_dir=cfg.data_dir, img_size=img_size,
                           val_size=0, fake_size=512)
    classes = WNIDS   # the 1000 ImageNet classes
    if cfg.data:
        classes = class_names(*build_eval_set(data))
    # by name where the models record theirs
    check_classes(cfg.models, records, classes, data.data)
    if cfg.data:   # one column per shift of the test split: (what it is, dataset, allowed classes)
        sets = {s: (f'{cfg.data} test split, shifted: {s}', build_eval_set(data, s)[0], None)
                for s in cfg.shift}
    else:   # every folder's layout checked before any work
        transform = build_transform(data, train=False)
        sets = {name: (path, *load_set(name, path, transform)) for name, path in paths.items()}

    models, place, attn = on_device(models, cfg, next(iter(sets.values()))[1])
    say(f'attention: {attn}')
    members = [[m] for m in cfg.models] + [[cfg.models[i] for i in g] for g in groups]
    names = [' + '.join(m) for m in members]
    top1 = {}                                           # per test set: the top-1 of each row
    for set_name, (_, dataset, allowed) in sets.items():
        held = held_where(place.device, say, set=dataset)['set']
        loader = build_loader(cfg, held, False, device=place.device)
        logits, labels = predict_all(models, loader, place)
        top1[set_name] = top1_row(logits, labels, allowed, groups)
        say(f"{set_name}: {len(labels)} images | {' | '.join(f'{v:.2f}' for v in top1[set_name])}")

    md = markdown(names, top1)
    say(f'\n{md}')
    subsets = ''
    if not cfg.data:
        subsets = '; on ImageNet-R and -A every prediction is among their 200 classes'
    text = (f"# Top-1 (%) under distribution shift\n\n{md}\n\n"
            f"Ensembles average their models' probabilities{subsets}.\n")
    rows = []
    for i, (name, m) in enumerate(zip(names, members)):
        rows.append({'model': name, 'members': m, 'top1': {s: v[i] for s, v in top1.items()}})
    record = {'config': asdict(cfg),
              'sha256': {m: r['sha256'] for m, r in zip(cfg.models, records)},   # what was scored
              'sets': {n: {'path': p, 'images': len(d), 'classes': len(a or classes)}
                       for n, (p, d, a) in sets.items()},
              'rows': rows}
    write(files[0], lambda f: f.write(text.encode()))
    write(files[1], lambda f: f.write(json.dumps(record, indent=2).encode()))


if __name__ == '__main__':
    run_main(main)
