"""
Evaluate models on a dataset's test split, alone and as an ensemble (the mean of their
softmax probabilities, weighted), and how often two disagree (the share of test images
whose top-1 differs). In the paper a fine-tuned model and a distilled student reach 86.3
top-1 together on ImageNet, 85.7 each alone: their mistakes differ.

    python ensemble.py --data fashion-mnist --models runs/finetune/checkpoint.pt runs/distill/checkpoint.pt
    python ensemble.py --data fashion-mnist --models a.pt b.pt --weights 2 1 --out runs/ensemble.json

A model is a file or a name util/checkpoints.py knows, or a copy student, loaded with the
teacher its checkpoint records by SHA-256 (`--teacher moved.pt` if it moved, `--new-teacher
true` for another on purpose): load_models, here, with evaluate.py. `--out`
writes over nothing but an earlier result of this script (or with `--overwrite true`). One
process, on a GPU if there is one.
"""
import json
import math
import signal
import sys
from dataclasses import asdict, dataclass
from itertools import combinations, cycle

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

from attention_copy import load_copy_model
from data import build_eval_set, class_names, data_source, held_where
from util.checkpoints import CheckpointError, build_from_checkpoint, read_hashed
from util.config import DATA, STEPS, ConfigError, ModelsConfig, at_least, option, show
from util.datafiles import build_loader
from util.engine import accuracy, predict_all
from util.errors import say
from util.launch import on_device, parse_config, run_main
from util.run import class_mismatch
from util.files import check_outputs

# -----------------------------------------------------------------------------
# Config


@dataclass
class EnsembleConfig(ModelsConfig):
    data: str = option('', "its test split: cifar10 | cifar100 | fashion-mnist | imagenet | "
                       "folder | fake; '' = the data set the models' checkpoints record",
                       choices=('', *DATA))
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
        return [('models', bool(self.models), 'is required: one or more checkpoints, e.g. --models '
                 'runs/a/checkpoint.pt runs/b/checkpoint.pt'),
                *super().checks()]


# Fashion-MNIST and CIFAR are held in memory and batched without loader workers: no preset
PRESETS = {'fake': dict(num_workers=0),
           'imagenet': dict(num_workers=10)}


# -----------------------------------------------------------------------------
# Ensemble maths


def ensemble_probs(logits, weights=None):
    """The weighted mean of the models' softmax probabilities: [(N, C) logits] -> (N, C); weights: summing to 1
    (normalise_weights), None = equal."""
    weights = weights or [1 / len(logits)] * len(logits)
    return sum(w * l.float().softmax(-1) for w, l in zip(weights, logits))   # (N, C)


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


def disagreement(preds_a, preds_b):   # the share of images whose top-1 predictions (N,) differ
    return (preds_a != preds_b).float().mean().item()


def summarise(names, weights, logits, labels):
    """Each model's and the ensemble's top-1 / top-5, and every pair's disagreement, as a dict; weights: as
    normalise_weights gives them."""
    def scores(s):   # logits or probabilities (N, C)
        return {'top1': accuracy(s, labels, 1), 'top5': accuracy(s, labels, 5)}
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
# The models: trained classifiers read from their checkpoints (evaluate.py's too)


def load_models(sources, teacher=None, new_teacher=False, num_heads=(), img_size=0):
    """Trained classifiers in eval mode, a copy student with its teacher; what each checkpoint records ({'data',
    'data_dir', 'classes' (None: not recorded), 'num_classes'}) and the SHA-256 of the bytes it was loaded from
    ('sha256': None for a name); the image size they share (img_size: 0 = theirs)."""
    models, records, sizes = [], [], {}
    for source, heads in zip(sources, cycle(num_heads or [0])):   # one for all, or one each
        ckpt, digest = read_hashed(source)
        copy_student = isinstance(ckpt, dict) and 'teacher' in ckpt and 'model' in ckpt
        try:
            model = (load_copy_model(source, teacher, new_teacher, ckpt) if copy_student
                     else build_from_checkpoint(source, ckpt, heads))
        except CheckpointError as e:   # with several files, say which, where it does not
            if source in str(e):
                raise e from None
            raise CheckpointError(f'{source}: {e}') from None
        arch = getattr(model, 'student', model).arch   # a copy student's own
        if not arch['num_classes']:
            raise ConfigError(f'{source} has no classifier (an MAE encoder?): fine-tune it first')
        config = ckpt['config'] if isinstance(ckpt.get('config'), dict) else {}   # ckpt: a dict
        classes = ckpt['classes'] if isinstance(ckpt.get('classes'), list) else None
        models.append(model.eval())
        records.append({'data': config.get('data'), 'data_dir': config.get('data_dir'),
                        'classes': classes, 'num_classes': arch['num_classes'], 'sha256': digest})
        sizes[source] = arch['img_size']
    size = sizes[sources[0]]
    if len(set(sizes.values())) > 1:
        said = ', '.join(f'{s} {v}' for s, v in sizes.items())
        raise ConfigError(f'the models take different image sizes: {said}')
    if img_size and img_size != size:
        raise ConfigError(f'--img-size {img_size}: the models take {size}')
    return models, records, size

def check_classes(sources, records, classes, data):
    """Refuse trained models (sources, what their checkpoints record: load_models) that tell other classes apart
    than the data set's they are scored on: by name where they record them, else by number."""
    for s, r in zip(sources, records):
        other = class_mismatch(r['classes'], classes)
        if not other and r['num_classes'] != len(classes):
            other = f"{r['num_classes']} classes where the data has {len(classes)}"
        if other:
            raise ConfigError(f'{s} predicts {other} (--data {data}): '
                              f'score it on the data set it was trained on')

# -----------------------------------------------------------------------------
# The data set the models record


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


def main():
    cfg = parse_config(EnsembleConfig, PRESETS)
    # refused before any model is read: a file there that is not an earlier result (unless --overwrite), a model
    # it reads; the same rule holds when the result is written
    write = check_outputs('--out', cfg.out, reads=[*cfg.models, cfg.teacher],
                          may_replace=lambda path: cfg.overwrite or is_result(path),
                          own='an earlier result of ensemble.py', overwrite='--overwrite')
    weights = normalise_weights(cfg.weights, len(cfg.models))
    cfg, results = score(cfg, weights)
    if cfg.out:
        record = json.dumps({'config': asdict(cfg), **results}, indent=2)
        write(cfg.out, lambda f: f.write(record.encode()))


def score(cfg, weights):
    """(cfg with the data set the models were scored on, the results), printed as a table."""
    models, records, img_size = load_models(cfg.models, cfg.teacher, cfg.new_teacher, cfg.num_heads,
                                            cfg.img_size)
    cfg = with_data(cfg, records)
    cfg.img_size = img_size
    test_set, num_classes = build_eval_set(cfg)
    check_classes(cfg.models, records, class_names(test_set, num_classes), cfg.data)
    models, place, attn = on_device(models, cfg, test_set)
    held = held_where(place.device, say, set=test_set)['set']
    loader = build_loader(cfg, held, False, device=place.device)
    logits, labels = predict_all(models, loader, place)
    results = summarise(cfg.models, weights, logits, labels)
    results['sha256'] = {m: r['sha256'] for m, r in zip(cfg.models, records)}   # what was scored
    split = f'{cfg.val_size} held-out training images' if cfg.val_size else 'test split'
    say(f'{cfg.data} {split}, {len(labels)} images at {cfg.img_size}x{cfg.img_size} '
        f'{data_source(test_set)}, on {place.device}, attention {attn}\n')
    say(format_table(results))
    return cfg, results


if __name__ == '__main__':
    run_main(main)
