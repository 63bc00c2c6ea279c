"""Your runs' curves in the course's colours: test top-1, the losses, distillation's attention loss and the lr, against
the training images seen, for any run directories a script of this repository wrote (a smoke test, the quick
command's stages, a long run on a cluster), several in one figure:

    python -m tools.curves runs/copy runs/distill                  # -> runs/curves.png, where you run it
    python -m tools.curves results/fashion-mnist/logs/*/seed0      # the committed logs, drawn into runs/curves.png
    python -m tools.curves runs/reproduce/fashion-mnist-quick/*/seed0 --out curves.png

Each run is coloured by its method, which its config.json records (the script it ran, and for finetune.py whether
it started from a teacher's weights): the palette of every figure here (tools/palette.py), distillation blue, copy
green, fine-tune orange, scratch grey, an MAE's pre-training brown; runs of one method differ in marker and line.
Top-1 and the test loss are read from each run's metrics.jsonl (one record an evaluation), the training losses and
the lr from the progress lines of its log.txt (one every --log-every steps); images seen are the step times the
images a step takes (config.json). The default output is runs/curves.png under the folder the command runs in
(git ignores runs/), never inside the run folders, which may be committed logs."""
import argparse
import os
import re
import types

import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D

from data import build_eval_set
from teacher import map_layers, parse_index
from tools.palette import PALETTE, SHORT
from tools.tutorial import images_a_step, mark_axes, metrics, seen
from util.checkpoints import build_from_checkpoint
from util.errors import CheckpointError, ConfigError, DamagedFile, DataError
from util.files import check_outputs, read_bytes, read_json
from util.launch import run_main

# a progress line of util/engine.py: 'epoch   0.21 step 100/1404 | ce 1.9627 attn 19.0639 | lr 1.41e-03 | ...'
# (mae_pretrain.py's loss is mse)
PROGRESS = re.compile(r'step (\d+)/\d+ \| ([^|]+) \| lr ([-\d.e+]+) \|')
# the method each training script is (finetune.py: fine-tune or scratch, by its --init)
SCRIPTS = {'attention_copy.py': 'copy', 'attention_distill.py': 'distill', 'mae_pretrain.py': 'teacher'}
NAMES = {**SHORT, 'teacher': 'MAE pre-training'}
# runs of one method: the k-th in this marker and this line
MARKERS = 'os^Dvp'
LINES = ['-', '--', ':', '-.']

# -----------------------------------------------------------------------------
# What a run left: its method, its progress lines


def config(run_dir):
    return read_json(os.path.join(run_dir, 'config.json'), 'name a run folder a training script wrote',
                     {'argv': list})


def method(run_dir):
    """The run's method, a key of tools.palette.PALETTE, from the script its config.json records."""
    cfg = config(run_dir)
    script = os.path.basename(cfg['argv'][0]) if cfg['argv'] else ''
    if script == 'finetune.py':
        return 'finetune' if cfg.get('init') else 'scratch'
    if script not in SCRIPTS:
        raise DamagedFile(f"{run_dir}/config.json: a run of {script or 'no script'}, not of a training script "
                          f"(finetune.py, {', '.join(SCRIPTS)}): name a training run's folder")
    return SCRIPTS[script]


def progress(run_dir):
    """{step: ({loss name: value}, lr)} from the run's log.txt: its losses as logged (ce, and attn for
    distillation; an MAE's mse); a resumed run's repeated steps keep the last."""
    text = read_bytes(os.path.join(run_dir, 'log.txt'), 'name a run folder that holds its log')
    out = {}
    for line in text.decode(errors='replace').splitlines():
        m = PROGRESS.search(line)
        if m:
            words = m[2].split()                                   # ['ce', '1.9627', 'attn', '19.0639']
            out[int(m[1])] = ({k: float(v) for k, v in zip(words[::2], words[1::2])}, float(m[3]))
    return out


def trained_on(cfg):
    """What a run's training loss is, in words: the label term it minimised and what makes it larger than the
    test loss (label smoothing, mixed or augmented images)."""
    if 'mask_ratio' in cfg:
        return 'mse of the masked patches'
    extras = []
    if cfg.get('smoothing'):
        extras.append(f"label smoothing {cfg['smoothing']:g}")
    if cfg.get('mixup') or cfg.get('cutmix'):
        extras.append('MixUp / CutMix')
    if cfg.get('randaug'):
        extras.append('RandAugment')
    if cfg.get('reprob'):
        extras.append('random erasing')
    return 'cross-entropy' + (f" with {', '.join(extras)}" if extras else '')


def attention_loss(cfg):
    """What a distillation run logs as attn, in words: two lines for a panel's title."""
    what = "H(teacher's map, student's)" if cfg.get('transfer', 'attn') == 'attn' else \
        f"mse of the teacher's and the student's {cfg['transfer']}"
    return (f"a layer, the mean over layers {cfg.get('layers')}\n({what}; trained on ce + {cfg.get('weight', 1):g} × "
            f"their sum)")


def distilled(cfg, teacher_depth):
    """{student layer: teacher layer} of a distillation run, as its resolve step made it (teacher.map_layers): the
    terms its logged attention loss sums."""
    layers = parse_index(cfg.get('layers', 'all'), teacher_depth, 'layers')
    student_depth = cfg.get('depth') or teacher_depth                               # None: the teacher's
    return map_layers(cfg.get('layer_map', 'auto'), layers, teacher_depth, student_depth, cfg.get('layers', 'all'))


def teacher_of(cfg):
    """The run's teacher, from the file its config names; None where that file is not on this machine."""
    try:
        return build_from_checkpoint(cfg['teacher'], img_size=cfg['img_size']).eval()
    except (OSError, CheckpointError, ConfigError, DataError):
        return None


def floor(cfg, teacher, pairs, images=256):
    """The attention loss's floor: H(teacher's map, student's) is least, the teacher's own entropy, where the two
    maps are equal. The teacher's row entropy, the mean over the distilled layers (pairs: {student: teacher layer}),
    their heads and rows, on the first `images` images of the run's evaluation split as the run saw them. None where
    there is none (a loss on q, k or v; averaged maps; a control's) or where the run's data is not on this machine."""
    if cfg.get('transfer', 'attn') != 'attn' or cfg.get('average_maps', 'none') != 'none' \
            or cfg.get('maps', 'teacher') != 'teacher':
        return None
    try:
        dataset, _ = build_eval_set(types.SimpleNamespace(**cfg))
    except (OSError, CheckpointError, ConfigError, DataError):
        return None
    x = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))]).float()   # (B, 3, H, W)
    heads = parse_index(cfg.get('heads', 'all'), teacher.num_heads, 'heads')
    with torch.no_grad():
        logits = teacher.attention(x, sorted(set(pairs.values())))                    # {layer: (B, H, N, N)}
    entropy = {}
    for i, l in logits.items():
        p = l[:, heads].double().log_softmax(-1)
        entropy[i] = -(p.exp() * p).sum(-1).mean().item()                           # over images, heads, rows
    return sum(entropy[t] for t in pairs.values()) / len(pairs)


# -----------------------------------------------------------------------------
# The figure


def shared_folder(run_dirs):
    """The folder the runs share: the one above a single run, else the runs' common path."""
    paths = [os.path.abspath(d) for d in run_dirs]
    return os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])


def label(run_dirs):
    """Each run's folder, relative to the folder the runs share: 'copy/seed0' for runs/reproduce/x/copy/seed0."""
    return [os.path.relpath(os.path.abspath(d), shared_folder(run_dirs)) for d in run_dirs]


def plot(ax, x, y, **style):
    """A line of values; one value alone a marker big enough to read, not a dot hidden at the axis."""
    if len(x) == 1:
        style.update(marker=style.get('marker') or 'o', ms=9)
    ax.plot(x, y, **style)


def read_runs(run_dirs):
    """Each run's evaluations, progress lines and config, with its colour (its method's) and its marker and line
    (its place among the runs of its method)."""
    runs = []
    count = {}
    for d, name in zip(run_dirs, label(run_dirs)):
        evals = metrics(d)   # first: a folder without an evaluation is named by its metrics.jsonl
        m = method(d)
        k = count[m] = count.get(m, -1) + 1
        steps = progress(d)
        at = [s * images_a_step(d) / 1000 for s in steps]
        runs.append(dict(dir=d, name=name, method=m, cfg=config(d), evals=evals, seen=seen(d), at=at,
                         losses=[v for v, _ in steps.values()], lr=[v for _, v in steps.values()],
                         colour=PALETTE[m], marker=MARKERS[k % len(MARKERS)], ls=LINES[k % len(LINES)]))
    return runs


def draw_top1_and_losses(top1, loss, runs):
    """Top-1 after each evaluation; the losses, training as lines (what it was trained on), test as markers."""
    for r in runs:
        style = dict(color=r['colour'], marker=r['marker'], ls=r['ls'])
        if 'top1' in r['evals'][-1]:   # an MAE's run has none
            plot(top1, r['seen'], [e['top1'] for e in r['evals']], **style,
                 label=f"{r['name']} ({NAMES[r['method']]}): {r['evals'][-1]['top1']:.2f}%")
        plot(loss, r['seen'], [e.get('loss', e.get('mse')) for e in r['evals']], color=r['colour'],
             marker=r['marker'], ls='none', label=r['name'])
        first = [next(iter(v.values())) for v in r['losses']]                 # ce, or an MAE's mse
        plot(loss, r['at'], first, color=r['colour'], ls=r['ls'], alpha=0.7)
    top1.set(title='test top-1 after each evaluation', ylabel='top-1 (%)')
    if top1.lines:
        top1.legend(fontsize=7, title='run (method): last top-1', title_fontsize=7)

    said = sorted({trained_on(r['cfg']) for r in runs})
    kinds = [Line2D([], [], color='0.3', ls='-', label='training: ' + ' | '.join(said)),
             Line2D([], [], color='0.3', marker='o', ls='none',
                    label='test: ' + ('mse' if all('mask_ratio' in r['cfg'] for r in runs) else 'cross-entropy'))]
    loss.legend(handles=kinds, fontsize=7, loc='upper right')
    smoothing = sorted({f"{r['cfg']['smoothing']:g}" for r in runs if r['cfg'].get('smoothing')})
    loss.set(title='loss: training (lines), test (markers)' +
             (f"\ntraining label-smoothed ({', '.join(smoothing)}), test not: training reads higher"
              if smoothing else ''), ylabel='loss (nats; an MAE: mse)')


def draw_attention(ax, attention):
    """Distillation's own curve: the attention loss of each run that logged one, a layer (the notebook's scale: the
    logged sum over the distilled layers, divided by their number), over its floor, the teacher's entropy. A run
    whose teacher is not on this machine is drawn as logged, the sum, and the title says so."""
    floors, summed = {}, []
    for r in attention:
        n = len(r['layers']) if r['layers'] else 1
        plot(ax, r['at'], [v['attn'] / n for v in r['losses']], color=r['colour'], ls=r['ls'], label=r['name'])
        if r['layers'] is None:
            summed.append(r['name'])
        if r['floor'] is not None:
            floors.setdefault(round(r['floor'], 4), []).append(r['name'])
    for value, names in floors.items():
        which = f" ({', '.join(names)})" if len(floors) > 1 else ''
        ax.axhline(value, color=PALETTE['teacher'], ls='--', lw=1,
                   label=f"floor: the teacher's entropy, {value:.3f}{which}")
    ax.set(title="distillation's attention loss, " + attention_loss(attention[0]['cfg']) +
           (f"\n{', '.join(summed)}: summed, no floor (its teacher is not here)" if summed else ''),
           ylabel='attention loss, a layer (nats)')
    ax.legend(fontsize=7)


def draw_lr(lr, runs):
    """The lr at each logged step: runs with one schedule (the same steps, the same values) drawn once."""
    schedules = {}
    for r in runs:
        schedules.setdefault((tuple(r['at']), tuple(r['lr'])), []).append(r)
    for (at, values), group in schedules.items():
        colours = {r['colour'] for r in group}
        colour = colours.pop() if len(colours) == 1 else 'k'
        name = group[0]['name'] if len(group) == 1 else f'{len(group)} runs: ' + ', '.join(r['name'] for r in group)
        plot(lr, list(at), list(values), color=colour, ls=group[0]['ls'], label=name)
    if len(schedules) == 1:
        shared = 'one schedule' + (f', shared by all {len(runs)} runs' if len(runs) > 1 else '')
    else:
        shared = f'{len(schedules)} schedules for {len(runs)} runs'
        lr.legend(fontsize=7)
    if any(r['cfg'].get('layer_decay', 1) < 1 for r in runs):
        shared += "; the head's (layer decay: earlier layers less)"
    lr.set(title=f'learning rate at each logged step\n{shared}', ylabel='lr')


def draw(run_dirs):
    """The figure: top-1; the losses (training: lines, test: markers); the attention loss where a run logged one;
    the lr, once for runs that share a schedule."""
    runs = read_runs(run_dirs)
    attention = [r for r in runs if any('attn' in v for v in r['losses'])]
    for r in attention:   # the layers its loss sums and its floor, where its teacher is here to say
        teacher = teacher_of(r['cfg'])
        r['layers'] = distilled(r['cfg'], teacher.depth) if teacher else None
        r['floor'] = floor(r['cfg'], teacher, r['layers']) if teacher else None
    fig, axes = plt.subplots(1, 3 + bool(attention), figsize=(5 * (3 + bool(attention)), 4.2),
                             layout='constrained')
    draw_top1_and_losses(axes[0], axes[1], runs)
    if attention:
        draw_attention(axes[2], attention)
    draw_lr(axes[-1], runs)
    for ax in axes:
        ax.set_xlim(0)
        ax.set_xlabel('training images seen (thousands)')
    mark_axes(fig)   # sets a title again: the size after it
    for ax in axes:
        ax.title.set_fontsize(9)
    return fig


def parser():
    p = argparse.ArgumentParser(prog='python -m tools.curves', description=__doc__.split('\n\n')[0])
    p.add_argument('run_dirs', nargs='+', metavar='RUN_DIR',
                   help="a run directory a script wrote (its metrics.jsonl, log.txt, config.json)")
    p.add_argument('--out', default=os.path.join('runs', 'curves.png'),
                   help=f"the figure to write, {', '.join(FORMATS)} by its name (default: runs/curves.png under the "
                        f"folder the command runs in); one there is replaced only if this command drew it")
    return p


# the formats a figure is written in, each with its metadata's Creator, which marks a figure this command drew
FORMATS = ('png', 'pdf', 'svg')
CREATOR = 'tools.curves of the attention transfer course'


def drawn_here(path):
    """Whether the file at `path` is a figure this command drew (its metadata's Creator, kept as plain text near the
    start of a PNG or an SVG, near the end of a PDF)."""
    try:
        with open(path, 'rb') as f:
            head = f.read(1 << 16)
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16)))
            return CREATOR.encode() in head + f.read()
    except OSError:   # unreadable: no figure of ours
        return False


def main():
    args = parser().parse_args()
    # refused before any run is read: a format no writer here knows, a file there this command did not draw
    write = check_outputs('--out', args.out, may_replace=drawn_here, formats=FORMATS)
    fig = draw(args.run_dirs)
    kind = os.path.splitext(args.out)[1][1:].lower()
    write(args.out, lambda f: fig.savefig(f, format=kind, metadata={'Creator': CREATOR}, dpi=150,
                                          bbox_inches='tight'))
    print(f'written: {args.out}')


if __name__ == '__main__':
    run_main(main)
