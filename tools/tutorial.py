"""What tutorial.ipynb uses around the lesson, kept out of it so that its cells show the ideas: the images it shows
(and one you bring), a runner for the scripts, the checks of exercises 4 and 5, a few figures. Nothing here is
attention transfer: the runner launches the same command lines you would type in a terminal, the checks compare
your code with the project's, and the figures only draw what the notebook computed."""
import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.colors import to_rgba
from PIL import Image
from torch.overrides import TorchFunctionMode
from torchvision.transforms import v2

from attention_copy import copied
from tools import reproduce
from tools.palette import PALETTE, SHORT, colour, png
# a run's evaluations, one dict per epoch: {'epoch', 'step', 'top1', ...}
from tools.reproduce_report import per_epoch, records as metrics
from util.config import SMALL_PRESETS
from util import datafiles
from util.datafiles import DATASETS
from util.folders import read_image
from util.errors import flag
from util.files import cpu_name, read_json
from util.launch import amp_dtype

# -----------------------------------------------------------------------------
# Fashion-MNIST, read (found, downloaded if missing, checked) by util/datafiles.py as the scripts read it

CLASSES = 'T-shirt trouser pullover dress coat sandal shirt sneaker bag boot'.split()
# the scripts normalise with these (grey: one value for every channel)
MEAN = DATASETS['fashion-mnist'].stats[0][0]
STD = DATASETS['fashion-mnist'].stats[1][0]


def fashion_mnist(n, split='t10k'):
    """The first n images of a split as the models see them, (n, 3, 28, 28) normalised,
    and labels (n,)."""
    ds = datafiles.fashion_mnist('data', split == 'train', transform=None)
    x = (ds.images[:n].float() / 255 - MEAN) / STD                    # (n, 1, 28, 28)
    x = x.expand(-1, 3, -1, -1).contiguous()                          # grey repeated, as data.py
    return x, ds.labels[:n].long()


def write_slice(n_train, n_test, runs):
    """The first n_train training and n_test test images as IDX files in runs/fashion-mnist-<n_train>-<n_test> (the
    same bytes each time), a --data-dir; returns that folder. IDX is MNIST's format, the one util.datafiles.read_idx
    reads: 0, 0, 8 (unsigned bytes), the number of dimensions, each size as a big-endian int32, then the raw bytes."""
    folder = os.path.join(runs, f'fashion-mnist-{n_train}-{n_test}')
    os.makedirs(folder, exist_ok=True)
    for split, n in (('train', n_train), ('t10k', n_test)):
        ds = datafiles.fashion_mnist('data', split == 'train', transform=None)
        for name, a in (('images-idx3', ds.images[:n, 0]), ('labels-idx1', ds.labels[:n])):
            a = a.numpy().astype(np.uint8)
            with open(os.path.join(folder, f'{split}-{name}-ubyte'), 'wb') as f:
                f.write(bytes([0, 0, 8, a.ndim]) + np.array(a.shape, '>i4').tobytes() + a.tobytes())
    return folder

def test_image(i, size=112):
    """Test image i as an RGB picture of size x size pixels (Fashion-MNIST's 28, enlarged): an image file's stand-in,
    for the cell that reads one you bring."""
    ds = datafiles.fashion_mnist('data', False, transform=None)
    return Image.fromarray(ds.images[i, 0].numpy()).convert('RGB').resize((size, size), Image.Resampling.BICUBIC)


def image_as_data(image, size=28, invert=False):
    """An image file of any size and format (a path) or a PIL image, as the models see Fashion-MNIST: read as
    util/datafiles.py reads a folder's images (EXIF orientation applied, any mode made RGB), made grey, its shorter
    side resized to `size` and the centre cut square, in [0, 1] (invert: 1 - x, for dark clothes on a light ground:
    Fashion-MNIST's are light on black); then the data's normalisation, grey repeated: (1, 3, size, size)."""
    if not isinstance(image, Image.Image):
        image = read_image(image)
    # PIL's grey (ITU-R 601-2 luma) gives a grey RGB pixel back exactly
    grey = v2.Compose([v2.ToImage(), v2.Resize(size), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True)])(image.convert('L'))   # (1, size, size)
    if invert:
        grey = 1 - grey
    return ((grey - MEAN) / STD).expand(3, -1, -1)[None]

# -----------------------------------------------------------------------------
# Running the scripts: one line that updates while a run trains, then its summary


def notebook():
    """IPython.display where this runs in a notebook; None elsewhere (a terminal, no IPython)."""
    try:
        from IPython import display, get_ipython
    except ImportError:
        return None
    return display if get_ipython() else None


def line():
    """show(text, end=False): one line of output that can be rewritten: a display that updates in a notebook, '\\r'
    elsewhere."""
    shown = notebook()
    handle = shown.display(shown.Pretty(''), display_id=True) if shown else None

    def show(text, end=False):
        if handle:
            handle.update(shown.Pretty(text))
        else:
            print('\r' + text, end='\n' if end else '', flush=True)
    return show


class Runner:
    """run(script, name, *flags) prints and launches `python script --data fashion-mnist --data-dir <data_dir>
    --out-dir <work>/name <flags given here> <flags>` and returns the run directory; a name used before gets a new
    one (name-2, ...), so that a cell can run again. The command printed is the one run, with the folders as given:
    typed in a terminal in the same folder, it runs again."""

    def __init__(self, data_dir, flags, work):
        self.data_dir = data_dir
        self.flags = [str(f) for f in flags]
        self.work = work
        os.makedirs(work, exist_ok=True)
        # the device the scripts will pick, and their autocast there
        gpu = torch.cuda.is_available()
        amp = amp_dtype(dict(zip(self.flags, self.flags[1:])).get('--amp', 'auto'),
                        torch.device('cuda' if gpu else 'cpu'))
        if gpu:
            name = torch.cuda.get_device_name()
        else:
            name = f'{cpu_name()} ({torch.get_num_threads()} threads)'
        precision = 'autocast ' + str(amp).split('.')[-1] if amp else 'fp32'
        print(f'the runs train on {name}, {precision}: trained numbers change with the processor and its '
              f'threads, a short run\'s by several points')

    def __call__(self, script, name, *flags):
        label = name
        n = 1
        while os.path.exists(os.path.join(self.work, label)):
            n += 1
            label = f'{name}-{n}'
        out = os.path.join(self.work, label)
        args = [script, '--data', 'fashion-mnist', '--data-dir', self.data_dir, '--out-dir', out,
                *self.flags, *map(str, flags)]
        print('python', shlex.join(args))
        show = line()
        tail = deque(maxlen=20)
        start = time.time()
        last = 0.0
        scored = ''
        with subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, PYTHONUNBUFFERED='1')) as p:
            # the scripts' log lines: '... step 8/192 | ...', 'eval | ... top1 61.2 ...'
            for text in p.stdout:
                tail.append(text)
                top1 = re.search(r'\btop1 ([\d.]+)', text)
                if top1:
                    scored = f' | test top-1 so far {float(top1[1]):.1f}%'
                step = re.search(r'\bstep (\d+)/(\d+)', text)
                if step and time.time() - last > 0.5:
                    last = time.time()
                    show(f'{label}: step {step[1]}/{step[2]}, {last - start:.0f} s{scored}')
        if p.returncode:
            raise RuntimeError(f'{script} stopped (exit code {p.returncode}); '
                               f'the end of its output:\n{"".join(tail)}')
        m = metrics(out)[-1]
        show(f"{label}: test top-1 {m['top1']:.1f}% after {m['epoch']:g} epochs "
             f"({m['step']} steps, {time.time() - start:.0f} s)", end=True)
        return out


def final_top1(run_dir):
    return metrics(run_dir)[-1]['top1']


def images_a_step(run_dir):
    """The images one optimizer step takes, from the run's config.json: the batch of a process, times its
    accumulation steps, times the processes."""
    cfg = read_json(os.path.join(run_dir, 'config.json'), 'run it again')
    return cfg['batch_size'] * cfg['accum_steps'] * cfg['world_size']


def seen(run_dir):
    """The training images a run had seen at each of its evaluations, in thousands: the step times the images a step
    takes. An epoch of a slice is fewer images than an epoch of the whole set; images seen are the same unit."""
    batch = images_a_step(run_dir)
    return [r['step'] * batch / 1000 for r in metrics(run_dir)]


def full_reproduction(path):
    """The committed reproduction's {method: (mean, std)} and its ensemble's disagreement (%),
    from results.json."""
    summary = read_json(path, f'git checkout -- {path}')['summary']
    table = {k: (v['mean'], v['std']) for k, v in summary['methods'].items()}
    return table, float(np.mean(summary['disagreement_pct']))


def budgets(quick_flags, n_train, n_test, loop):
    """The course's five budgets as a Markdown table, each read from the code that sets it: the notebook's
    hand-written loop (loop: its steps, batch, lr and test images; each training image seen once, a constant lr),
    notebook quick mode (quick_flags on n_train / n_test images), notebook full mode (the scripts' preset,
    util/config.py), the committed reproduction and the quick command (what tools/reproduce.py gives
    attention_distill.py)."""
    preset = SMALL_PRESETS['fashion-mnist']
    images = len(datafiles.fashion_mnist('data', True, transform=None))

    def tested(test):
        return f'all {test:,}' if test == 10_000 else f'the first {test:,}'

    def short(lr):   # 2e-3, as the table writes a learning rate
        return f'{lr:.0e}'.replace('e-0', 'e-')

    def row(name, given, train, test, seeds, where):
        given = dict(zip(map(str, given), given[1:]))                     # {'--flag': its value}

        def value(key):   # the flag's value where it is given, else the preset's
            return float(given.get(flag(key), preset[key]))
        epochs = value('epochs')
        batch = value('batch_size')
        steps = int(epochs * (train // batch))
        cut = int(float(given.get('--max-steps', 0)))
        if 0 < cut < steps:
            took = f'{cut} steps of a {epochs:g}-epoch schedule'
        else:
            took = f'{epochs:g} ({steps:,} steps)'
        return (f"| {name} | {train:,} | {took} | {batch:g} | {short(value('blr') * batch / 256)} "
                f"| {value('warmup_epochs'):g} epoch | {seeds} | {tested(test)} | {where} |")

    def distill(cfg):
        return reproduce.command(cfg, 'distill', 0, 'runs', 'teacher.pt')
    steps, batch, lr, test = loop
    full = reproduce.parse(['--data', 'fashion-mnist', '--quick', 'false'])
    quick = reproduce.parse(['--data', 'fashion-mnist', '--quick', 'true'])
    return '\n'.join([
        '| budget | training images | epochs | batch | peak lr | warm-up | seeds | test images '
        '| its numbers |',
        '|---|---:|---|---:|---:|---|---:|---|---|',
        f'| the hand-written loop | {steps * batch:,} | 1 ({steps} steps) | {batch} | '
        f'{short(lr)} | none (constant lr) | 1 | {tested(test)} | this notebook, section 5 |',
        row('notebook quick mode', quick_flags, n_train, n_test, 1, 'this notebook, section 6'),
        row('notebook full mode (the scripts\' preset)', [], images, 10_000, 1,
            '`TUTORIAL_MODE=full`: none stored'),
        row('the committed reproduction', distill(full), images, 10_000, len(full.seeds),
            '`results/fashion-mnist/`'),
        row('the quick command', distill(quick), images, 10_000, len(quick.seeds),
            '`results/fashion-mnist-quick/`')])


# -----------------------------------------------------------------------------
# Exercises 4 and 5: each check stops the notebook (an AssertionError, in a sentence) where your code computes
# something else than the project's, or writes out what the exercise asks it not to


class Calls(TorchFunctionMode):
    """Every torch function run inside `with Calls() as c:`, with the shape it returned: c.calls, [(function, shape
    or None)]. Functions only, as Python code calls them: what a fused call does inside is not seen."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def waiting(exercise, name, prediction, answer):
    """Whether an exercise is still to be done: its prediction (written first) or its function; says which."""
    if prediction is None:
        print(f'Exercise {exercise} is waiting for you: write your prediction first (PREDICTION_{exercise})')
        return True
    if answer is None:
        print(f'Exercise {exercise} is waiting for you: fill in {name}')
        return True
    return False


def differ(what, a, b, rtol=1e-5):
    """The largest difference of a from b, asserted within fp32 rounding (rtol of b's largest value)."""
    assert a.shape == b.shape, f'{what}: shape {tuple(a.shape)}, not {tuple(b.shape)}'
    d = (a - b).abs().max().item()
    bound = rtol * b.abs().max().item()
    assert d < bound, f'{what}: max |difference| = {d:.1e}, more than fp32 rounding ({bound:.1e}): they differ'
    return d, bound


def as_count(prediction):
    """A count as a learner may write it (5120000, 5.12e6, '5,120,000', '5 million', '5.1 Million'), as (the number,
    its significant digits); None for what is no count."""
    words = {'thousand': 1e3, 'million': 1e6, 'billion': 1e9}
    text = str(prediction).strip().lower().replace(',', '').replace('_', '')
    found = re.fullmatch(r'(\d+(?:\.\d*)?(?:e\+?\d+)?)\s*(thousand|million|billion)?', text)
    if not found:
        return None
    digits = len(found[1].split('e')[0].replace('.', '').strip('0')) or 1       # '5.12' and '5120000': 3
    return float(found[1]) * words.get(found[2], 1), digits


def check_fused_copy(copy_fused, prediction, h, attn, q_t, k_t, reference):
    """Exercise 4: copy_fused(h, attn, q_t, k_t) must route the student's values by the teacher's maps through one
    F.scaled_dot_product_attention call and write no (N, N) map out (a copy by hand, such as section 3's A_T @ V_S,
    does), and equal `reference` (section 3's copy_attention) within fp32 rounding. The student may have fewer heads
    than the teacher, each routed by the mean map of a group. prediction: how many numbers the teacher's map of these
    images holds, B x H x N x N, right to the digits it is written with ('5 million' is right for 5,120,000)."""
    n = q_t.shape[-2]
    assert n not in (q_t.shape[-1], h.shape[-1]), 'the tokens must be told apart from the widths'
    with Calls() as seen:   # on fresh copies of its inputs: what it changes in place is its own
        out = None if prediction is None else copy_fused(h.clone(), attn, q_t.clone(), k_t.clone())
    if waiting(4, 'copy_fused', prediction, out):
        return
    # any tensor whose last axis runs over the N keys is a map, or rows of one (B, H, 1, N), however it is made
    written = [shape for _, shape in seen.calls if shape and shape[-1] == n]
    assert not written, (f'your copy wrote out an N x N map, or rows of one {written[0]}: the fused call never does; '
                         'hand q_t, k_t and the values to F.scaled_dot_product_attention')
    assert F.scaled_dot_product_attention in [f for f, _ in seen.calls], \
        'your copy never calls F.scaled_dot_product_attention'
    d, bound = differ('the fused copy vs A_T @ V_S', out, reference)
    print(f'the fused copy vs A_T @ V_S: {tuple(out.shape)}, max |difference| = {d:.1e} (must be < {bound:.1e})')
    held = q_t.shape[0] * q_t.shape[1] * n * n
    count = as_count(prediction)
    if count is None:
        verdict = f'{prediction!r} is no count this check reads: write it as 5120000 or as \'5.12 million\''
    else:
        value, digits = count
        rounded = float(f'{held:.{digits}g}')                              # held, to the digits written
        written = prediction if isinstance(prediction, str) else f'{value:,.0f}'
        verdict = 'right' if value == rounded else f'not {written}'
    print(f'the map it never wrote out holds {held:,} numbers, B x H x N x N ({verdict}): '
          f'{4 * held / 2 ** 20:.1f} MiB in fp32, for one layer')


def check_batch_mean(batch_mean_map, prediction, teacher, x):
    """Exercise 5: batch_mean_map(logits) must turn one layer's teacher logits (B, H, N, N) into the map of
    `--average-maps batch`, every image given the batch's mean map, as attention_copy.copied makes it, within fp32
    rounding, in every layer. prediction: 'more', 'less' or 'the same': the mean map's row entropy against the
    teacher's own maps'."""
    layers = list(range(teacher.depth))
    logits = teacher.attention(x, layers)                                  # {layer: (B, H, N, N)}
    # on fresh copies: a mean computed in place changes its own copy, never the maps it is judged against
    mine = None if prediction is None else {i: batch_mean_map(l.clone()) for i, l in logits.items()}
    if waiting(5, 'batch_mean_map', prediction, None if mine is None or mine[0] is None else mine):
        return
    project = copied(teacher, x, layers, None, 'attn', 'batch')
    for i in layers:
        differ(f"layer {i}, your mean map vs --average-maps batch's", mine[i], project[i]['attn'])
    print(f"your mean maps vs --average-maps batch's: the same in all {len(layers)} layers, within fp32 rounding")

    def entropy(p):   # of a row, averaged over rows, heads and images, in nats
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item()
    own = [entropy(l.softmax(-1)) for l in logits.values()]
    mean = [entropy(m) for m in mine.values()]
    found = 'more' if min(m - o for m, o in zip(mean, own)) > 0 else 'less' if max(m - o for m, o in
                                                                                zip(mean, own)) < 0 else 'mixed'
    said = ' '.join(str(prediction).lower().split()).removeprefix('the ')   # 'More', 'the same', 'Same' ...
    verdict = 'right' if said == found.removeprefix('the ') else f'not {prediction!r}'
    print(f"row entropy, layers 0-{layers[-1]}: the teacher's maps {' '.join(f'{e:.2f}' for e in own)}, "
          f"the batch's mean {' '.join(f'{e:.2f}' for e in mean)} nats: {found} ({verdict})")


# the reproduction's stages, named as the notebook names its runs
NAMES = {'scratch': 'scratch', 'finetune': 'fine-tune', 'copy': 'attention copy',
         'distill': 'attention distillation'}


def reproduction_curves(results_dir):
    """The committed reproduction's test top-1 after every epoch, per method, over the seeds its results.json
    summarises: {name: {'epoch', 'seen', 'mean', 'std', 'seeds'}} (seen: training images by then, in thousands; std
    with n - 1, as its report), from each stage's logs/<stage>/seed<k>/metrics.jsonl and config.json."""
    path = os.path.join(results_dir, 'results.json')
    methods = read_json(path, f'git checkout -- {path}')['summary']['methods']
    curves = {}
    for stage, name in NAMES.items():
        dirs = [os.path.join(results_dir, 'logs', stage, f'seed{k}')
                for k in methods[stage]['seeds']]
        epochs, top1 = per_epoch(dirs)
        # the images seen by each epoch: every seed follows one schedule
        at = dict(zip([round(r['epoch'], 4) for r in metrics(dirs[0])], seen(dirs[0])))
        top1 = np.array(top1)                                               # (seeds, epochs)
        curves[name] = {'epoch': epochs, 'seen': [at[e] for e in epochs], 'mean': top1.mean(0),
                        'std': top1.std(0, ddof=1), 'seeds': len(top1)}
    return curves

# -----------------------------------------------------------------------------
# Figures


def show(fig):
    """A figure shown as the notebook stores it: a 256-colour PNG (tools.palette.png) drawn at 200 dpi, displayed at
    half its size in pixels (IPython's retina), in a third of the bytes; outside IPython, plt.show()."""
    shown = notebook()
    if not shown:
        return plt.show()
    shown.display(shown.Image(png(fig, dpi=200, bbox_inches='tight'), retina=True))
    plt.close(fig)


def mark_axes(fig):
    """Every panel with a grid, and one whose y axis does not start at 0 says so in its title (differences read
    larger than they are)."""
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_ylim()[0] > 0:
            ax.set_title(ax.get_title() + '\n(the axis does not start at 0)')


def plot_curves(runs, title, committed):
    """Test top-1 after every epoch, {label: run directory}, the legend giving each run's end; on the right the
    committed reproduction's curves (reproduction_curves) in the same colours: the mean, shaded one std either side.
    Both against the training images seen: an epoch of the notebook's slice is not an epoch of the whole set."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout='constrained')
    for label, d in runs.items():
        top1 = [r['top1'] for r in metrics(d)]
        left.plot(seen(d), top1, marker='o', color=colour(label), label=f'{label}: {top1[-1]:.1f}%')
    for label, c in committed.items():
        right.fill_between(c['seen'], c['mean'] - c['std'], c['mean'] + c['std'],
                           color=colour(label), alpha=0.25)
        right.plot(c['seen'], c['mean'], marker='o', color=colour(label),
                   label=f"{label}: {c['mean'][-1]:.1f} ± {c['std'][-1]:.1f}%")
    left.set_title(title)
    right.set_title('the committed reproduction: mean ± std over '
                    f"{min(c['seeds'] for c in committed.values())} seeds")
    for ax in (left, right):
        ax.set_xlim(0)
        ax.set(xlabel='training images seen (thousands): a dot after each epoch',
               ylabel='test top-1 (%)')
        # inside, where most room is
        ax.legend(loc='best', fontsize=8, title='at the end', title_fontsize=8)
    mark_axes(fig)
    show(fig)


def plot_training(logs, title):
    """The notebook's own training, {method: {'cross-entropy', 'attention loss', 'floor': one number a step}}: left
    the cross-entropy on the labels, right the attention loss of the maps each method routes with against the floor
    (the teacher's entropy; every method sees the same batches). Faint: every step; bold: the mean of the last 10."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout='constrained')
    abouts = ('on the labels of each batch',
              'H(teacher, the maps it routes with), mean over the layers')
    for ax, key, about in zip(axes, ('cross-entropy', 'attention loss'), abouts):
        for method, log in logs.items():
            ax.plot(log[key], color=colour(method), alpha=0.3, lw=1)
            ax.plot([np.mean(log[key][max(0, i - 9):i + 1]) for i in range(len(log[key]))],
                    color=colour(method), lw=2, label=method)
        ax.set(xlabel='step', ylabel=f'{key} (nats)', title=about)
    axes[1].plot(next(iter(logs.values()))['floor'], color=PALETTE['teacher'], ls='--', lw=1,
                 label="the floor: the teacher's entropy")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    mark_axes(fig)
    show(fig)


def plot_reads(image, reads, even):
    """What the pooled patches read in each layer, over the image: image (28, 28); reads {layer: (49,)}, each patch's
    share of the patch rows' attention. One colour scale for every layer, from the least to the most any layer
    reads, with its bar: a layer whose panel looks flat reads nearly evenly. even: the share of a map that reads
    every token alike (1 / N), marked on the bar; each title gives its layer's range around it."""
    fig, axes = plt.subplots(1, len(reads) + 1, figsize=(13, 2.6), layout='constrained')
    axes[0].imshow(image, cmap='gray')
    axes[0].set_title('as the teacher sees it', fontsize=9)
    low = min(r.min().item() for r in reads.values())
    high = max(r.max().item() for r in reads.values())
    for ax, (i, read) in zip(axes[1:], reads.items()):
        ax.imshow(image, cmap='gray')
        shown = ax.imshow(read.reshape(7, 7), cmap='magma', alpha=0.6, vmin=low, vmax=high,
                          extent=(-0.5, 27.5, 27.5, -0.5))
        ax.set_title(f'layer {i}\n{read.min():.4f} to {read.max():.4f}', fontsize=9)
    for ax in axes:
        ax.set(xticks=[], yticks=[])
    bar = fig.colorbar(shown, ax=axes[1:], shrink=0.9)
    bar.set_label(f'share read\n(white: even, 1/{round(1 / even)})', fontsize=8)
    bar.ax.axhline(even, color='w', lw=2)
    fig.suptitle('what the pooled patches read in each layer (the mean over the heads), over the image, on one '
                 'colour scale', fontsize=10)
    show(fig)


def plot_features(result):
    """The committed feature analysis (features.json's result), in the course's names. Top: linear CKA of each
    method's features to the teacher's per block, mean ± std over seeds (dashed: two seeds of that method); the
    distilled students' CKA to the other methods (bands: each method's seed-to-seed range); the KL of each method's
    maps from the teacher's (copy's given blocks left out). Bottom: the mean attention distance of each head of each
    method's seed-0 model (dots) over the teacher's heads (brown bars), per block."""
    models = {m: [k for k, v in result['models'].items() if v['method'] == m] for m in NAMES}
    fig = plt.figure(figsize=(11, 6.4), layout='constrained')
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    draw_cka_and_kl(top, result, models)
    draw_attention_distance(bottom, result, models)
    show(fig)


def draw_cka_and_kl(top, result, models):
    """plot_features' top row: CKA to the teacher, CKA of distillation to the others, the maps' KL
    from the teacher's. models: {method: its models' names}."""
    # a method with itself: {a}
    groups = {frozenset((g['a'], g['b'])): g['tokens'] for g in result['groups']}

    def cka(a, b):   # [per block: {'mean', 'std', 'min', 'max'}]
        return groups[frozenset((a, b))]
    blocks = np.arange(result['depth'])
    to_teacher, to_distill, kl = top.subplots(1, 3)
    for m in NAMES:
        t = cka(result['teacher'], m)
        own = cka(m, m)
        dots = dict(marker='o', ms=4, color=colour(m))
        to_teacher.errorbar(blocks, [c['mean'] for c in t], [c['std'] for c in t], capsize=2,
                            label=SHORT[m], **dots)
        to_teacher.plot(blocks, [c['mean'] for c in own], ls='--', lw=1, color=colour(m))
        to_distill.fill_between(blocks, [c['min'] for c in own], [c['max'] for c in own],
                                color=colour(m), alpha=0.2)
        if m != 'distill':
            d = cka(m, 'distill')
            to_distill.errorbar(blocks, [c['mean'] for c in d], [c['std'] for c in d], capsize=2,
                                label=f'distillation and {SHORT[m]}', **dots)
        given = set(result['models'][models[m][0]]['maps_given'])
        shown = [i for i in blocks if i not in given]
        kl_mean = [np.mean([result['kl'][k][i] for k in models[m]]) for i in shown]
        kl.plot(shown, kl_mean, label=SHORT[m], **dots)
    to_teacher.set(title='CKA to the teacher\n(dashed: two seeds of one method)', ylim=(0, 1))
    to_distill.set(title='CKA of distillation to the others\n(bands: two seeds of one method)',
                   ylim=(0, 1))
    kl.set(title="the maps' KL from the teacher's (nats)\n(copy's given blocks left out)",
           ylim=(0, None))
    for ax in (to_teacher, to_distill, kl):
        ax.set(xlabel='block', xticks=blocks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='lower left' if ax is not kl else 'upper left')


def draw_attention_distance(bottom, result, models):
    """plot_features' bottom row: the mean attention distance of each head of each method's seed-0
    model over the teacher's heads, per block. models: {method: its models' names}."""
    blocks = np.arange(result['depth'])
    axes = bottom.subplots(1, len(NAMES), sharey=True)
    teacher = np.array(result['attention_distance'][result['teacher']])   # (blocks, heads), pixels
    for ax, m in zip(axes, NAMES):
        k = models[m][0]
        mine = np.array(result['attention_distance'][k])
        given = result['models'][k]['maps_given']
        ax.scatter(np.repeat(blocks, teacher.shape[1]), teacher.ravel(), marker='_', s=120, lw=1.5,
                   color=PALETTE['teacher'], label="the teacher's heads")
        ax.scatter(np.repeat(blocks, mine.shape[1]), mine.ravel(), s=9, color=colour(m), zorder=3,
                   label='its heads')
        ax.axhline(result['uniform_distance'], color='k', ls='--', lw=1, label='a uniform map')
        note = f', blocks {given[0]}-{given[-1]} given' if given else ''
        ax.set(title=f"{SHORT[m]}, seed {result['models'][k]['seed']}{note}", xlabel='block',
               xticks=blocks)
        ax.grid(alpha=0.3)
    axes[0].set(ylabel='mean attention distance (px)')
    axes[0].legend(fontsize=7, loc='lower left')
    bottom.suptitle('how far each head reads: the mean distance in pixels from a patch to what it '
                    f"reads, {result['images']:,} test images (the axis does not start at 0)",
                    fontsize=10)


def show_map(ax, probs, title, vmax=None):
    """One (N, N) attention map, rows = queries, token 0 the class token, coloured from 0 to vmax (default: its own
    99th percentile, so that one bright entry does not hide the rest; maps compared share one). Returns the image."""
    vmax = np.quantile(np.asarray(probs), 0.99) if vmax is None else vmax
    im = ax.imshow(probs, cmap='magma', vmin=0, vmax=vmax, interpolation='nearest')
    ticks = range(0, len(probs), 7)
    ax.set(xticks=ticks, yticks=ticks, title=title, xlabel='key: the token read from',
           ylabel='query: the token reading')
    return im


def methods_maps(teacher='teachers/fashion-mnist-mae.pt', models='results/fashion-mnist/features/models'):
    """The maps the paper's Figure 1 redrawn shows, real ones: test image 0 through the shipped teacher and the
    committed seed-0 copy and distilled students. {'teacher' | 'copy' | 'distill': {block: (N, N)}}, each block's
    most concentrated teacher head (the least row entropy on the image); copy's transferred blocks route with the
    teacher's own maps, its others with its own; and the transferred blocks, {student block: teacher block}."""
    from attention_copy import load_copy_model
    from util.checkpoints import build_from_checkpoint
    x = image_as_data(test_image(0))                                            # (1, 3, 28, 28)
    t = build_from_checkpoint(teacher, img_size=28).eval()
    distilled = build_from_checkpoint(os.path.join(models, 'distill-0.pt')).eval()
    pair = load_copy_model(os.path.join(models, 'copy-0.pt'))
    pair = pair[0] if isinstance(pair, tuple) else pair
    blocks = range(t.depth)
    with torch.no_grad():
        own = {'teacher': t.attention(x, blocks), 'distill': distilled.attention(x, blocks)}
        given = copied(pair.teacher, x, pair.layers, pair.heads, pair.transfer)
        free = [i for i in blocks if i not in pair.layers]                         # blocks copy computes itself
        _, kept = pair.student(x, inject=given, keep={i: ('logits',) for i in free})
    own['copy'] = {i: given[i]['attn'].log() if i in given else kept[i]['logits'] for i in blocks}
    p = {who: {i: l[0].softmax(-1) for i, l in m.items()} for who, m in own.items()}   # (H, N, N) each
    head = {i: min(range(t.num_heads), key=lambda h: -(p['teacher'][i][h] * p['teacher'][i][h].log()).sum(-1).mean())
            for i in blocks}
    return {who: {i: m[i][head[i]] for i in blocks} for who, m in p.items()}, dict(pair.layers), head


def draw_methods():
    """The paper's Figure 1, redrawn with real maps: a frozen teacher's maps reach a fresh student in the blocks
    transferred (the Fashion-MNIST preset's 0-4 of 6), copied or distilled, one way: nothing flows back to the
    teacher. The maps are test image 0's (methods_maps); the boxes take the palette's colours (the teacher's; copy's
    or distillation's student)."""
    maps, transferred, head = methods_maps()
    depth = len(maps['teacher'])
    # each side: the student's method, its text in a transferred block and in the others, the arrow's style and
    # label, what runs at test time
    sides = [('copy', 'no q, k:\nA_T @ V_S', dict(arrowstyle='->', lw=2), 'A_T', 'teacher + student'),
             ('distill', 'q, k → A_S', dict(arrowstyle='->', lw=1.5, ls='--'), 'H(A_T, A_S)', 'the student alone')]
    fig, axes = plt.subplots(1, 2, figsize=(10, 7.2), layout='constrained')
    step = 1.9
    for ax, (method, about, style, arrow, at_test) in zip(axes, sides):
        ax.set(xlim=(0, 10), ylim=(-0.9, depth * step + 0.7))
        ax.axis('off')
        ax.set_title(NAMES[method], fontsize=12, weight='bold')
        style['color'] = PALETTE[method]
        for x0, who, fill, key in ((0.2, 'teacher (frozen)', 'teacher', 'teacher'),
                                   (6.3, 'student (trained)', method, method)):
            ax.text(x0 + 1.75, depth * step + 0.25, who, ha='center', fontsize=10)
            for i in range(depth):
                y = 0.4 + step * (depth - 1 - i)                                # block 0 at the top
                ax.add_patch(plt.Rectangle((x0, y), 3.5, 1.6, edgecolor='k', lw=0.8,
                                           facecolor=to_rgba(PALETTE[fill], 0.15)))
                ax.text(x0 + 0.12, y + 1.5, f'block {i}', fontsize=8, va='top', weight='bold')
                if key == 'teacher':
                    text = f'q, k → A_T\nhead {head[i]}'
                else:
                    text = about if i in transferred else 'its own\nq, k → A'
                ax.text(x0 + 0.12, y + 1.1, text, fontsize=7, va='top')
                top = np.quantile(np.asarray(maps['teacher'][i]), 0.99)
                ax.imshow(maps[key][i], extent=(x0 + 2.0, x0 + 3.4, y + 0.1, y + 1.5), cmap='magma',
                          vmin=0, vmax=top, zorder=3, aspect='auto', interpolation='nearest')
        # one way, from the teacher's map to the student's, in the transferred blocks only
        for i in transferred:
            y = 0.4 + step * (depth - 1 - transferred[i]) + 0.35
            ax.annotate('', xy=(8.25, y), xytext=(3.65, y), arrowprops=style, zorder=4)
            ax.text(5.9, y + 0.12, arrow, ha='center', va='bottom', fontsize=8, color=style['color'])
        ax.text(5, -0.6, f'at test time: {at_test}', ha='center', fontsize=9, style='italic')
    fig.supxlabel("the maps: test image 0, each block's most concentrated teacher head; the students are the "
                  'committed seed-0 models (results/fashion-mnist/features/models/)', fontsize=8, color='0.35')
    show(fig)
