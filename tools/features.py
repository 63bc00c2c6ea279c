"""
Does a student learn features of its own? Trained models compared block by block with their teacher and
with each other, in one pass over a fixed set of test images (the paper's second claim, Li et al. 2024: the
student, learning with its own weights, ends with features unlike the teacher's, which is why its ensemble with the
fine-tuned model helps; the ensemble's gain only suggests it, these numbers measure it).

    python -m tools.features --teacher teachers/fashion-mnist-mae.pt --batch-size 200 --out-dir runs/features \
        --models results/fashion-mnist/features/models/{scratch,finetune,copy,distill}-{0,1,2}.pt
    python -m tools.features --data imagenet --data-dir /datasets/imagenet --device cuda --images 10000 \
        --teacher mae_vit_large --models ... --out-dir runs/features-imagenet

What it measures, each a function usable on its own (the notebook imports them):
- feature similarity: linear CKA (Kornblith et al., ICML 2019) of the token features at the output of every
  block (the residual stream before the final norm), every token of every image a sample, and again the
  class token alone; each model against the teacher and against each other, block i against block i
  (`linear_cka`, `CKAStats`);
- map agreement: each head's attention cross-entropy to the teacher's map (the distillation loss,
  attention_distill.attention_cross_entropy) and the KL, CE minus the teacher's entropy (`map_agreement`);
- attention distance: each head's mean distance in pixels from a query patch to the patches it attends to
  (Dosovitskiy et al. 2021, Fig. 7; `attention_distance`);
- predictions: for every pair of classifiers, how often their top-1 differs, whether their errors overlap, and
  what their ensemble gains;
- controls: models named <method>-<seed> are grouped; every two methods are compared over their pairs of models of
  different seeds, beside each method's seed-to-seed pairs, each number with a bootstrap interval over the test
  images (tools/features_controls.py).
A copy student has no queries or keys in its copied layers: there its maps ARE the teacher's (given, not
computed), recorded as such (`maps_given`) and shown hollow in the figure; its KL there is 0 by construction.
No gradients, no autocast: every statistic is computed in fp32 and accumulated in fp64.
Report (features.json, features.png, TABLES.md): tools/features_report.py.
"""
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from itertools import combinations, combinations_with_replacement
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Subset

from attention_copy import CopyModel
from data import INFO, build_eval_set, class_names
from ensemble import accuracy, check_classes, heads_checks, load_models, with_data
from teacher import layer_pairs
from tools.features_controls import controls, method_seed
from tools.features_maps import attention_distance, blocks, map_agreement, runner
from tools.features_report import summary, write
from util.checkpoints import build_from_checkpoint, read_checkpoint, teacher_mismatch
from util.config import BATCH, DEPTH, STEPS, WORKERS, ConfigError, at_least, option
from util.files import check_out_dir, cpu_name, git_commit, read_json
from util.launch import parse_config, run_main

# -----------------------------------------------------------------------------
# Linear CKA: the definition, then the same number from statistics accumulated batch by batch


def linear_cka(x, y):
    """Linear CKA of two feature matrices over the same n samples, x (n, d1), y (n, d2) -> float in [0, 1]:
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc, Yc centred over the samples (Kornblith et al. 2019,
    eq. for linear HSIC). 1 for features that differ by a rotation, a scale or a shift; near 0 for unrelated."""
    x, y = (t.double() - t.double().mean(0) for t in (x, y))                  # (n, d1), (n, d2)
    return ((y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())).item()


class CKAStats:
    """Exact linear CKA between named feature streams seen in batches, in O(d^2) memory whatever n.

    The numerator and denominators above need only each stream's feature sum and the cross sums
    sum_i x_i y_i^T over samples: centring at the end, Xc^T Yc = X^T Y - (sum x)(sum y)^T / n. So each
    update adds X_a^T X_b (d_a, d_b) for every pair of streams, in float64, and `cka` gives exactly what
    linear_cka gives on all the samples at once (tested). Chosen over minibatch CKA (Nguyen et al. 2021:
    unbiased HSIC averaged over batches) because that is another estimator whose value moves with the batch
    size; this one is the definition, and a ViT-L's 1024 x 1024 sums in float64 are 8 MB a pair and block.
    Each stream is shifted by its first batch's mean before summing (CKA is blind to shifts): residual
    streams can carry large means, and X^T Y - n m_x m_y^T of unshifted sums would cancel away digits.
    keep: each batch's own sums too (fp32), for features_controls.resampled."""

    def __init__(self, keep=False):
        # total: {stream: its feature sum (d,), (a, b): the cross sum (d_a, d_b), one order kept}
        self.n, self.shift, self.total = 0, {}, {}
        self.batches = [] if keep else None

    def update(self, feats):
        """feats: {name: (n, d) features}, the same n samples in every stream, in the same order."""
        self.shift = self.shift or {k: v.double().mean(0) for k, v in feats.items()}
        assert feats.keys() == self.shift.keys() and len({len(v) for v in feats.values()}) == 1
        feats = {k: v.double() - self.shift[k] for k, v in feats.items()}      # (n, d) each
        new = {k: v.sum(0) for k, v in feats.items()}
        new |= {(a, b): feats[a].T @ feats[b] for a, b in combinations_with_replacement(feats, 2)}
        for k, v in new.items():
            self.total[k] = self.total.get(k, 0) + v
        n = len(next(iter(feats.values())))
        self.n += n
        if self.batches is not None:
            self.batches.append((n, {k: v.float() for k, v in new.items()}))

    def centred(self, a, b):
        """Xc_a^T Xc_b (d_a, d_b): the cross sum of the centred features."""
        s = self.total[a, b] if (a, b) in self.total else self.total[b, a].T
        return s - torch.outer(self.total[a], self.total[b]) / self.n

    def cka(self, a, b):
        ab, aa, bb = self.centred(a, b), self.centred(a, a), self.centred(b, b)
        return (ab.square().sum() / (aa.norm() * bb.norm())).item()

# -----------------------------------------------------------------------------
# Every model in one pass


MAPS = ('attention_distance', 'cross_entropy', 'kl')   # per block and head, mean over images: analyse's sums


@torch.no_grad()
def analyse(models, loader, device, teacher='teacher', resamples=0, seed=0):
    """Everything above in one pass over `loader`. models: {name: VisionTransformer or CopyModel in eval mode,
    on `device`}, all of one depth and token grid, `teacher` among them (a model without a classifier gives
    features and maps only); names like distill-1 are seed 1 of method distill (`method_seed`). resamples: of
    the bootstrap over images (`controls`), 0 for none. Returns a dict of plain numbers (features.json's 'result')."""
    runs = {k: runner(m) for k, m in models.items()}
    vits = {k: v for k, (v, _) in runs.items()}
    vit = vits[teacher]   # every model has its blocks and tokens
    depth, patch, first = vit.depth, vit.patch_embed.patch_size, 1 + vit.arch['reg_tokens']
    tokens, class_token = [CKAStats(keep=resamples > 0) for _ in range(depth)], [CKAStats() for _ in range(depth)]
    sums, logits, labels = defaultdict(float), defaultdict(list), []   # sums: per-head values x images
    for x, y in loader:
        x = x.to(device)
        for i, outs in enumerate(zip(*(blocks(v, x, given(x)) for v, given in runs.values()))):
            outs = dict(zip(runs, outs))                                    # {name: (tokens, logits)} of block i
            tokens[i].update({k: t.flatten(0, 1) for k, (t, _) in outs.items()})     # (B * N, D) each
            class_token[i].update({k: t[:, 0] for k, (t, _) in outs.items()})        # (B, D) each
            for k, (_, l) in outs.items():
                distance = attention_distance(l.softmax(-1), patch, first)
                for what, v in zip(MAPS, (distance, *map_agreement(outs[teacher][1], l))):
                    sums[what, k, i] += len(y) * v.double().cpu()
        for k, v in vits.items():   # the last block's tokens are still held: the head reads them
            if v.num_classes:
                logits[k].append(v.forward_head(outs[k][0]).float().cpu())  # (B, C)
        labels.append(y)
    labels, logits = torch.cat(labels), {k: torch.cat(v) for k, v in logits.items()}
    # a map spread evenly over every token: the distance of a head that looks everywhere alike
    n = first + vit.patch_embed.grid ** 2
    r = {
        'images': len(labels), 'depth': depth, 'teacher': teacher, 'grid': vit.patch_embed.grid,
        'uniform_distance': attention_distance(torch.full((1, 1, n, n), 1 / n), patch, first).item(),
        'models': {k: {'method': method_seed(k)[0], 'seed': method_seed(k)[1], 'heads': vits[k].num_heads,
                       'global_pool': vits[k].global_pool, **given_maps(models[k]),
                       'top1': accuracy(logits[k], labels) if k in logits else None} for k in models},
        'cka': [{'a': a, 'b': b, 'tokens': [s.cka(a, b) for s in tokens],
                 'class_token': [s.cka(a, b) for s in class_token]} for a, b in combinations(models, 2)],
        **{what: {k: [(sums[what, k, i] / len(labels)).tolist() for i in range(depth)] for k in models}
           for what in MAPS}}
    return {**r, **controls(r, tokens, logits, labels, resamples, seed)}


def given_maps(model):
    """Which of a model's layers run on its teacher's maps rather than their own (a copy student's copied ones),
    and which were distilled toward them (`maps_distilled`, set by load from the checkpoint's record)."""
    copy = isinstance(model, CopyModel)
    return {'transfer': model.transfer if copy else None,
            'maps_given': sorted(layer_pairs(model.layers)) if copy and model.transfer == 'attn' else [],
            'heads_given': model.heads if copy else None, 'maps_distilled': getattr(model, 'maps_distilled', [])}


def distilled_layers(source, teacher):
    """The layers a distilled student's checkpoint records as distilled toward its teacher's maps; [] for others.
    Its teacher must be `teacher` (SHA-256, as for a copy student): else the report would measure it against maps
    it never saw, and say that it did not take them."""
    ckpt = read_checkpoint(source)
    rec = ckpt.get('distilled_from') if isinstance(ckpt, dict) else None
    if not isinstance(rec, dict):
        return []
    other = teacher_mismatch(teacher, rec)
    if other:
        raise ConfigError(f'{source} is a distilled student: {other}; give its own teacher with --teacher')
    return sorted(layer_pairs(rec.get('layer_map', rec.get('layers', [])))) if rec.get('transfer') == 'attn' else []

# -----------------------------------------------------------------------------
# Config and main


@dataclass
class FeaturesConfig:
    teacher: str = option('', 'the teacher: a checkpoint file or name (an MAE encoder: features and maps only)')
    models: list[str] = option(factory=list, help='classifiers: checkpoint files or names (a copy student runs with '
                               '--teacher, which must be its own: SHA-256 checked)')
    names: list[str] = option(factory=list, help="one label per model; none = each file's name (or its folder's)")
    num_heads: list[int] = option(factory=list, help="of files of weights alone, as ensemble.py's flag")
    teacher_num_heads: int = option(0, "the teacher's, if its file holds weights alone",
                                    at_least(0, "the file's record or family", DEPTH))
    data: str = option('', "its test split: cifar10 | cifar100 | fashion-mnist | imagenet | folder | fake; '' = the "
                       "data set the models' checkpoints record",
                       (lambda v: v in INFO or v == '', f"choose one of {', '.join(INFO)}, or '' (the models')"))
    data_dir: str = option('', "'' = the models' record when --data is theirs, else ./data")
    images: int = option(0, 'the first this many test images; 0 = all', at_least(0, 'all', STEPS))
    batch_size: int = option(250, "also the bootstrap's unit for CKA (its statistics are kept batch by batch)",
                             at_least(1, most=BATCH))
    resamples: int = option(1000, "of the bootstrap over the test images: each number's interval; 0 = none",
                            at_least(0, 'no bootstrap', 10 ** 6))
    bootstrap_seed: int = option(0, rule=(lambda v: 0 <= v < 2 ** 63, 'must be in [0, 2**63)'))
    num_workers: int = option(0, rule=at_least(0, 'load in the main process', WORKERS))
    device: str = option('auto', 'auto (cuda if there is one) | cpu | cuda | cuda:1 ...',
                         (lambda v: v == 'auto' or known_device(v), 'use auto, cpu, cuda or cuda:N'))
    fake_size: int = option(2048, '--data fake: train split size (the test split is 1/8 of it, at least 64)',
                            at_least(1, most=STEPS))
    out_dir: str = option('', 'features.json, features.png, TABLES.md here; empty = print the tables only')

    def checks(self):
        return [('teacher', self.teacher != '', 'is required: the teacher the students were given maps of, e.g. '
                                                'teachers/fashion-mnist-mae.pt'),
                ('models', len(self.models) > 0, 'is required: one or more classifiers, e.g. --models '
                                                 'runs/scratch/checkpoint.pt runs/distill/checkpoint.pt'),
                ('names', len(self.names) in (0, len(self.models)), f'needs one name per model ({len(self.models)})'),
                ('names', len(set(self.labels())) == len(self.models) and 'teacher' not in self.labels(),
                 "must be distinct and not 'teacher' (give --names when files share a name)"),
                *heads_checks(self)]

    def labels(self):
        """The models' names: --names, else each file's name without .pt (its folder's for checkpoint.pt)."""
        stem = lambda p: os.path.splitext(os.path.basename(p))[0]
        return self.names or [stem(os.path.dirname(os.path.abspath(p))) if stem(p) == 'checkpoint' else stem(p)
                              for p in self.models]


def known_device(name):
    try:
        return torch.device(name).type in ('cpu', 'cuda')
    except RuntimeError:
        return False


PRESETS = {'imagenet': dict(batch_size=64, num_workers=10), 'folder': dict(batch_size=64, num_workers=10)}


def load(cfg, device):
    """cfg with its data set (ensemble.with_data); {name: model} (the teacher first, named 'teacher'), on
    `device`, in eval mode, all checked to share the depth and token grid that block-by-block comparison needs;
    the test images' loader."""
    models, records, size = load_models(cfg.models, cfg.teacher, num_heads=cfg.num_heads)
    for model, source in zip(models, cfg.models):
        model.maps_distilled = distilled_layers(source, cfg.teacher)
    teacher = build_from_checkpoint(cfg.teacher, None, cfg.teacher_num_heads, '--teacher-num-heads', img_size=size,
                                    num_classes=0, drop_path_rate=0.0).eval()
    models = {'teacher': teacher, **dict(zip(cfg.labels(), models))}
    vits = {k: runner(m)[0] for k, m in models.items()}
    shapes = {k: (v.depth, v.arch['patch_size'], v.arch['reg_tokens']) for k, v in vits.items()}
    if len(set(shapes.values())) > 1:
        raise ConfigError('the models are compared block by block on the same tokens: they need one depth, patch '
                          'size and register count (depth, patch, registers): ' +
                          ', '.join(f'{k} {v}' for k, v in shapes.items()))
    heads = teacher.num_heads   # maps are compared at each model's heads
    odd = [f'{k} {v.num_heads}' for k, v in vits.items() if heads % v.num_heads]
    if odd:
        raise ConfigError(f"the teacher's maps are compared with each model's grouped to its heads (teacher."
                          f"to_student_heads): the teacher's {heads} heads are no multiple of {', '.join(odd)} heads; "
                          f"compare models with {heads} heads or a divisor of it")
    cfg = with_data(cfg, records, PRESETS)   # the data set the models were trained on, unless --data is given
    test_set, num_classes = build_eval_set(SimpleNamespace(data=cfg.data, data_dir=cfg.data_dir,
                                                           val_size=0, img_size=size, fake_size=cfg.fake_size))
    check_classes(cfg.models, records, class_names(test_set, num_classes), cfg.data)
    if cfg.images > len(test_set):
        raise ConfigError(f'--images {cfg.images}: the test split has {len(test_set)}')
    images = Subset(test_set, range(cfg.images or len(test_set)))   # the first ones: the same set every run
    loader = DataLoader(images, cfg.batch_size, num_workers=cfg.num_workers)
    return cfg, {k: m.to(device) for k, m in models.items()}, loader


def main():
    cfg = parse_config(FeaturesConfig, PRESETS)
    if cfg.out_dir:   # only its own results are replaced: a TABLES.md or features.png without features.json is not
        check_out_dir(cfg.out_dir, '--out-dir', 'features.json', ('features.png', 'TABLES.md'))
        record = os.path.join(cfg.out_dir, 'features.json')
        if os.path.exists(record):
            read_json(record, 'choose another --out-dir, or remove it if it is yours', {'result': dict})
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if cfg.device == 'auto' else cfg.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device {cfg.device}: no CUDA device here; use --device cpu')
    cfg, models, loader = load(cfg, device)
    start = time.time()
    result = analyse(models, loader, device, resamples=cfg.resamples, seed=cfg.bootstrap_seed)
    machine = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'{cpu_name()}, {torch.get_num_threads()} thread(s)'
    prov = {'command': shlex.join(['python', '-m', 'tools.features', *sys.argv[1:]]),
            'git_commit': git_commit(), 'machine': machine, 'device': str(device), 'torch': torch.__version__,
            'python': platform.python_version(), 'wall_s': time.time() - start}
    print(summary(result))
    if cfg.out_dir:
        write(cfg.out_dir, result, {'config': asdict(cfg), **prov})


if __name__ == '__main__':
    run_main(main)
