"""
features.py's report: its numbers as tables, one figure and a page (README.md), and features.json with every
number. Reads only the plain dict `analyse` returns, so a report can be re-made from features.json.
"""
import os
import statistics

from matplotlib.figure import Figure   # no pyplot: no global state, rendered by Agg

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
# Tables


def others(r):
    return [k for k in r['models'] if k != r['teacher']]


def pairs(r):
    """The CKA pairs, each model against the teacher first, then the models against each other."""
    return sorted(r['cka'], key=lambda p: (r['teacher'] not in (p['a'], p['b']),))


def mean(values):
    return statistics.fmean(values)


def blocks_header(r, first):
    return (f"| {first} | {' | '.join(f'block {i}' for i in range(r['depth']))} |\n"
            f"|---|{'---:|' * r['depth']}")


def cka_table(r, key):
    rows = [f"| {p['a']} vs {p['b']} | {' | '.join(f'{v:.2f}' for v in p[key])} |" for p in pairs(r)]
    return '\n'.join([blocks_header(r, 'linear CKA'), *rows])


def kl_table(r):
    """KL of each model's maps to the teacher's per block, mean over heads; a copied layer's maps are given."""
    def cell(k, i):   # a KL is >= 0: rounding's -0.00 shown as 0.00
        m = r['models'][k]
        return 'given' if i in m['maps_given'] else \
            f"{round(mean(r['kl'][k][i]), 2) + 0.0:.2f}" + ('†' if i in m['maps_distilled'] else '')
    rows = [f"| {k} | {' | '.join(cell(k, i) for i in range(r['depth']))} |" for k in others(r)]
    entropy = [f'{mean(h):.2f}' for h in r['cross_entropy'][r['teacher']]]    # its CE to itself
    return '\n'.join([blocks_header(r, 'KL to the teacher (nats)'), *rows,
                      f"| *the teacher's entropy* | {' | '.join(entropy)} |"])


def distance_table(r):
    def cell(k, i):
        d = r['attention_distance'][k][i]
        return f'{mean(d):.1f} ({min(d):.1f}-{max(d):.1f})' + ('*' if i in r['models'][k]['maps_given'] else '')
    rows = [f"| {k} | {' | '.join(cell(k, i) for i in range(r['depth']))} |" for k in r['models']]
    return '\n'.join([blocks_header(r, 'attention distance (px)'), *rows])


def agreement_table(r):
    pct = lambda v: '' if v is None else f'{100 * v:.1f}'
    rows = [f"| {p['a']} vs {p['b']} | {p['top1_a']:.2f} / {p['top1_b']:.2f} | {p['top1_ensemble']:.2f} | "
            f"{pct(p['disagreement'])} | {pct(p['both_wrong'])} | {pct(p['b_wrong_given_a_wrong'])} vs "
            f"{pct(p['err_b'])} | {pct(p['a_wrong_given_b_wrong'])} vs {pct(p['err_a'])} |" for p in r['agreement']]
    return '\n'.join(['| a vs b | top-1 a / b | ensemble | top-1 differs % | both wrong % | '
                      'P(b wrong given a wrong) vs P(b wrong) % | P(a wrong given b wrong) vs P(a wrong) % |',
                      '|---|---:|---:|---:|---:|---:|---:|', *rows])


def summary(r):
    """Every table, as printed by features.py and placed in README.md."""
    return '\n\n'.join([
        f"Linear CKA, every token of {r['images']} images a sample:", cka_table(r, 'tokens'),
        'Linear CKA, the class token:', cka_table(r, 'class_token'),
        "Attention maps against the teacher's, KL per block (mean over heads); † distilled toward them:", kl_table(r),
        f"Mean attention distance per block, mean over heads (shortest-longest head); * maps given; a uniform "
        f"map: {r['uniform_distance']:.1f} px:",
        distance_table(r), 'Predictions:', agreement_table(r)])

# -----------------------------------------------------------------------------
# The figure


def plot(r, path):
    """Top: CKA to the teacher per block (all tokens, class token) and the maps' KL to the teacher's. Bottom:
    each head's attention distance per block, the teacher and each model (maps given: hollow)."""
    names, depth = list(r['models']), r['depth']
    colour = {k: f'C{i}' for i, k in enumerate(names)}
    fig = Figure(figsize=(3 * len(names), 7), layout='constrained')
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    axes = top.subplots(1, 3)
    to_teacher = {p['b'] if p['a'] == r['teacher'] else p['a']: p for p in r['cka'] if r['teacher'] in (p['a'], p['b'])}
    for ax, key, title in ((axes[0], 'tokens', 'every token'), (axes[1], 'class_token', 'class token')):
        for k in others(r):
            ax.plot(range(depth), to_teacher[k][key], 'o-', color=colour[k], label=k)
        ax.set(title=f"linear CKA to the teacher: {title}", xlabel='block', ylim=(0, 1.02), xticks=range(depth))
    for k in others(r):
        kl = [mean(v) for v in r['kl'][k]]
        own = [i for i in range(depth) if i not in r['models'][k]['maps_given']]
        axes[2].plot(own, [kl[i] for i in own], 'o-', color=colour[k], label=k)
    axes[2].set(title="attention maps: KL to the teacher's (nats)", xlabel='block', xticks=range(depth), ylim=(0, None))
    axes[0].legend(fontsize=8)
    dist = bottom.subplots(1, len(names), sharey=True)
    for ax, k in zip(dist, names):
        given = r['models'][k]['maps_given']
        for i, heads in enumerate(r['attention_distance'][k]):
            ax.scatter([i] * len(heads), heads, s=18, edgecolors=colour[k],
                       facecolors='none' if i in given else colour[k])
        ax.axhline(r['uniform_distance'], color='grey', ls='--', lw=1, label='a uniform map')
        ax.set(title=k + (' (hollow: maps given)' if given else ''), xlabel='block', xticks=range(depth))
    dist[0].legend(fontsize=8)
    dist[0].set_ylabel('mean attention distance (px)')
    bottom.suptitle(f"each head's mean attention distance, {r['images']} test images", fontsize=10)
    fig.savefig(path, dpi=110)

# -----------------------------------------------------------------------------
# What the numbers say: one paragraph whose every word of comparison is chosen by the numbers


def span(values):
    lo, hi = (f'{round(v, 2) + 0.0:.2f}' for v in (min(values), max(values)))   # never -0.00
    return lo if lo == hi else f'{lo}-{hi}'


def blocks_named(layers):
    return f'block {layers[0]}' if len(layers) == 1 else f'blocks {layers[0]}-{layers[-1]}' \
        if layers == list(range(layers[0], layers[-1] + 1)) else 'blocks ' + ', '.join(map(str, layers))


def reading(r, data):
    """The page's paragraph: what the numbers show for the methods reproduce.py names (scratch, finetune,
    distill; copy if there), and what they do not. '' without those three."""
    if not {'scratch', 'finetune', 'distill'} <= set(r['models']):
        return ''
    t, depth, m = r['teacher'], r['depth'], r['models']
    cka = {p['b'] if p['a'] == t else p['a']: p['tokens'] for p in r['cka'] if t in (p['a'], p['b'])}
    given = m['distill']['maps_distilled'] or list(range(depth))
    free = [i for i in range(depth) if i not in given]
    kl = lambda k, layers: [mean(r['kl'][k][i]) for i in layers]
    at = lambda k, layers: [cka[k][i] for i in layers]
    took = 2 * mean(kl('distill', given)) < mean(kl('scratch', given))
    closer = sum(cka['distill'][i] > cka['finetune'][i] for i in given)
    nearer = 2 * closer > len(given)
    last = {k: cka[k][-1] for k in others(r)}
    fd = next(p for p in r['agreement'] if {p['a'], p['b']} == {'finetune', 'distill'})
    f_, d_ = ('a', 'b') if fd['a'] == 'finetune' else ('b', 'a')
    d_given_f, ens, best = fd[f'{d_}_wrong_given_{f_}_wrong'], fd['top1_ensemble'], max(fd['top1_a'], fd['top1_b'])
    distances = [d for k in m for layer in r['attention_distance'][k] for d in layer]
    maps = (f"the distilled student {'took' if took else 'did not take'} the maps it was taught (KL to the "
            f"teacher's {span(kl('distill', given))} nats in its distilled {blocks_named(given)}, the scratch "
            f"model's {span(kl('scratch', given))}"
            + (f"; {span(kl('distill', free))} in {blocks_named(free)}, where it was free)" if free else ')'))
    features = (f"In those blocks its features are {'closer to' if nearer else 'no closer to'} the teacher's than "
                f"the fine-tuned model's, which started from the teacher's weights ({closer} of {len(given)} "
                f"blocks; linear CKA over every token {span(at('distill', given))}, fine-tuned "
                f"{span(at('finetune', given))}, scratch {span(at('scratch', given))}"
                + (f", the copy student's {span(at('copy', given))}" if 'copy' in cka else '')
                + f"); at the last block the CKA to the teacher is {span(list(last.values()))} over the models "
                f"(distilled {last['distill']:.2f}, scratch {last['scratch']:.2f})")
    so = ("So, by this measure, the distilled student's features are not its own in the blocks where it learned the "
          "teacher's maps: they are as near the teacher's as fine-tuning leaves them, or nearer"
          + (", and part from them toward the output" if last['distill'] < min(at('distill', given)) else '')
          if nearer else "So, by this measure, the distilled student's features are no nearer the teacher's than "
          "the fine-tuned model's")
    errors = (f"The fine-tuned and the distilled classifier disagree on {100 * fd['disagreement']:.1f}% of the "
              f"images and share {'most' if d_given_f > 0.5 else 'fewer than half'} of their errors (the distilled "
              f"student is wrong on {100 * d_given_f:.0f}% of the images the fine-tuned model gets wrong, on "
              f"{100 * fd[f'err_{d_}']:.0f}% of all); their ensemble, {ens:.2f} against {best:.2f} for the better "
              f"alone, {'gains' if ens > best else 'does not gain'} from the other {100 - 100 * d_given_f:.0f}%")
    limits = ("What they do not show: one seed gives no spread, and no control of two fine-tuned seeds against "
              "each other, which would say whether that disagreement is more than a seed alone gives; linear CKA "
              "sees only how linearly alike two sets of features are, not whether a model computes them the same way"
              + ('; the class token is read by none of these classifiers (they pool their patch tokens)'
                 if all(m[k]['global_pool'] for k in others(r)) else '')
              + f"; and on a {r['grid']} x {r['grid']} grid every head's mean attention distance lies within "
              f"{min(distances):.1f}-{max(distances):.1f} px (a uniform map: {r['uniform_distance']:.1f} px), with "
              f"none of the local and global heads that Dosovitskiy et al.'s Fig. 7 finds in ViTs trained on ImageNet")
    return f'What this shows, for one seed of a {depth}-block ViT on {data}: ' + '. '.join(
        [maps, features, so, errors, limits]) + '.'

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
