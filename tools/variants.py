"""The runs of tools/variants.sh, collected: each run's test top-1 at its end, per seed, with mean, std and the gap it
closes between the committed reproduction's scratch and fine-tuning (the baselines: results/fashion-mnist/logs), the
committed models' top-1 on shifted test images, and the runs' wall time. Writes variants.json and variants.png in
results/fashion-mnist/variants; the page's tables and sentences are written by hand, and tested against the json.
    python -m tools.variants                 # from committed code
    python -m tools.variants --dirty true    # from code with uncommitted changes: variants.json records it"""
import math
import os
import re
import sys
from statistics import mean, stdev

from matplotlib.figure import Figure

from tools.palette import PALETTE, SHORT, png
from tools.reproduce_report import records
from util.errors import ConfigError
from util.files import DamagedFile, page_commit, read_bytes, read_json, replacing, write_json
from util.launch import run_main

HERE = os.path.join('results', 'fashion-mnist')
OUT = os.path.join(HERE, 'variants')
# evaluate.py's rows: 4 models, ensemble 1,3
METHODS = ('scratch', 'finetune', 'copy', 'distill', 'ensemble')
# the page's order
ORDER = ('distill-q distill-k distill-v copy-q copy-k copy-v distill-heads2 distill-heads4 '
         'distill-layers0-2 distill-layers3-5 distill-mean-batch copy-mean-batch '
         'distill-mean-queries copy-mean-queries distill-uniform distill-local').split()
FIX = 'run that seed again (tools/variants.sh), or move it away'


def seeds(root, name='metrics.jsonl'):
    """{seed: path of file `name` in root/seed<k>}, for the seeds that have it."""
    if not os.path.isdir(root):
        raise DamagedFile(f'{root} is no folder of seed<k> runs of tools/variants.sh: {FIX}')
    found = {int(e[4:]): os.path.join(root, e, name)
             for e in os.listdir(root) if re.fullmatch(r'seed\d+', e)}
    return {k: found[k] for k in sorted(found) if os.path.exists(found[k])}


def finite(value, path, what):
    """value if it is a finite number, else DamagedFile naming the file it was read from."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise DamagedFile(f'{path}: {what} is {value!r}, not a finite number: {FIX}')
    return value


def final_top1(path):
    """The top-1 of a run's last evaluation (its metrics.jsonl's last record)."""
    return finite(records(os.path.dirname(path))[-1].get('top1'), path, "the last record's top1")


def wall_s(folder):
    """The seconds a run took, as tools/variants.sh wrote them in its wall_s.txt."""
    path = os.path.join(folder, 'wall_s.txt')
    try:
        value = float(read_bytes(path, FIX))
    except ValueError:   # not a number: named by finite
        value = None
    return finite(value, path, 'its time')


def stats(top1, ref):
    """{seeds, mean, std (n - 1),
    gap closed between the means of ref's scratch and finetune seeds (%)}."""
    lo = mean(ref['scratch'].values())
    hi = mean(ref['finetune'].values())
    m = mean(top1.values())
    return {'seeds': top1, 'mean': m, 'std': stdev(top1.values()) if len(top1) > 1 else None,
            'gap': 100 * (m - lo) / (hi - lo)}


def finals(runs):
    """{name: {seed: its final top-1}} of runs ({name: {seed: metrics.jsonl}}) that have a seed."""
    return {n: {k: final_top1(p) for k, p in r.items()} for n, r in runs.items() if r}


def collect():
    baselines = {m: seeds(os.path.join(HERE, 'logs', m)) for m in METHODS[:4]}
    # the page's order (ORDER), then any other run by name
    names = sorted(os.listdir(OUT + '/logs'))
    names = [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]
    runs = {n: seeds(os.path.join(OUT, 'logs', n)) for n in names}
    walls = [p for r in runs.values() for p in r.values()]
    top1 = finals(baselines)
    runs = finals(runs)
    shifted = {}
    evals = seeds(os.path.join(OUT, 'shift'), 'robustness.json')
    for k, path in evals.items():
        for row, method in zip(read_json(path, FIX, {'rows': list})['rows'], METHODS):
            for shift, value in row['top1'].items():
                per_method = shifted.setdefault(shift, {m: {} for m in METHODS})
                per_method[method][k] = finite(value, path, 'a top1')
    return {'baselines': {m: stats(v, top1) for m, v in top1.items()},
            'runs': {n: stats(v, top1) for n, v in runs.items()},
            'shifted': {s: {m: stats(v, r) for m, v in r.items()} for s, r in shifted.items()},
            'wall_s': sum(wall_s(os.path.dirname(p)) for p in walls + list(evals.values()))}


# the course's names for what a run's name changes (its name: method-change)
CHANGE = {'q': 'queries only', 'k': 'keys only', 'v': 'values only', 'heads2': '2 heads of 8',
          'heads4': '4 heads of 8', 'mean-batch': 'maps averaged over a batch',
          'mean-queries': 'maps averaged over queries', 'uniform': 'uniform maps, no teacher',
          'local': 'a locality prior, no teacher'}


def label(name):
    """'distill-layers0-2' -> 'distillation, blocks 0-2';
    'distill-layer3' -> 'distillation, block 3 alone'."""
    method, change = name.split('-', 1)
    blocks = re.fullmatch(r'layers?(\d)(-\d)?', change)
    if blocks:
        change = f'blocks {blocks[1]}{blocks[2]}' if blocks[2] else f'block {blocks[1]} alone'
    return f'{SHORT[method]}, {CHANGE.get(change, change)}'


def plot(result, path):
    """Left: each variant's top-1 per seed (dots) and mean (bar), the baselines' means as lines; right: the
    committed models' top-1 on shifted test images, mean ± std over seeds. Drawn 10 inches wide at 200 dpi:
    the notebook shows it 1000 pixels wide, at its other figures' scale and resolution (retina)."""
    fig = Figure(figsize=(10, 5.8), layout='constrained')
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    runs = result['runs']
    shifted = result['shifted']
    for i, (name, r) in enumerate(runs.items()):
        c = PALETTE[name.split('-')[0]]
        left.scatter(list(r['seeds'].values()), [i] * len(r['seeds']), s=10, color=c)
        left.scatter(r['mean'], i, marker='|', s=200, color=c)
    for method, r in result['baselines'].items():
        left.axvline(r['mean'], color=PALETTE[method], linestyle=':', label=SHORT[method])
    left.set_yticks(range(len(runs)), [label(n) for n in runs], fontsize=8)
    left.invert_yaxis()
    left.set(xlabel='test top-1 (%): each seed a dot, the mean a bar',
             title='what is transferred, heads, blocks, averaged maps, controls\n'
                   '(the x axis does not start at 0)')
    left.legend(fontsize=8, title="dotted: the baselines' means\n(copy, distillation: blocks 0-4)",
                title_fontsize=8, loc='lower left')
    for j, method in enumerate(METHODS):   # side by side within each shift
        x = [i + (j - 2) * 0.12 for i in range(len(shifted))]
        means = [s[method]['mean'] for s in shifted.values()]
        right.plot(x, means, 'o', color=PALETTE[method], label=SHORT[method])
        # the spread over seeds, as the page's table states it (one seed: none)
        spread = [s[method]['std'] or 0.0 for s in shifted.values()]
        right.errorbar(x, means, yerr=spread, fmt='none', ecolor=PALETTE[method], capsize=2)
    n = len(next(iter(shifted.values()))['scratch']['seeds'])
    right.set_xticks(range(len(shifted)), list(shifted), fontsize=8, rotation=30)
    right.set(ylabel=f'test top-1 (%), mean ± std over {n} seeds',
              title='shifted test images, same labels\n(the y axis does not start at 0)')
    right.legend(fontsize=8, title='the committed models\n(ensemble: fine-tune +\ndistillation)',
                 title_fontsize=8)
    with replacing(path) as f:
        f.write(png(fig, dpi=200))
    return fig


def main():
    args = sys.argv[1:]
    if args not in ([], ['--dirty', 'true'], ['--dirty', 'false']):
        raise ConfigError(f"unknown arguments {' '.join(args)}: python -m tools.variants [--dirty true]")
    made = page_commit(args == ['--dirty', 'true'])   # refused first: a page is made from committed code
    result = collect()   # a damaged file: one line naming it (run_main)
    write_json(os.path.join(OUT, 'variants.json'), {**result, 'page': made})
    plot(result, os.path.join(OUT, 'variants.png'))
    print(f"{len(result['runs'])} variants; runs and evaluations took "
          f"{result['wall_s'] / 3600:.2f} h")


if __name__ == '__main__':
    run_main(main)
