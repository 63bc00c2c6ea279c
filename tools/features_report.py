"""
features.py's report: its numbers as tables (TABLES.md) and one figure (features.png), and features.json with every
number. Reads only the plain dict `analyse` returns, so the report can be re-made from features.json. What the
numbers show is written by hand in the page beside them (README.md); tests/test_features_page.py checks each number
it states.

    python -m tools.features_report results/fashion-mnist/features   # TABLES.md and features.png again, from features.json
"""
import os
from statistics import fmean as mean
import sys

from matplotlib.figure import Figure   # no pyplot: no global state, rendered by Agg

from tools import palette
from tools.features_controls import spread
from util.config import ConfigError
from util.files import read_json, save_figure, write_json, write_text
from util.launch import run_main


# -----------------------------------------------------------------------------
# Tables: one row per method, or per pair of methods (features.py's groups: seeds pooled)


def methods(r):
    """{method: [its models, by seed]}, the teacher's first."""
    out = {}
    for k, m in r['models'].items():
        out.setdefault(m.get('method', k), []).append(k)
    return out


def blocks_header(r, first):
    return (f"| {first} | {' | '.join(f'block {i}' for i in range(r['depth']))} |\n"
            f"|---|{'---:|' * r['depth']}")


def group_name(g):
    return f"{g['a']} vs {g['b']}" + (' (seed to seed)' if g['a'] == g['b'] else '')


def ordered(r):
    """The groups: each method against the teacher, then each against itself (the controls), then the pairs."""
    return sorted(r['groups'], key=lambda g: (r['teacher'] not in (g['a'], g['b']), g['a'] != g['b']))


def pm(s, digits=2):
    return f"{s['mean']:.{digits}f}" + (f" ±{s['std']:.{digits}f}" if s['std'] else '')


def top1_table(r):
    top1 = {k: [r['models'][m]['top1'] for m in v] for k, v in methods(r).items()
            if r['models'][v[0]]['top1'] is not None}
    seeds = max(map(len, top1.values()))
    rows = [f"| {k} | {' | '.join(f'{t:.2f}' for t in v)}{' |' * (seeds - len(v))} | {pm(spread(v))} |"
            for k, v in top1.items()]
    return '\n'.join([f"| top-1 (%) | {' | '.join(f'model {i + 1}' for i in range(seeds))} | mean ± std |",
                      f"|---|{'---:|' * (seeds + 1)}", *rows])


def cka_table(r, key):
    rows = [f"| {group_name(g)} | {len(g['pairs'])} | {' | '.join(pm(s) for s in g[key])} |" for g in ordered(r)]
    head = blocks_header(r, 'linear CKA').split('\n')
    return '\n'.join([head[0].replace(' | block 0', ' | pairs | block 0'), '|---|---:|' + head[1][5:], *rows])


def bootstrap_table(r):
    b = r['bootstrap']
    width = max((s['interval'][1] - s['interval'][0]) / 2 for g in r['groups'] for s in g['tokens'])
    return ('| resamples | CKA: batches resampled | predictions: images resampled | seed | interval | widest CKA cell '
            f"interval (±) |\n|---:|---:|---:|---:|---:|---:|\n| {b['resamples']} | {b['cka_units']} | {r['images']} | "
            f"{b['seed']} | {100 * b['level']:.0f}% | {width:.3f} |")


def per_method(r, what, k, i):
    return [v for m in methods(r)[k] for v in r[what][m][i]]


def given(r, k):
    """The layers where method k's maps are its teacher's, given (a copy student's copied ones)."""
    return r['models'][methods(r)[k][0]]['maps_given']


def kl_table(r):
    """KL of each method's maps to the teacher's per block, mean over heads and seeds; a copied layer's maps are given."""
    def cell(k, i):   # a KL is >= 0: rounding's -0.00 shown as 0.00
        m = r['models'][methods(r)[k][0]]
        return 'given' if i in m['maps_given'] else \
            f"{round(mean(per_method(r, 'kl', k, i)), 2) + 0.0:.2f}" + '†' * (i in m['maps_distilled'])
    ks = [k for k in methods(r) if k != r['teacher']]
    rows = [f"| {k} | {' | '.join(cell(k, i) for i in range(r['depth']))} |" for k in ks]
    entropy = [f'{mean(h):.2f}' for h in r['cross_entropy'][r['teacher']]]    # its CE to itself
    return '\n'.join([blocks_header(r, 'KL to the teacher (nats)'), *rows,
                      f"| *the teacher's entropy* | {' | '.join(entropy)} |"])


def distance_table(r):
    def cell(k, i):
        d = per_method(r, 'attention_distance', k, i)
        return f'{mean(d):.1f} ({min(d):.1f}-{max(d):.1f})' + '*' * (i in given(r, k))
    rows = [f"| {k} | {' | '.join(cell(k, i) for i in range(r['depth']))} |" for k in methods(r)]
    return '\n'.join([blocks_header(r, 'attention distance (px)'), *rows])


def prediction_table(r):
    def cell(s, scale=1, sign=''):
        iv = f" [{scale * s['interval'][0]:{sign}.2f}, {scale * s['interval'][1]:{sign}.2f}]" if 'interval' in s else ''
        return f"{scale * s['mean']:{sign}.2f}{iv}"
    rows = [f"| {group_name(g)} | {len(g['pairs'])} | {p['top1_a']['mean']:.2f} / {p['top1_b']['mean']:.2f} | "
            f"{cell(p['top1_ensemble'])} | {cell(p['gain'], sign='+')} | {cell(p['disagreement'], 100)} | "
            f"{cell(p['both_wrong'], 100)} | {cell(p['b_wrong_given_a_wrong'], 100)} |"
            for g in ordered(r) if 'predictions' in g for p in [g['predictions']]]
    return '\n'.join(['| a + b | pairs | top-1 a / b | ensemble | ensemble - the better | top-1 differs % | '
                      'both wrong % | b wrong where a is wrong % |', '|---|---:|---:|---:|---:|---:|---:|---:|', *rows])


def summary(r):
    """Every table, each under its heading: TABLES.md, and what features.py prints."""
    tables = {'Top-1 (%) on these images, fp32': top1_table(r),
              'Linear CKA, every token of every image a sample, block i against block i': cka_table(r, 'tokens'),
              'Linear CKA, the class token alone': cka_table(r, 'class_token'),
              "Attention maps against the teacher's: KL per block, mean over heads and seeds (†: distilled toward "
              "them)": kl_table(r),
              'Mean attention distance per block, mean over heads and seeds (shortest-longest head; *: maps given)':
                  distance_table(r),
              'Two-model ensembles of each pair of classifiers, mean over the pairs [interval]': prediction_table(r)}
    if r.get('bootstrap'):
        tables['The bootstrap over the test images'] = bootstrap_table(r)
    return '\n\n'.join(f'## {title}\n\n{table}' for title, table in tables.items())

# -----------------------------------------------------------------------------
# The figure


def plot(r, path):
    """Top: CKA to the teacher per block, each method's mean over seeds (bars: their range), its seed-to-seed
    control dashed; the distilled student against the others beside the controls (bands: their range); the maps'
    KL to the teacher's. Bottom: each head's attention distance per block, the teacher and each method's first
    model (maps given: hollow). Each method in its colour (tools/palette.py). Returns the figure."""
    ms, t = methods(r), r['teacher']
    names = [k for k in ms if k != t]
    colour = {k: palette.colour('teacher' if k == t else k, f'C{i}') for i, k in enumerate(ms)}   # one per method
    fig = Figure(figsize=(3.2 * len(ms), 7.5), layout='constrained')
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    axes = top.subplots(1, 3)
    group = {(g['a'], g['b']): g for g in r['groups']}
    x = range(r['depth'])
    line = lambda ax, g, c, **kw: ax.errorbar(x, [s['mean'] for s in g['tokens']], capsize=2, color=c, yerr=[
        [s['mean'] - s['min'] for s in g['tokens']], [s['max'] - s['mean'] for s in g['tokens']]], **kw)
    focus = 'distill' if 'distill' in names else names[-1]
    for k in names:
        line(axes[0], group[t, k], colour[k], fmt='o-', label=k)
        if (k, k) in group:
            c = group[k, k]['tokens']
            axes[0].plot(x, [s['mean'] for s in c], ls='--', color=colour[k], lw=1)
            axes[1].fill_between(x, [s['min'] for s in c], [s['max'] for s in c], color=colour[k], alpha=0.2)
        pair = group.get((k, focus)) or group.get((focus, k))
        if k != focus and pair:
            line(axes[1], pair, colour[k], fmt='o-', label=f'{focus} vs {k}')
        own = [i for i in x if i not in given(r, k)]
        axes[2].plot(own, [mean(per_method(r, 'kl', k, i)) for i in own], 'o-', color=colour[k], label=k)
    titles = ('CKA to the teacher (dashed: seed to seed)', f'CKA of {focus} to the others (bands: seed to seed)',
              "attention maps: KL to the teacher's (nats)")
    for ax, title, high in zip(axes, titles, (1.02, 1.02, None)):
        ax.set(title=title, xlabel='block', ylim=(0, high), xticks=x)
    axes[0].legend(fontsize=8), axes[1].legend(fontsize=8)
    dist = bottom.subplots(1, len(ms), sharey=True)
    for ax, k in zip(dist, ms):
        for i, heads in enumerate(r['attention_distance'][ms[k][0]]):
            ax.scatter([i] * len(heads), heads, s=18, edgecolors=colour[k],
                       facecolors='none' if i in given(r, k) else colour[k])
        ax.axhline(r['uniform_distance'], color='black', ls='--', lw=1, label='a uniform map')
        ax.set(title=ms[k][0] + ' (hollow: maps given)' * bool(given(r, k)), xlabel='block', xticks=x)
    dist[0].legend(fontsize=8)
    dist[0].set_ylabel('mean attention distance (px)')
    bottom.suptitle(f"each head's mean attention distance, {r['images']} test images (the axis does not start at 0)",
                    fontsize=10)
    save_figure(fig, path, dpi=110)
    return fig

# -----------------------------------------------------------------------------
# The files


def write(out_dir, r, record=None):
    """features.png and TABLES.md in out_dir, and with record (the config, how it was made) features.json, which holds
    every number."""
    os.makedirs(out_dir, exist_ok=True)
    plot(r, os.path.join(out_dir, 'features.png'))
    write_text(os.path.join(out_dir, 'TABLES.md'), f"# The tables of features.json\n\n{summary(r)}\n")
    if record:
        write_json(os.path.join(out_dir, 'features.json'), {**record, 'result': r})
    print(f"written: {out_dir}/{'features.json, ' * bool(record)}features.png, TABLES.md")


def rewrite(out_dir):
    """TABLES.md and features.png again from features.json: the numbers are the analysis's own."""
    path = os.path.join(out_dir, 'features.json')
    if not os.path.isfile(path):
        raise ConfigError(f'{path} not found: name a directory that features.py wrote (--out-dir)')
    write(out_dir, read_json(path, 'restore it (committed results: git checkout -- it), or make it again with python '
                                   '-m tools.features', {'result': dict})['result'])


if __name__ == '__main__':
    if len(sys.argv) != 2:
        sys.exit('usage: python -m tools.features_report OUT_DIR (a directory features.py wrote, with features.json)')
    run_main(lambda: rewrite(sys.argv[1]))
