"""
features.py's report: its numbers as tables, one figure and a page (README.md), and features.json with every
number. Reads only the plain dict `analyse` returns, so a report can be re-made from features.json.
"""
import os
import statistics

from matplotlib.figure import Figure   # no pyplot: no global state, rendered by Agg

from tools import palette
from util.files import check_out_dir, read_json, write_json, write_text

FILES = ('features.json', 'features.png', 'README.md')


def check_out(out_dir):
    """Refuse, before any work, an --out-dir that cannot be written, or that holds a README.md or features.png
    that features.py did not write (no features.json beside them): only its own results are replaced."""
    check_out_dir(out_dir, '--out-dir', 'features.json', FILES)
    path = os.path.join(out_dir, 'features.json')
    if os.path.exists(path):
        read_json(path, 'choose another --out-dir, or remove it if it is yours', {'result': dict})

# -----------------------------------------------------------------------------
# Tables: one row per method, or per pair of methods (features.py's groups: seeds pooled)


def others(r):
    return [k for k in r['models'] if k != r['teacher']]


def methods(r):
    """{method: [its models, by seed]}, the teacher's first."""
    out = {}
    for k, m in r['models'].items():
        out.setdefault(m.get('method', k), []).append(k)
    return out


def mean(values):
    return statistics.fmean(values)


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
    ms = {k: v for k, v in methods(r).items() if r['models'][v[0]]['top1'] is not None}
    seeds = max(len(v) for v in ms.values())
    cells = lambda v: ' | '.join(f"{r['models'][m]['top1']:.2f}" for m in v) + ' |' * (seeds - len(v))
    rows = [f"| {k} | {cells(v)} | "
            f"{pm(spread_of([r['models'][m]['top1'] for m in v]))} |" for k, v in ms.items()]
    return '\n'.join([f"| top-1 (%) | {' | '.join(f'model {i + 1}' for i in range(seeds))} | mean ± std |",
                      f"|---|{'---:|' * (seeds + 1)}", *rows])


def spread_of(values):
    return {'mean': mean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0}


def cka_table(r, key):
    rows = [f"| {group_name(g)} | {len(g['pairs'])} | {' | '.join(pm(s) for s in g[key])} |" for g in ordered(r)]
    head = blocks_header(r, 'linear CKA').split('\n')
    return '\n'.join([head[0].replace(' | block 0', ' | pairs | block 0'), '|---|---:|' + head[1][5:], *rows])


def interval_line(r):
    b = r.get('bootstrap')
    if not b:
        return ''
    width = max((s['interval'][1] - s['interval'][0]) / 2 for g in r['groups'] for s in g['tokens'])
    return (f"Cells: the mean over the pairs ± their standard deviation (the seeds' spread). Resampling the test "
            f"images ({b['resamples']} resamples of the {b['cka_units']} batches they were run in, seed "
            f"{b['seed']}), no cell's mean has a {100 * b['level']:.0f}% interval wider than ±{width:.3f}; each pair's "
            f"and each cell's interval: features.json.")


def per_method(r, what, k, i):
    return [v for m in methods(r)[k] for v in r[what][m][i]]


def kl_table(r):
    """KL of each method's maps to the teacher's per block, mean over heads and seeds; a copied layer's maps are given."""
    def cell(k, i):   # a KL is >= 0: rounding's -0.00 shown as 0.00
        m = r['models'][methods(r)[k][0]]
        return 'given' if i in m['maps_given'] else \
            f"{round(mean(per_method(r, 'kl', k, i)), 2) + 0.0:.2f}" + ('†' if i in m['maps_distilled'] else '')
    ks = [k for k in methods(r) if k != r['teacher']]
    rows = [f"| {k} | {' | '.join(cell(k, i) for i in range(r['depth']))} |" for k in ks]
    entropy = [f'{mean(h):.2f}' for h in r['cross_entropy'][r['teacher']]]    # its CE to itself
    return '\n'.join([blocks_header(r, 'KL to the teacher (nats)'), *rows,
                      f"| *the teacher's entropy* | {' | '.join(entropy)} |"])


def distance_table(r):
    def cell(k, i):
        d = per_method(r, 'attention_distance', k, i)
        return f'{mean(d):.1f} ({min(d):.1f}-{max(d):.1f})' + ('*' if i in r['models'][methods(r)[k][0]]['maps_given'] else '')
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
    """Every table, as printed by features.py and placed in README.md."""
    b = r.get('bootstrap')
    return '\n\n'.join(x for x in [
        "Top-1 on these images, fp32 (each method's models in the order given):", top1_table(r),
        f"Linear CKA, every token of {r['images']} images a sample, block i against block i: each method against "
        f"the teacher, each against itself (two seeds: the control), each against another (models of different "
        f"seeds):", cka_table(r, 'tokens'), interval_line(r),
        ('Linear CKA, the class token alone. A global-pool classifier never reads it (it averages the patch '
         'tokens); it is one more token the patches read from (column 0 of every map), so this measures how alike '
         "that token's features are, not what the classifier reads:" if all(
             m.get('global_pool') for k, m in r['models'].items() if k != r['teacher']) else
         'Linear CKA, the class token (what the classifier reads):'), cka_table(r, 'class_token'),
        "Attention maps against the teacher's, KL per block (mean over heads and seeds); † distilled toward them:",
        kl_table(r),
        f"Mean attention distance per block, mean over heads and seeds (shortest-longest head); * maps given; a "
        f"uniform map: {r['uniform_distance']:.1f} px:", distance_table(r),
        'Predictions, each pair of classifiers as a two-model ensemble (the mean of their probabilities), mean over '
        'the pairs' + (f" [its {100 * b['level']:.0f}% interval, resampling the test images one by one, "
                       f"{b['resamples']} resamples]" if b else '') + ':', prediction_table(r)] if x)

# -----------------------------------------------------------------------------
# The figure


def plot(r, path):
    """Top: CKA to the teacher per block, each method's mean over seeds (bars: their range), its seed-to-seed
    control dashed; the distilled student against the others beside the controls (bands: their range); the maps'
    KL to the teacher's. Bottom: each head's attention distance per block, the teacher and each method's first
    model (maps given: hollow). Each method in its colour (tools/palette.py). Returns the figure."""
    ms, depth, t = methods(r), r['depth'], r['teacher']
    names = [k for k in ms if k != t]
    colour = {k: palette.colour('teacher' if k == t else k, f'C{i}') for i, k in enumerate(ms)}   # one per method
    fig = Figure(figsize=(3.2 * len(ms), 7.5), layout='constrained')
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.2, 1])
    axes = top.subplots(1, 3)
    group = {(g['a'], g['b']): g for g in r['groups']}
    x = range(depth)
    line = lambda ax, g, c, **kw: ax.errorbar(x, [s['mean'] for s in g['tokens']], capsize=2, color=c, yerr=[
        [s['mean'] - s['min'] for s in g['tokens']], [s['max'] - s['mean'] for s in g['tokens']]], **kw)
    for k in names:
        line(axes[0], group[t, k], colour[k], fmt='o-', label=k)
        if (k, k) in group:
            axes[0].plot(x, [s['mean'] for s in group[k, k]['tokens']], ls='--', color=colour[k], lw=1)
    axes[0].set(title='CKA to the teacher (dashed: seed to seed)', xlabel='block', ylim=(0, 1.02), xticks=x)
    focus = 'distill' if 'distill' in names else names[-1]
    for k in names:
        if (k, k) in group:
            c = group[k, k]['tokens']
            axes[1].fill_between(x, [s['min'] for s in c], [s['max'] for s in c], color=colour[k], alpha=0.2)
        pair = group.get((k, focus)) or group.get((focus, k))
        if k != focus and pair:
            line(axes[1], pair, colour[k], fmt='o-', label=f'{focus} vs {k}')
    axes[1].set(title=f'CKA of {focus} to the others (bands: seed to seed)', xlabel='block', ylim=(0, 1.02), xticks=x)
    for k in names:
        kl = [mean(per_method(r, 'kl', k, i)) for i in x]
        own = [i for i in x if i not in r['models'][ms[k][0]]['maps_given']]
        axes[2].plot(own, [kl[i] for i in own], 'o-', color=colour[k], label=k)
    axes[2].set(title="attention maps: KL to the teacher's (nats)", xlabel='block', xticks=x, ylim=(0, None))
    axes[0].legend(fontsize=8), axes[1].legend(fontsize=8)
    dist = bottom.subplots(1, len(ms), sharey=True)
    for ax, k in zip(dist, ms):
        first = ms[k][0]
        given = r['models'][first]['maps_given']
        for i, heads in enumerate(r['attention_distance'][first]):
            ax.scatter([i] * len(heads), heads, s=18, edgecolors=colour[k],
                       facecolors='none' if i in given else colour[k])
        ax.axhline(r['uniform_distance'], color='black', ls='--', lw=1, label='a uniform map')
        ax.set(title=first + (' (hollow: maps given)' if given else ''), xlabel='block', xticks=x)
    dist[0].legend(fontsize=8)
    dist[0].set_ylabel('mean attention distance (px)')
    bottom.suptitle(f"each head's mean attention distance, {r['images']} test images (the axis does not start at 0)",
                    fontsize=10)
    fig.savefig(path, dpi=110)
    return fig

# -----------------------------------------------------------------------------
# What the numbers say: one paragraph whose every word of comparison is chosen by the numbers


def span(values):
    lo, hi = (f'{round(v, 2) + 0.0:.2f}' for v in (min(values), max(values)))   # never -0.00
    return lo if lo == hi else f'{lo}-{hi}'


def blocks_named(layers):
    return f'block {layers[0]}' if len(layers) == 1 else f'blocks {layers[0]}-{layers[-1]}' \
        if layers == list(range(layers[0], layers[-1] + 1)) else 'blocks ' + ', '.join(map(str, layers))


def claims(r):
    """The numbers the conclusion rests on, as the page, the README and the notebook print them (their tests compare
    these with their text); None without scratch, finetune and distill, each with a seed-to-seed control."""
    ms, t, depth = methods(r), r['teacher'], r['depth']
    group = {(g['a'], g['b']): g for g in r['groups']}
    g = lambda a, b: group.get((a, b)) or group.get((b, a))
    if not all(k in ms for k in ('scratch', 'finetune', 'distill')) or not all(g(k, k) for k in ('scratch', 'finetune', 'distill')):
        return None
    taught = r['models'][ms['distill'][0]]['maps_distilled'] or list(range(depth))
    at = lambda a, b, layers=taught: [g(a, b)['tokens'][i]['mean'] for i in layers]
    # as alike to the teacher as to another distilled seed: at least the lowest of the seed-to-seed pairs' CKA
    close = [i for i in range(depth) if at(t, 'distill', [i])[0] >= g('distill', 'distill')['tokens'][i]['min']]
    apart = [i for i in range(depth) if i not in close]
    fd, ff = g('finetune', 'distill')['predictions'], g('finetune', 'finetune')['predictions']
    return {'g': g, 'at': at, 'taught': taught, 'close': close, 'apart': apart, 'seeds': len(ms['distill']),
            'fd': fd, 'ff': ff, 'taught_blocks': blocks_named(taught),
            'close_blocks': blocks_named(close) if close else None, 'apart_blocks': blocks_named(apart) if apart else None,
            'teacher_close': span(at(t, 'distill', close)) if close else None,
            'seeds_close': span(at('distill', 'distill', close)) if close else None,
            'teacher_apart': span(at(t, 'distill', apart)) if apart else None,
            'scratch_seeds': span(at('scratch', 'scratch')), 'teacher_scratch': span(at(t, 'scratch')),
            'gain_fd': f"{fd['gain']['mean']:+.2f}", 'gain_ff': f"{ff['gain']['mean']:+.2f}",
            'differs_fd': f"{100 * fd['disagreement']['mean']:.1f}%", 'differs_ff': f"{100 * ff['disagreement']['mean']:.1f}%"}


def reading(r, data):
    """The page's conclusion: the two questions "its own features" asks, each answered from the numbers for the
    methods reproduce.py names (scratch, finetune, distill, each with a seed-to-seed control), then the
    predictions against the same control, then what they do not show. '' without those."""
    c = claims(r)
    if c is None:
        return ''
    n, depth = c['seeds'], r['depth']
    b = r.get('bootstrap')
    limits = (f"What they do not show: {n} seeds of each method give a spread, not a distribution"
              + (f"; the intervals resample the {r['images']} test images (for CKA in the {b['cka_units']} batches "
                 f"they were run in), not the training" if b else '')
              + "; linear CKA sees only how linearly alike two sets of features are, not whether a model computes "
                f"them the same way; and this is a {depth}-block ViT on {data}, 3 epochs a method")
    return (f"What this shows, for {n} seeds of each method of a {depth}-block ViT on {data}. Whether a student's "
            f"features are \"its own\" asks two questions: were they learned rather than copied, and how alike "
            f"are they to the teacher's? First, " + '. '.join([*on_features(r, c), *on_predictions(c), limits]) + '.')


def on_features(r, c):
    """The sentences on the maps taken and the features: learned rather than copied, and how alike to the teacher's."""
    t, depth, n = r['teacher'], r['depth'], c['seeds']
    g, at, taught, close, apart = (c[k] for k in ('g', 'at', 'taught', 'close', 'apart'))
    kl = lambda k, layers: [mean(per_method(r, 'kl', k, i)) for i in layers]
    labels = [i for i in close if at(t, 'distill', [i])[0] > at('scratch', 'scratch', [i])[0]]
    maps = (f"the distilled students took the maps they were taught (KL to the teacher's {span(kl('distill', taught))} "
            f"nats in {blocks_named(taught)}, mean over {n} seeds; the scratch models' {span(kl('scratch', taught))})")
    learned = (f"Learned rather than copied? Yes: no weight of the teacher's reaches a distilled student (it starts from "
               f"random weights, as a scratch model does, and only its maps are pulled toward the teacher's), where a "
               f"fine-tuned model starts from all of them; and the maps do not fix the features: two distilled seeds "
               f"have a CKA of {span(at('distill', 'distill'))} to each other in {blocks_named(taught)}, not 1")
    alike = ("How alike to the teacher's? The yardstick is how alike two seeds of one recipe are: in "
             f"{blocks_named(taught)} two scratch seeds reach {span(at('scratch', 'scratch'))}, two fine-tuned "
             f"{span(at('finetune', 'finetune'))}, two distilled {span(at('distill', 'distill'))}, while the teacher and "
             f"a scratch model reach only {span(at(t, 'scratch'))}. "
             + (f"In {blocks_named(close)} the distilled students are at least as alike to the teacher "
                f"({span(at(t, 'distill', close))}) as their least alike pair is to each other "
                f"({span([g('distill', 'distill')['tokens'][i]['min'] for i in close])}; the mean over their pairs "
                f"{span(at('distill', 'distill', close))})"
                + (f", and more than two scratch seeds are to each other in {len(labels)} of them" if labels else '')
                + ': there, to linear CKA, the teacher is one more seed of distillation' if close else
                'In no block are the distilled students as alike to the teacher as to each other')
             + (f"; in {blocks_named(apart)} they are less alike to it ({span(at(t, 'distill', apart))}) than to each "
                f"other ({span(at('distill', 'distill', apart))})" if apart else ''))
    cross = [i for i in range(depth) if at('finetune', 'distill', [i])[0] < min(at('finetune', 'finetune', [i])[0],
                                                                                 at('distill', 'distill', [i])[0])]
    between = (f"A fine-tuned and a distilled model (pairs of different seeds) are less alike than two seeds of either "
               f"in {len(cross)} of {depth} blocks (CKA {span(at('finetune', 'distill', range(depth)))}, against "
               f"{span(at('finetune', 'finetune', range(depth)))} and {span(at('distill', 'distill', range(depth)))})")
    return [maps, learned, alike, between]


def on_predictions(c):
    """The sentences on the predictions against the same control, and what the controls change in the reading."""
    g, close, apart, fd, ff = (c[k] for k in ('g', 'close', 'apart', 'fd', 'ff'))
    d_given_f = fd['b_wrong_given_a_wrong' if g('finetune', 'distill')['a'] == 'finetune' else 'a_wrong_given_b_wrong']
    iv = lambda s, k=100, f='.1f': f"{k * s['mean']:{f}}" + (f" [{k * s['interval'][0]:{f}}, {k * s['interval'][1]:{f}}]"
                                                            if 'interval' in s else '')
    sep = lambda a, b: 'interval' in a and (a['interval'][0] > b['interval'][1] or b['interval'][0] > a['interval'][1])
    word = lambda a, b: ('more than' if a['mean'] > b['mean'] else 'less than') if sep(a, b) else \
        'no more than' if a['mean'] <= b['mean'] else 'about as much as'
    preds = (f"The predictions, against the same control: a fine-tuned and a distilled model disagree on "
             f"{iv(fd['disagreement'])}% of the images, {word(fd['disagreement'], ff['disagreement'])} two fine-tuned "
             f"seeds ({iv(ff['disagreement'])}%); the distilled model is wrong on {iv(d_given_f, f='.0f')}% of the "
             f"images the fine-tuned one gets wrong (another fine-tuned seed: {iv(ff['b_wrong_given_a_wrong'], f='.0f')}%); "
             f"and the ensemble fine-tuned + distilled gains {iv(fd['gain'], 1, '+.2f')} points over the better of "
             f"its two, {word(fd['gain'], ff['gain'])} the ensemble of two fine-tuned seeds ({iv(ff['gain'], 1, '+.2f')}; "
             f"top-1 {fd['top1_ensemble']['mean']:.2f} against {ff['top1_ensemble']['mean']:.2f})")
    weaker = fd['gain']['mean'] <= ff['gain']['mean']
    so = ("So the controls change the one-seed reading. " + (
          f"That its features are near the teacher's holds in {blocks_named(close)}, but with a yardstick: learned, not copied, the "
          f"distilled features there are as near the teacher's as a second distilled seed's are to the first's"
          + (f"; in {blocks_named(apart)} they are nearer each other's than the teacher's" if apart else '')
          if close else "In no block are the distilled features as near the teacher's as to another distilled seed's")
          + ('. And the ensemble\'s gain is no sign of features unlike the fine-tuned model\'s: a second fine-tuned seed adds as much to '
             'the first as the distilled student does' + (', though it disagrees with the fine-tuned model more often '
             'than a second fine-tuned seed does' if sep(fd['disagreement'], ff[
                 'disagreement']) and fd['disagreement']['mean'] > ff['disagreement']['mean'] else '') if weaker else
             '. The ensemble with the distilled student gains more than a second fine-tuned seed adds'))
    return [preds, so]


# -----------------------------------------------------------------------------
# The page and features.json


def page(cfg, r, prov, out_dir):
    took = f"{prov['wall_s']:.0f} s" if prov['wall_s'] < 120 else f"{prov['wall_s'] / 60:.1f} min"
    code = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'features.py'), out_dir)
    teacher = 'only' if r['models'][r['teacher']]['top1'] is None else 'and predictions'
    models = ', '.join(f'{k} `{p}`' for k, p in zip(others(r), cfg['models']))
    origin = ' ([where each came from](models/README.md))' if os.path.isfile(
        os.path.join(out_dir, 'models', 'README.md')) else ''
    return f"""# Does the student learn features of its own?

Made by `{prov['command']}` on {prov['machine']} (`--device {prov['device']}`, torch {prov['torch']}, git commit
{prov['git_commit'] or 'unknown'}) in {took}: one pass over the first {r['images']} images of the
{cfg['data']} test split, fp32, no autocast. Every number is in [`features.json`](features.json); what each
measures and how: [`tools/features.py`]({code}). Teacher `{cfg['teacher']}` (features and maps {teacher});
{models}{origin}. Each block is compared with the block of the same index.

![features](features.png)

{summary(r)}
"""


def write(out_dir, cfg, r, prov):
    """features.png, README.md (the tables, and what they show: reading) and features.json in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    plot(r, os.path.join(out_dir, 'features.png'))
    text = reading(r, cfg['data'])
    write_text(os.path.join(out_dir, 'README.md'), page(cfg, r, prov, out_dir) + (f'\n{text}\n' if text else ''))
    write_json(os.path.join(out_dir, 'features.json'), {'config': cfg, **prov, 'result': r})
