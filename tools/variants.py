"""The runs of tools/variants.sh, collected: each run's test top-1 at its end, per seed, with mean, std and the gap it
closes between the committed reproduction's scratch and fine-tuning (the baselines: results/fashion-mnist/logs), the
committed models' top-1 on shifted test images, and the runs' wall time. Writes variants.json and variants.png in
results/fashion-mnist/variants; the page's tables and sentences are written by hand, and tested against the json.
    python -m tools.variants"""
import json
import os
from statistics import mean, stdev

from matplotlib.figure import Figure

from tools.palette import PALETTE
from util.files import save_figure, write_json

HERE = os.path.join('results', 'fashion-mnist')
OUT = os.path.join(HERE, 'variants')
METHODS = ('scratch', 'finetune', 'copy', 'distill', 'ensemble')   # evaluate.py's rows: 4 models, ensemble 1,3
ORDER = ('distill-q distill-k distill-v copy-q copy-k copy-v distill-heads2 distill-heads4 distill-layers0-2 '
         'distill-layers3-5 distill-mean-batch copy-mean-batch distill-mean-queries copy-mean-queries').split()


def seeds(root, name='metrics.jsonl'):
    """{seed: path of file `name` in root/seed<k>}, for the seeds that have it."""
    found = {int(s[4:]): os.path.join(root, s, name) for s in os.listdir(root)}
    return {k: found[k] for k in sorted(found) if os.path.exists(found[k])}


def final_top1(path):
    with open(path) as f:
        return json.loads(f.readlines()[-1])['top1']


def stats(top1, ref):
    """{seeds, mean, std (n - 1), gap closed between the means of ref's scratch and finetune seeds (%)}."""
    lo, hi = (mean(ref[k].values()) for k in ('scratch', 'finetune'))
    m = mean(top1.values())
    return {'seeds': top1, 'mean': m, 'std': stdev(top1.values()) if len(top1) > 1 else None,
            'gap': 100 * (m - lo) / (hi - lo)}


def collect():
    top1 = {m: seeds(os.path.join(HERE, 'logs', m)) for m in METHODS[:4]}
    names = sorted(sorted(os.listdir(OUT + '/logs')), key=lambda n: (ORDER + [n]).index(n))   # the page's order
    runs = {n: seeds(os.path.join(OUT, 'logs', n)) for n in names}
    walls = [p for r in runs.values() for p in r.values()]
    top1, runs = ({n: {k: final_top1(p) for k, p in r.items()} for n, r in d.items() if r} for d in (top1, runs))
    shifted, evals = {}, seeds(os.path.join(OUT, 'shift'), 'robustness.json')
    for k, path in evals.items():
        with open(path) as f:
            for row, method in zip(json.load(f)['rows'], METHODS):
                for shift, value in row['top1'].items():
                    shifted.setdefault(shift, {m: {} for m in METHODS})[method][k] = value
    wall = sum(float(open(os.path.dirname(p) + '/wall_s.txt').read()) for p in walls + list(evals.values()))
    return {'baselines': {m: stats(v, top1) for m, v in top1.items()},
            'runs': {n: stats(v, top1) for n, v in runs.items()},
            'shifted': {s: {m: stats(v, r) for m, v in r.items()} for s, r in shifted.items()}, 'wall_s': wall}


def plot(result, path):
    fig = Figure(figsize=(13, 6), layout='constrained')
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    runs, shifted = result['runs'], result['shifted']
    for i, (name, r) in enumerate(runs.items()):
        c = PALETTE[name.split('-')[0]]
        left.scatter(list(r['seeds'].values()), [i] * len(r['seeds']), s=12, color=c)
        left.scatter(r['mean'], i, marker='|', s=300, color=c)
    for method, r in result['baselines'].items():
        left.axvline(r['mean'], color=PALETTE[method], linestyle=':', label=f'{method}, the baseline')
    left.set_yticks(range(len(runs)), list(runs))
    left.invert_yaxis()
    left.set(xlabel='test top-1 (%): each seed (dot), the mean (bar)', title='what is transferred, heads, layers, '
             'averaged maps\n(x axis does not start at 0)')
    left.legend(fontsize='small')
    for j, method in enumerate(METHODS):   # side by side within each shift
        right.plot([i + (j - 2) * 0.12 for i in range(len(shifted))], [s[method]['mean'] for s in shifted.values()],
                   'o', color=PALETTE[method], label=method)
    right.set_xticks(range(len(shifted)), list(shifted))
    right.set(ylabel='test top-1 (%), mean over seeds', title='shifted test images, labels unchanged: the\n'
              'committed models (y axis does not start at 0)')
    right.legend(fontsize='small')
    save_figure(fig, path, dpi=74)
    return fig


def main():
    result = collect()
    write_json(os.path.join(OUT, 'variants.json'), result)
    plot(result, os.path.join(OUT, 'variants.png'))
    print(f"{len(result['runs'])} variants; runs and evaluations took {result['wall_s'] / 3600:.2f} h")


if __name__ == '__main__':
    main()
