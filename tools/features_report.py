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


def blocks_table(r, title, rows):
    """rows: {name: its cells, one a block}. A title 'x | y' heads two columns before the blocks."""
    return '\n'.join([f"| {title} | {' | '.join(f'block {i}' for i in range(r['depth']))} |",
                      f"|---|{'---:|' * (title.count('|') + r['depth'])}",
                      *(f"| {k} | {' | '.join(v)} |" for k, v in rows.items())])


def group_name(g):
    return f"{g['a']} vs {g['b']}" + (' (seed to seed)' if g['a'] == g['b'] else '')


def ordered(r):
    """The groups: each method against the teacher, then each against itself (the controls), then the pairs."""
    return sorted(r['groups'], key=lambda g: (r['teacher'] not in (g['a'], g['b']), g['a'] != g['b']))


def pm(s):
    return f"{s['mean']:.2f}" + (f" ±{s['std']:.2f}" if s['std'] else '')


def top1_table(r):
    top1 = {k: [r['models'][m]['top1'] for m in v] for k, v in methods(r).items()
            if first(r, k)['top1'] is not None}
    seeds = max(map(len, top1.values()))
    rows = [f"| {k} | {' | '.join(f'{t:.2f}' for t in v)}{' |' * (seeds - len(v))} | {pm(spread(v))} |"
            for k, v in top1.items()]
    return '\n'.join([f"| top-1 (%) | {' | '.join(f'model {i + 1}' for i in range(seeds))} | mean ± std |",
                      f"|---|{'---:|' * (seeds + 1)}", *rows])


def cka_table(r, key):
    rows = {f"{group_name(g)} | {len(g['pairs'])}": [pm(s) for s in g[key]] for g in ordered(r)}
    return blocks_table(r, 'linear CKA | pairs', rows)


def bootstrap_table(r):
    b = r['bootstrap']
    width = max((s['interval'][1] - s['interval'][0]) / 2 for g in r['groups'] for s in g['tokens'])
    return ('| resamples | CKA: batches resampled | predictions: images resampled | seed | interval | widest CKA cell '
            f"interval (±) |\n|---:|---:|---:|---:|---:|---:|\n| {b['resamples']} | {b['cka_units']} | {r['images']} | "
            f"{b['seed']} | {100 * b['level']:.0f}% | {width:.3f} |")


def per_block(r, what, k):
    """[block] the values of every head of every seed of method k."""
    return [[v for m in methods(r)[k] for v in r[what][m][i]] for i in range(r['depth'])]


def first(r, k):
    """The record of method k's first model: its maps given, distilled, whether it classifies."""
    return r['models'][methods(r)[k][0]]


def kl_table(r):
    """KL of each method's maps to the teacher's per block, mean over heads and seeds; a copied layer's maps are given."""
    def cells(k):   # a KL is >= 0: rounding's -0.00 shown as 0.00
        m = first(r, k)
        return ['given' if i in m['maps_given'] else
                f"{round(mean(kl), 2) + 0.0:.2f}" + '†' * (i in m['maps_distilled'])
                for i, kl in enumerate(per_block(r, 'kl', k))]
    rows = {k: cells(k) for k in methods(r) if k != r['teacher']}
    rows["*the teacher's entropy*"] = [f'{mean(h):.2f}' for h in r['cross_entropy'][r['teacher']]]   # its CE to itself
    return blocks_table(r, 'KL to the teacher (nats)', rows)


def distance_table(r):
    rows = {k: [f'{mean(d):.1f} ({min(d):.1f}-{max(d):.1f})' + '*' * (i in first(r, k)['maps_given'])
                for i, d in enumerate(per_block(r, 'attention_distance', k))] for k in methods(r)}
    return blocks_table(r, 'attention distance (px)', rows)


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
    col = lambda g, key: [s[key] for s in g['tokens']]   # one statistic of a group's CKA, per block
    line = lambda ax, g, **kw: ax.errorbar(x, col(g, 'mean'), capsize=2, fmt='o-', yerr=[
        [s['mean'] - s['min'] for s in g['tokens']], [s['max'] - s['mean'] for s in g['tokens']]], **kw)
    focus = 'distill' if 'distill' in names else names[-1]
    for k in names:
        c, kl = colour[k], per_block(r, 'kl', k)
        line(axes[0], group[t, k], color=c, label=k)
        if (k, k) in group:
            axes[0].plot(x, col(group[k, k], 'mean'), ls='--', color=c, lw=1)
            axes[1].fill_between(x, col(group[k, k], 'min'), col(group[k, k], 'max'), color=c, alpha=0.2)
        pair = group.get((k, focus)) or group.get((focus, k))
        if k != focus and pair:
            line(axes[1], pair, color=c, label=f'{focus} vs {k}')
        own = [i for i in x if i not in first(r, k)['maps_given']]
        axes[2].plot(own, [mean(kl[i]) for i in own], 'o-', color=c, label=k)
    titles = ('CKA to the teacher (dashed: seed to seed)', f'CKA of {focus} to the others (bands: seed to seed)',
              "attention maps: KL to the teacher's (nats)")
    for ax, title, high in zip(axes, titles, (1.02, 1.02, None)):
        ax.set(title=title, xlabel='block', ylim=(0, high), xticks=x)
    axes[0].legend(fontsize=8), axes[1].legend(fontsize=8)
    dist = bottom.subplots(1, len(ms), sharey=True)
    for ax, k in zip(dist, ms):
        given = first(r, k)['maps_given']
        for i, heads in enumerate(r['attention_distance'][ms[k][0]]):
            ax.scatter([i] * len(heads), heads, s=18, edgecolors=colour[k],
                       facecolors='none' if i in given else colour[k])
        ax.axhline(r['uniform_distance'], color='black', ls='--', lw=1, label='a uniform map')
        ax.set(title=ms[k][0] + ' (hollow: maps given)' * bool(given), xlabel='block', xticks=x)
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
