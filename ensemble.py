"""
Evaluate models on a dataset's test split, alone and as an ensemble (the mean of their
softmax probabilities, weighted), and how often two disagree (the share of test images
whose top-1 differs). In the paper a fine-tuned model and a distilled student reach 86.3
top-1 together on ImageNet, 85.7 each alone: their mistakes differ.

    python ensemble.py --data fashion-mnist --models runs/finetune/checkpoint.pt runs/distill/checkpoint.pt
    python ensemble.py --data fashion-mnist --models a.pt b.pt --weights 2 1 --out runs/ensemble.json

A model is a file or a name util/checkpoints.py knows, or a copy student, loaded with the
teacher its checkpoint records by SHA-256 (`--teacher moved.pt` if it moved,
`--new-teacher true` for another on purpose). `--out` writes over nothing but an earlier
result of this script (or with `--overwrite true`). One process, on a GPU if there is one.
"""
import json
import math
import os
import signal
import sys
from dataclasses import asdict, dataclass
from itertools import combinations, cycle
from types import SimpleNamespace

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch

from data import INFO, build_eval_set, class_names, data_device, data_source, held_on
from teacher import load_copy_model
from util.attention_check import start_up_check
from util.checkpoints import CheckpointError, build_from_checkpoint, read_checkpoint
from util.config import (AMP, BATCH, DEPTH, SAMPLER_BYTES, SIZE, STEPS, WORKERS, ConfigError,
                         at_least, machine_memory, option, show)
from util.datafiles import TensorImages, build_loader, unwrap
from util.engine import autocast
from util.launch import amp_dtype, attn_implementation, parse_config, run_main
from util.files import claimed
from util.run import class_mismatch
from util.rundir import say
from vit import IMPLEMENTATIONS

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelsConfig:
    """The flags every evaluation of trained models shares (ensemble.py, evaluate.py)."""
    models: list[str] = option(factory=list, help='checkpoint files or names: --models a.pt b.pt')
    num_heads: list[int] = option(factory=list, help='head counts of files of weights alone: '
                                  'one for every model, or one each '
                                  "(0: the file's record or family)")
    img_size: int = option(0, "0 = the models' own (they must share one)",
                           at_least(0, "the models' own", SIZE))
    batch_size: int = option(256, rule=at_least(1, most=BATCH))
    num_workers: int = option(2, rule=at_least(0, 'load in the main process', WORKERS))
    amp: str = option('auto', ' | '.join(AMP), choices=AMP)
    attn_implementation: str = option('auto', 'eager (explicit maps) | '
                                              'sdpa (fused, no map stored) | auto: per device',
                                      choices=('auto', *IMPLEMENTATIONS))
    seed: int = option(0, "seeds the loader's generator (the test split is not shuffled)",
                       (lambda v: 0 <= v < 2 ** 63,
                        'must be in [0, 2**63): torch seeds its generators with 64 bits'))

    def checks(self):   # --num-heads beside --models
        return [('num_heads', len(self.num_heads) in (0, 1, len(self.models)),
                 f'gives {len(self.num_heads)} head counts for {len(self.models)} models: '
                 f'one for all, or one each'),
                ('num_heads', all(0 <= h <= DEPTH for h in self.num_heads),
                 f"must be 0 (the file's record or family) or more, at most {DEPTH}")]


@dataclass
class EnsembleConfig(ModelsConfig):
    data: str = option('', "its test split: cifar10 | cifar100 | fashion-mnist | imagenet | "
                       "folder | fake; '' = the data set the models' checkpoints record",
                       choices=('', *INFO))
    data_dir: str = option('', "'' = the models' record when --data is theirs, else ./data")
    val_size: int = option(0, 'evaluate on this many held-out training images instead '
                              "(as the scripts' flag)",
                           at_least(0, 'the test split', STEPS))
    weights: list[float] = option(factory=list, help='one weight per model; none = equal weights')
    out: str = option('', 'also write the results here as JSON '
                          '(not over another file: --overwrite)')
    overwrite: bool = option(False, '--out may replace a file that is not an earlier result of '
                                    'this script')
    teacher: str = option('', "copy students: their teacher's file moved here "
                              '(the same SHA-256) ...')
    new_teacher: bool = option(False, '... or, with this, another teacher on purpose')
    fake_size: int = option(2048, '--data fake: train split size '
                                  '(the test split is 1/8 of it, at least 64)',
                            at_least(1, most=STEPS))

    def checks(self):
        # bytes to list its images (util/config.py)
        test_split = max(self.fake_size // 8, 64) * SAMPLER_BYTES
        return [('models', bool(self.models), 'is required: one or more checkpoints, e.g. --models '
                 'runs/a/checkpoint.pt runs/b/checkpoint.pt'),
                *super().checks(),
                ('fake_size', self.data != 'fake' or test_split <= machine_memory(),
                 f'makes a test split whose images take {test_split / 1e9:,.0f} GB to list, '
                 f'more than the {machine_memory() / 1e9:,.0f} GB here: choose fewer')]


# Fashion-MNIST and CIFAR are held in memory and batched without loader workers: no preset
PRESETS = {'fake': dict(num_workers=0),
           'imagenet': dict(num_workers=10)}


# -----------------------------------------------------------------------------
# Ensemble maths


def normalise_weights(weights, n):
    """n weights that sum to 1; None or [] = equal.
    Negative, all-zero or a wrong count are errors."""
    weights = weights or [1] * n
    if len(weights) != n:
        raise ConfigError(f'--weights: {len(weights)} weights for {n} models')
    if not all(0 <= w < math.inf for w in weights) or max(weights) <= 0:
        raise ConfigError(f'--weights {show(weights)}: must be non-negative and not all zero')
    weights = [w / max(weights) for w in weights]     # first: a sum of large weights could overflow
    return [w / sum(weights) for w in weights]


def ensemble_probs(logits, weights=None):
    """The weighted mean of the models' softmax probabilities:
    [(N, C) logits] -> (N, C); weights: normalised here."""
    return sum(w * l.float().softmax(-1)
               for w, l in zip(normalise_weights(weights, len(logits)), logits))   # (N, C)


def accuracy(scores, labels, k=1):
    """Top-k accuracy (%) of scores (N, C) (logits or probabilities) against labels (N,)."""
    top = scores.topk(min(k, scores.shape[-1])).indices                        # (N, k)
    return 100 * (top == labels[:, None]).any(-1).float().mean().item()


def disagreement(preds_a, preds_b):   # the share of images whose top-1 predictions (N,) differ
    return (preds_a != preds_b).float().mean().item()


def summarise(names, weights, logits, labels):
    """Each model's and the ensemble's top-1 / top-5, and every pair's disagreement, as a dict."""
    def scores(s):   # logits or probabilities (N, C)
        return {'top1': accuracy(s, labels, 1), 'top5': accuracy(s, labels, 5)}
    weights = normalise_weights(weights, len(logits))
    preds = (l.argmax(-1) for l in logits)                                    # (N,) each
    return {
        'images': len(labels),
        'models': [{'model': n, 'weight': w, **scores(l)}
                   for n, w, l in zip(names, weights, logits)],
        'ensemble': scores(ensemble_probs(logits, weights)),
        'disagreement': [{'a': a, 'b': b, 'rate': disagreement(pa, pb)}
                         for (a, pa), (b, pb) in combinations(zip(names, preds), 2)],
    }


def format_table(r):
    lines = ['| model | weight | top-1 | top-5 |', '|---|---:|---:|---:|']
    lines += [f"| {m['model']} | {m['weight']:.3f} | {m['top1']:.2f} | {m['top5']:.2f} |"
              for m in r['models']]
    lines += [f"| ensemble (mean of probabilities) | | {r['ensemble']['top1']:.2f} | "
              f"{r['ensemble']['top5']:.2f} |"]
    if r['disagreement']:
        lines += ['', f"| disagreement: top-1 differs ({r['images']} images) | rate |",
                  '|---|---:|']
        lines += [f"| {d['a']} vs {d['b']} | {100 * d['rate']:.2f}% |" for d in r['disagreement']]
    return '\n'.join(lines)

# -----------------------------------------------------------------------------
# Models and predictions


def load_model(source, teacher=None, new_teacher=False, num_heads=0):
    """(classifier in eval mode, its arch, what its checkpoint records of it: {'data', 'data_dir', 'classes' (None
    if not recorded), 'num_classes'}). A copy student comes wrapped with its teacher (recorded, or `teacher` with the
    same SHA-256 unless new_teacher). num_heads: stated for a file of weights alone."""
    ckpt = read_checkpoint(source)
    try:
        if isinstance(ckpt, dict) and 'teacher' in ckpt and 'model' in ckpt:   # a copy student
            model = load_copy_model(source, teacher, new_teacher)
        else:
            model = build_from_checkpoint(source, ckpt, num_heads)
    except CheckpointError as e:
        # some say what is wrong but not with which file: with several, say it
        if source in str(e):
            raise e from None
        raise CheckpointError(f'{source}: {e}') from None
    arch = getattr(model, 'student', model).arch   # a copy student's own
    if not arch['num_classes']:
        raise ConfigError(f'{source} has no classifier (an MAE encoder?): fine-tune it first')
    # ckpt is a dict: the loads refuse others
    config = ckpt['config'] if isinstance(ckpt.get('config'), dict) else {}
    classes = ckpt['classes'] if isinstance(ckpt.get('classes'), list) else None
    return model.eval(), arch, {'data': config.get('data'), 'data_dir': config.get('data_dir'),
                                'classes': classes, 'num_classes': arch['num_classes']}


def load_models(sources, teacher=None, new_teacher=False, num_heads=(), img_size=0):
    """The classifiers, what each records (load_model's), and the one image size they
    share (one test set; img_size: the one asked for, 0 = theirs). num_heads: one head
    count for all, or one per source."""
    heads = cycle(num_heads or [0])   # one count for all, or one each (ModelsConfig.checks)
    models = []
    records = []
    sizes = {}
    for s, h in zip(sources, heads):
        model, arch, record = load_model(s, teacher, new_teacher, h)
        models.append(model)
        records.append(record)
        sizes[s] = arch['img_size']
    if len(set(sizes.values())) > 1:
        said = ', '.join(f'{s} {v}' for s, v in sizes.items())
        raise ConfigError(f'the models take different image sizes: {said}')
    size = sizes[sources[0]]
    if img_size and img_size != size:
        raise ConfigError(f'--img-size {img_size}: the models take {size}')
    return models, records, size


def with_data(cfg, records):
    """cfg with the data set (and folder) the models record where --data is not given
    (its preset applied, as if given), saying so; another --data is said too (its
    classes are checked by name)."""
    recorded = [r for r in records if r['data']]
    if not cfg.data:   # one data set for all, else refused: --data says which
        if len({r['data'] for r in recorded}) != 1:
            said = ', '.join(f"{s}: {r['data'] or 'no record'}"
                             for s, r in zip(cfg.models, records))
            raise ConfigError(f'--data: the models do not record one data set ({said}): '
                              f'name the one to score them on')
        dirs = {r['data_dir'] for r in recorded}
        argv = [*sys.argv[1:], '--data', recorded[0]['data']]
        # their one folder, unless one is given
        if len(dirs) == 1 and all(dirs) and not cfg.data_dir:
            argv += ['--data-dir', *dirs]
        cfg = parse_config(type(cfg), PRESETS, argv)
        say(f"--data {cfg.data} --data-dir {cfg.data_dir}: as the models' checkpoints record")
    elif {r['data'] for r in records} - {cfg.data, None}:
        recorded_data = sorted({r['data'] or '-' for r in records})
        say(f"note: --data {cfg.data}, where the models record {', '.join(recorded_data)} "
            f"(their classes are compared by name)")
    cfg.data_dir = cfg.data_dir or './data'
    return cfg


def check_classes(sources, records, classes, data):
    """Refuse models trained on other classes than the data has: by name where they
    record them, else by number."""
    for s, r in zip(sources, records):
        other = class_mismatch(r['classes'], classes)
        if not other and r['num_classes'] != len(classes):
            other = f"{r['num_classes']} classes where the data has {len(classes)}"
        if other:
            raise ConfigError(f'{s} predicts {other} (--data {data}): '
                              f'score it on the data set it was trained on')


def on_device(models, cfg, dataset):
    """(the models on the GPU if there is one, their attention as --attn-implementation says once the start-up check
    has run each one's first layer forward on dataset's first images; a `place` for predict_all; the attention, why)."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    attn, why = attn_implementation(cfg.attn_implementation, device)
    place = SimpleNamespace(device=device, dtype=amp_dtype(cfg.amp, device))
    models = [m.to(device) for m in models]
    x = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])
    # the ViT running its own attention first (a copy's teacher)
    vits = [getattr(m, 'teacher', m) for m in models]
    layers = {f'model {i} layer 0': v.blocks[0].attn for i, v in enumerate(vits, 1)}
    checked, _ = start_up_check(SimpleNamespace(**vars(place), attn=attn, cfg=cfg, log=say),
                                'evaluation', models,
                                lambda: [v.forward_tokens(x.to(device), depth=1) for v in vits],
                                layers, backward=False)
    return models, place, f'{attn} ({why})' if checked == attn else 'eager (the start-up check)'


def held_where(dataset, device):
    """A data set held in memory, on a GPU where its images take at most half its free memory (data.data_device,
    as a training run's), else on the host, as it was; any other, as it is."""
    held = unwrap(dataset)
    if device.type != 'cuda' or not isinstance(held, TensorImages):
        return dataset
    need = held.images.nbytes + held.labels.nbytes
    where = data_device(device, need, torch.cuda.mem_get_info(device)[0], say)
    return held_on(where, set=dataset)['set']


@torch.no_grad()
def predict_all(models, loader, place):
    """Every model's logits on every image, [(N, C)] in float on the CPU, and the labels (N,) there too: gathered on
    the device (the loader's labels are where its set is held) and copied to the host once, at the end."""
    logits = [[] for _ in models]   # each model's (B, C) logits, batch after batch
    labels = []
    for x, y in loader:
        x = x.to(place.device, non_blocking=True)
        with autocast(place):
            for batches, m in zip(logits, models):
                batches.append(m(x).float())
        labels.append(y.to(place.device, non_blocking=True))    # (B,)
    return [torch.cat(batches).cpu() for batches in logits], torch.cat(labels).cpu()

# -----------------------------------------------------------------------------
# Main


def is_result(path):
    try:   # an earlier result of this script: a JSON object with its keys
        with open(path, 'rb') as f:
            if f.read(1) != b'{':
                return False
            return {'config', 'models', 'ensemble'} <= set(json.loads(b'{' + f.read()))
    except (OSError, ValueError):   # unreadable, or not JSON (a checkpoint is a zip file)
        return False


def check_out(cfg):
    """Refuse an --out that is a directory (or a pipe, a device: opened, a pipe would block for ever), a model, or
    another file (a checkpoint!) unless --overwrite."""
    out = cfg.out
    read = {os.path.realpath(m) for m in [*cfg.models, cfg.teacher] if m}
    if os.path.exists(out) and not os.path.isfile(out):
        kind = 'a directory' if os.path.isdir(out) else 'not a regular file (a pipe or a device)'
        raise ConfigError(f'--out {out} is {kind}: name a file')
    if os.path.realpath(out) in read:
        raise ConfigError(f'--out {out} is a file this command reads (--models, --teacher): '
                          f'name another file')
    if os.path.exists(out) and not (cfg.overwrite or is_result(out)):
        raise ConfigError(f'--out {out} exists and is not an earlier result of ensemble.py: '
                          f'choose another file, or pass --overwrite true')


def main():
    cfg = parse_config(EnsembleConfig, PRESETS)
    if cfg.out:
        check_out(cfg)
    weights = normalise_weights(cfg.weights, len(cfg.models))   # refused before any model is read
    # a new --out: another command given it is refused
    with claimed('--out', cfg.out, replaces=True) as out:
        cfg, results = score(cfg, weights)
        if cfg.out:
            record = json.dumps({'config': asdict(cfg), **results}, indent=2)
            out.write(cfg.out, lambda f: f.write(record.encode()))


def score(cfg, weights):
    """(cfg with the data set the models were scored on, the results), printed as a table."""
    models, records, img_size = load_models(cfg.models, cfg.teacher, cfg.new_teacher, cfg.num_heads,
                                            cfg.img_size)
    cfg = with_data(cfg, records)
    cfg.img_size = img_size
    test_set, num_classes = build_eval_set(cfg)
    check_classes(cfg.models, records, class_names(test_set, num_classes), cfg.data)
    models, place, attn = on_device(models, cfg, test_set)
    loader = build_loader(cfg, held_where(test_set, place.device), False, device=place.device)
    logits, labels = predict_all(models, loader, place)
    results = summarise(cfg.models, weights, logits, labels)
    split = f'{cfg.val_size} held-out training images' if cfg.val_size else 'test split'
    say(f'{cfg.data} {split}, {len(labels)} images at {cfg.img_size}x{cfg.img_size} '
        f'{data_source(test_set)}, on {place.device}, attention {attn}\n')
    say(format_table(results))
    return cfg, results


if __name__ == '__main__':
    run_main(main)
