"""What tutorial.ipynb uses around the lesson, kept out of it so that its cells show the ideas: the images it shows,
a runner for the scripts, a few figures. Nothing here is attention transfer: the runner launches the same command
lines you would type in a terminal, and the figures only draw what the notebook computed."""
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import deque

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

import data
from tools import reproduce
from tools.palette import PALETTE, colour
from tools.reproduce_report import per_epoch
from util.config import SMALL_PRESETS
from util.files import cpu_name, read_jsonl
from util.launch import amp_dtype

# -----------------------------------------------------------------------------
# Fashion-MNIST, read (found, downloaded if missing, checked) by util/datafiles.py as the scripts read it

CLASSES = ['T-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker', 'bag', 'boot']
MEAN, STD = (stats[0] for stats in data.INFO['fashion-mnist'][2])   # the scripts normalise with these


def fashion_mnist(n, split='t10k'):
    """The first n images of a split as the models see them, (n, 3, 28, 28) normalised, and labels (n,)."""
    ds = data.fashion_mnist('data', split == 'train', transform=None)
    x = (ds.images[:n].float() / 255 - MEAN) / STD                                  # (n, 1, 28, 28)
    return x.expand(-1, 3, -1, -1).contiguous(), ds.labels[:n].long()               # grey repeated, as data.py


def write_idx(path, array):
    """An IDX file of unsigned bytes (MNIST's format: 0, 0, 8, the number of dimensions, each size as a
    big-endian int32, then the raw bytes): the format util.datafiles.read_idx reads."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, a.ndim]) + b''.join(n.to_bytes(4, 'big') for n in a.shape) + a.tobytes())


def write_slice(n_train, n_test, folder=None):
    """The first n_train training and n_test test images as IDX files in folder (default: a new one): a --data-dir."""
    folder = folder or tempfile.mkdtemp(prefix='fashion-mnist-')
    os.makedirs(folder, exist_ok=True)
    for split, n in (('train', n_train), ('t10k', n_test)):
        ds = data.fashion_mnist('data', split == 'train', transform=None)
        write_idx(os.path.join(folder, f'{split}-images-idx3-ubyte'), ds.images[:n, 0].numpy())
        write_idx(os.path.join(folder, f'{split}-labels-idx1-ubyte'), ds.labels[:n].numpy())
    return folder

# -----------------------------------------------------------------------------
# Running the scripts: one line that updates while a run trains, then its summary


def line():
    """show(text, end=False): one line of output that can be rewritten: a display that updates in a notebook, '\\r'
    elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Pretty, display
        handle = display(Pretty(''), display_id=True) if get_ipython() else None
    except ImportError:
        handle = None
    return lambda text, end=False: handle.update(Pretty(text)) if handle else \
        print('\r' + text, end='\n' if end else '', flush=True)


class Runner:
    """run(script, name, *flags) prints and launches `python script --data fashion-mnist --data-dir DATA_DIR
    --out-dir <work>/name <flags given here> <flags>` and returns the run directory; a name used before gets a new
    one (name-2, ...), so that a cell can run again."""

    def __init__(self, data_dir, flags=(), work=None):
        self.data_dir, self.flags = data_dir, [str(f) for f in flags]
        self.work = work or tempfile.mkdtemp(prefix='attention-transfer-')
        gpu = torch.cuda.is_available()   # the device the scripts will pick, and their autocast there
        amp = amp_dtype(dict(zip(self.flags, self.flags[1:])).get('--amp', 'auto'),
                        torch.device('cuda' if gpu else 'cpu'))
        name = torch.cuda.get_device_name() if gpu else f'{cpu_name()} ({torch.get_num_threads()} threads)'
        print(f"the runs train on {name}, {'autocast ' + str(amp).split('.')[-1] if amp else 'fp32'}: trained "
              f"numbers differ a little from one processor to another")

    def __call__(self, script, name, *flags):
        out, n = os.path.join(self.work, name), 1
        while os.path.exists(out):
            n += 1
            out = os.path.join(self.work, f'{name}-{n}')
        label = os.path.basename(out)
        args = [script, '--data', 'fashion-mnist', '--data-dir', self.data_dir, '--out-dir', out, *self.flags,
                *map(str, flags)]
        named = {self.data_dir: '$DATA_DIR', self.work: '$RUNS'}   # the command as you would type it
        print('python', *(next((v + a[len(f):] for f, v in named.items() if a == f or a.startswith(f + os.sep)),
                               shlex.quote(a)) for a in args))
        show, tail, start, last, scored = line(), deque(maxlen=20), time.time(), 0.0, ''
        with subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED='1')) as p:
            for text in p.stdout:       # the scripts' log lines: '... step 8/192 | ...', 'eval | ... top1 61.2 ...'
                tail.append(text)
                top1 = re.search(r'\btop1 ([\d.]+)', text)
                scored = f' | test top-1 so far {float(top1[1]):.1f}%' if top1 else scored
                step = re.search(r'\bstep (\d+)/(\d+)', text)
                if step and time.time() - last > 0.5:
                    last = time.time()
                    show(f'{label}: step {step[1]}/{step[2]}, {last - start:.0f} s{scored}')
        if p.returncode:
            raise RuntimeError(f'{script} stopped (exit code {p.returncode}); the end of its output:\n' + ''.join(tail))
        m = metrics(out)
        show(f"{label}: test top-1 {m[-1]['top1']:.1f}% after {m[-1]['epoch']:g} epochs "
                  f"({m[-1]['step']} steps, {time.time() - start:.0f} s)", end=True)
        return out


def metrics(run_dir):
    """The evaluations of a run, one dict per epoch: {'epoch', 'step', 'top1', ...}."""
    return read_jsonl(os.path.join(run_dir, 'metrics.jsonl'), 'run it again')


def final_top1(run_dir):
    return metrics(run_dir)[-1]['top1']


def full_reproduction(path='results/fashion-mnist/results.json'):
    """The committed reproduction's {method: (mean, std)} and its ensemble's disagreement (%), from results.json."""
    with open(path) as f:
        summary = json.load(f)['summary']
    table = {k: (v['mean'], v['std']) for k, v in summary['methods'].items()}
    return table, float(np.mean(summary['disagreement_pct']))


def budgets(quick_flags, n_train, n_test, loop):
    """The course's five budgets as a Markdown table, each read from the code that sets it: the notebook's
    hand-written loop (loop: its steps, batch, lr and test images; each training image seen once, a constant lr),
    notebook quick mode (quick_flags on n_train / n_test images), notebook full mode (the scripts' preset,
    util/config.py), the committed reproduction and the quick command (what tools/reproduce.py gives
    attention_distill.py)."""
    preset, images = SMALL_PRESETS['fashion-mnist'], len(data.fashion_mnist('data', True, transform=None))
    tested = lambda test: f'all {test:,}' if test == 10_000 else f'the first {test:,}'
    short = lambda lr: f'{lr:.0e}'.replace('e-0', 'e-')   # 2e-3, as the table writes a learning rate

    def row(name, given, train, test, seeds, where):
        given = {k[2:].replace('-', '_'): v for k, v in zip(given, given[1:]) if str(k).startswith('--')}
        f = {**preset, **{k: float(v) for k, v in given.items() if isinstance(preset.get(k), (int, float))}}
        steps, cut = int(f['epochs'] * (train // f['batch_size'])), int(float(given.get('max_steps', 0)))
        took = f"{cut} steps of a {f['epochs']:g}-epoch schedule" if 0 < cut < steps else \
            f"{f['epochs']:g} ({steps:,} steps)"
        return (f"| {name} | {train:,} | {took} | {f['batch_size']:g} | {short(f['blr'] * f['batch_size'] / 256)} | "
                f"{f['warmup_epochs']:g} epoch | {seeds} | {tested(test)} | {where} |")
    steps, batch, lr, test = loop
    full, quick = (reproduce.parse(['--data', 'fashion-mnist', '--quick', q]) for q in ('false', 'true'))
    distill = lambda cfg: reproduce.command(cfg, 'distill', 0, 'runs', 'teacher.pt')
    return '\n'.join([
        '| budget | training images | epochs | batch | peak lr | warm-up | seeds | test images | its numbers |',
        '|---|---:|---|---:|---:|---|---:|---|---|',
        f'| the hand-written loop | {steps * batch:,} | 1 ({steps} steps) | {batch} | {short(lr)} | none (constant lr) | '
        f'1 | {tested(test)} | this notebook, section 5 |',
        row('notebook quick mode', quick_flags, n_train, n_test, 1, 'this notebook, section 6'),
        row('notebook full mode (the scripts\' preset)', [], images, 10_000, 1, '`TUTORIAL_MODE=full`: none stored'),
        row('the committed reproduction', distill(full), images, 10_000, len(full.seeds), '`results/fashion-mnist/`'),
        row('the quick command', distill(quick), images, 10_000, len(quick.seeds), '`results/fashion-mnist-quick/`')])


# the reproduction's stages, named as the notebook names its runs
NAMES = {'scratch': 'scratch', 'finetune': 'fine-tune', 'copy': 'attention copy', 'distill': 'attention distillation'}


def reproduction_curves(results_dir='results/fashion-mnist'):
    """The committed reproduction's test top-1 after every epoch, per method, over its seeds: {name: {'epoch', 'mean',
    'std', 'seeds'}} (std with n - 1, as its report), from each stage's logs/<stage>/seed<k>/metrics.jsonl."""
    with open(os.path.join(results_dir, 'results.json')) as f:
        stages = json.load(f)['stages']
    curves = {}
    for stage, name in NAMES.items():
        epochs, top1 = per_epoch(os.path.join(results_dir, 'logs', stage, f"seed{s['seed']}") for s in stages
                                 if s['stage'] == stage)
        top1 = np.array(top1)                                               # (seeds, epochs)
        curves[name] = {'epoch': epochs, 'mean': top1.mean(0), 'std': top1.std(0, ddof=1), 'seeds': len(top1)}
    return curves

# -----------------------------------------------------------------------------
# Figures


def plot_curves(runs, title, committed=None):
    """Test top-1 after every epoch, {label: run directory}, the legend giving each run's end; with committed
    (reproduction_curves), its curves on the right in the runs' colours: the mean, shaded one std either side."""
    fig, axes = plt.subplots(1, 2 if committed else 1, figsize=(11, 3.8) if committed else (7.5, 3.6),
                             layout='constrained', squeeze=False)
    ax = axes[0, 0]
    spare = ['tab:red', 'tab:brown', 'tab:pink', 'tab:olive', 'tab:cyan']      # for runs of no method in PALETTE
    colours = {label: colour(label, spare[i % len(spare)]) for i, label in enumerate(runs)}
    for label, d in runs.items():
        m = metrics(d)
        ax.plot([r['epoch'] for r in m], [r['top1'] for r in m], marker='o', color=colours[label],
                label=f"{label}: {m[-1]['top1']:.1f}%")
    ax.set(title=title)
    if committed:
        right = axes[0, 1]
        for label, c in committed.items():
            right.fill_between(c['epoch'], c['mean'] - c['std'], c['mean'] + c['std'], color=colours[label], alpha=0.25)
            right.plot(c['epoch'], c['mean'], marker='o', color=colours[label],
                       label=f"{label}: {c['mean'][-1]:.1f} ± {c['std'][-1]:.1f}%")
        n = min(c['seeds'] for c in committed.values())
        right.set(title=f'the committed reproduction: mean ± std over {n} seeds')
    for a in axes.flat:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set(xlabel='epoch', ylabel='test top-1 (%)')
        say_where_the_axis_starts(a)
        a.grid(alpha=0.3)
        if committed:       # two panels: each legend inside, where the curves leave the most room
            a.legend(loc='best', fontsize=8, title='at the end', title_fontsize=8)
        else:
            a.legend(loc='upper left', bbox_to_anchor=(1.02, 1), frameon=False, title='at the end')
    plt.show()


def say_where_the_axis_starts(ax):
    """A y axis that does not start at 0 says so in its title: differences read larger than they are."""
    if ax.get_ylim()[0] > 0:
        ax.set_title(ax.get_title() + '\n(the axis does not start at 0)')


def plot_training(logs, title):
    """The notebook's own training, {method: {'cross-entropy', 'attention loss', 'floor': one number a step}}: left
    the cross-entropy on the labels, right the attention loss of the maps each method routes with against the floor
    (the teacher's entropy; every method sees the same batches). Faint: every step; bold: the mean of the last 10."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout='constrained')
    smooth = lambda v: [np.mean(v[max(0, i - 9):i + 1]) for i in range(len(v))]
    for ax, key in zip(axes, ('cross-entropy', 'attention loss')):
        for method, log in logs.items():
            ax.plot(log[key], color=colour(method), alpha=0.3, lw=1)
            ax.plot(smooth(log[key]), color=colour(method), lw=2, label=method)
        ax.set(xlabel='step', ylabel=f'{key} (nats)')
        ax.grid(alpha=0.3)
    axes[1].plot(next(iter(logs.values()))['floor'], color=PALETTE['teacher'], ls='--', lw=1,
                 label="the floor: the teacher's entropy")
    axes[0].set_title('on the labels of each batch')
    axes[1].set_title('H(teacher, the maps it routes with), mean over the layers')
    axes[1].legend(fontsize=8)
    for ax in axes:
        say_where_the_axis_starts(ax)
    fig.suptitle(title, fontsize=10)
    plt.show()


def show_map(ax, probs, title, vmax=None, tick=7):
    """One (N, N) attention map, rows = queries, token 0 the class token, coloured from 0 to vmax (default: its own
    99th percentile, so that one bright entry does not hide the rest; maps compared share one). Returns the image."""
    vmax = np.quantile(np.asarray(probs), 0.99) if vmax is None else vmax
    im = ax.imshow(probs, cmap='magma', vmin=0, vmax=vmax, interpolation='nearest')
    ax.set_xticks(range(0, len(probs), tick))
    ax.set_yticks(range(0, len(probs), tick))
    ax.set(xlabel='key: the token read from', ylabel='query: the token reading', title=title)
    return im


def _map(rng, noise):
    """A made-up 6x6 attention map: each token reads mostly from itself and its neighbours."""
    i = np.arange(6)
    m = np.exp(-((i[:, None] - i[None, :]) ** 2) / 2.0 + noise * rng.normal(size=(6, 6)))
    return m / m.sum(1, keepdims=True)


def draw_methods():
    """The paper's Figure 1, redrawn: a frozen teacher's maps reach a fresh student, copied or distilled."""
    rng = np.random.default_rng(3)
    teacher_maps = [_map(rng, 0.4) for _ in range(3)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), layout='constrained')
    for ax, copy in zip(axes, (True, False)):
        ax.set(xlim=(0, 10), ylim=(-0.9, 10.4))
        ax.axis('off')
        ax.set_title('attention copy' if copy else 'attention distillation', fontsize=12, weight='bold')
        for x0, who in ((0.2, 'teacher (frozen)'), (6.3, 'student (trained)')):
            ax.text(x0 + 1.75, 9.9, who, ha='center', fontsize=10)
        for layer, a_t in enumerate(teacher_maps):
            y = 0.6 + 3.0 * layer
            a_s = a_t if copy else _map(rng, 0.9)      # copy: the student's map IS the teacher's
            for x0, fill, amap, text in ((0.2, '#e0e0e0', a_t, 'q, k → A_T'),
                                           (6.3, '#d4e6f7', a_s, 'no q, k\nA_T @ V_S' if copy else 'q, k → A_S')):
                ax.add_patch(plt.Rectangle((x0, y), 3.5, 2.3, facecolor=fill, edgecolor='k', lw=0.8))
                ax.text(x0 + 0.15, y + 2.15, f'block {layer}', fontsize=8, va='top', weight='bold')
                ax.text(x0 + 0.15, y + 1.7, text, fontsize=8, va='top')
                ax.imshow(amap, extent=(x0 + 2.3, x0 + 3.3, y + 0.15, y + 1.65), cmap='magma', zorder=3, aspect='auto')
            style = dict(arrowstyle='->', lw=2, color=PALETTE['copy']) if copy else \
                dict(arrowstyle='<->', lw=1.5, ls='--', color=PALETTE['distill'])
            # below the blocks' text, from the teacher's map to the student's map
            ax.annotate('', xy=(8.55, y + 0.45), xytext=(3.55, y + 0.45), arrowprops=style, zorder=4)
            ax.text(5.0, y + 0.6, 'A_T' if copy else 'H(A_T, A_S)', ha='center', va='bottom', fontsize=9,
                    color=style['color'])
        ax.text(5, -0.6, 'at test time: teacher + student' if copy else 'at test time: the student alone',
                ha='center', fontsize=9, style='italic')
    plt.show()
