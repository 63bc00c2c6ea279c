"""The results pages are written by hand; every number they state is checked here against the files the run left:
a reproduction's RESULTS.md against its results.json (and the teacher checkpoint's record of how it was made), the
feature analysis's README.md against its features.json. Each kind of statement is read by one pattern whose
numbers are computed again here from those files; a number that no pattern reads fails the page, so that none
goes unchecked. The tables a page includes are the ones its TABLE.md / TABLES.md holds, and those are what the
tools make now from the committed JSON. The reader itself is tested on pages with one number changed."""
import json
import math
import os
import re
import shutil
import statistics
import time

import pytest

from conftest import ROOT
from util.checkpoints import read_checkpoint

# the paper's numbers (Li et al. 2024, Table 1: ImageNet-1K, ViT-L/16) and the phrases that describe its setting
PAPER = {'scratch': 83.0, 'finetune': 85.7, 'copy': 85.1, 'distill': 85.7, 'ensemble': 86.3}
PAPER_PHRASES = ("the paper's Table 1", 'ImageNet-1K, ViT-L/16, MAE teacher, 50-200 epochs on 64 GPUs')
# the aims of a miniature (results/fashion-mnist/VALIDATION.md): copy closes half the gap, distillation the
# paper's copy share; the ensemble beats fine-tuning alone
AIMS = {'copy': 50, 'distill': 78}
SHORT = {'scratch': 'scratch', 'finetune': 'fine-tune', 'copy': 'copy', 'distill': 'distillation',
         'ensemble': 'ensemble'}
REPRODUCTIONS = ['fashion-mnist', 'fashion-mnist-quick', 'fashion-mnist-quick-fp32']


def flat(text):
    return ' '.join(text.split())


def read(text, checks):
    """What in `text` disagrees with `checks`, [(pattern, want)]: each pattern must be found, and its groups be
    `want` (a tuple, or a function of the groups found that gives the tuple); what a pattern read is cut, and any
    number left over is one that no check reads."""
    problems = []
    for pattern, want in checks:
        found = re.search(pattern, text)
        if not found:
            problems.append(f'no statement of the form {pattern!r}')
            continue
        expected = tuple(want(found.groups()) if callable(want) else want)
        if found.groups() != expected:
            problems.append(f'{found[0]!r} states {found.groups()}, the data gives {expected}')
        text = text[:found.start()] + ' ' + text[found.end():]
    left = re.findall(r'\S*\d\S*', re.sub(r'(?i)\btop-1\b|\bfp32\b', '', text))   # names, not numbers
    return problems + ([f'numbers no check reads: {left}'] if left else [])


def chain(values, digits, names=SHORT):
    """'ensemble 90.08 > fine-tune 89.86 = ...': values from the highest, '=' where equal at the digits shown."""
    ranked = sorted(values.items(), key=lambda kv: -kv[1])
    out = f'{names[ranked[0][0]]} {ranked[0][1]:.{digits}f}'
    for (_, above), (k, v) in zip(ranked, ranked[1:]):
        out += f" {'=' if round(above, digits) == round(v, digits) else '>'} {names[k]} {v:.{digits}f}"
    return out

# -----------------------------------------------------------------------------
# A reproduction's RESULTS.md against its results.json


def lr_share(reached, epochs, warmup):
    """The lr at `reached` epochs as a share of the peak: linear warm-up, then half a cosine to 0."""
    if reached < warmup:
        return reached / warmup
    return 0.5 * (1 + math.cos(math.pi * (reached - warmup) / (epochs - warmup)))


def reproduction_checks(name, run, made):
    m = run['summary']['methods']
    mean = {k: v['mean'] for k, v in m.items()}
    stage = next(r for r in run['stages'] if r['stage'] in ('scratch', 'finetune', 'copy', 'distill'))
    given = dict(zip(stage['command'], stage['command'][1:]))
    epochs, warmup, reached = float(given['--epochs']), float(given['--warmup-epochs']), stage['metrics']['epoch']
    steps = int(given['--max-steps'])
    cut = (given['--max-steps'], f'{100 * reached / epochs:.0f}', f'{100 * lr_share(reached, epochs, warmup):.0f}') \
        if steps and reached < epochs else (None, None, None)
    seeds = run['config']['seeds']
    gap = {k: 100 * (mean[k] - mean['scratch']) / (mean['finetune'] - mean['scratch']) for k in AIMS}
    paper_gap = {k: 100 * (PAPER[k] - PAPER['scratch']) / (PAPER['finetune'] - PAPER['scratch']) for k in AIMS}

    def against_aim(k):
        return lambda g: (f'{gap[k]:.1f}', g[1], 'met' if gap[k] >= int(g[1]) else
                          f'missed by {int(g[1]) - gap[k]:.1f} points of gap',
                          None if gap[k] >= int(g[1]) else f'{int(g[1]) - gap[k]:.1f}', f'{paper_gap[k]:.1f}')
    over = mean['ensemble'] - mean['finetune']
    above = {k: mean[k] - mean['scratch'] for k in ('copy', 'distill')}
    typed = run['command']
    now = 'python -m tools.reproduce ' + typed[len('python reproduce.py '):] if typed.startswith('python reproduce.py ') \
        else typed
    root = next(os.path.dirname(os.path.dirname(r['run_dir'])) for r in run['stages'] if r['stage'] != 'mae')
    checks = [
        (r'a (\d+)-epoch schedule \(warm-up ([\d.]+) epoch, blr ([\d.]+)(?:, batch (\d+))?\)',
         (f'{epochs:g}', f'{warmup:g}', given.get('--blr'), given.get('--batch-size'))),
        (r'(?:run to its end|cut after (\d+) steps by --max-steps: (\d+)% of the way through it, its lr still (\d+)% '
         r'of the peak)', cut),
        (r'(\d+) seeds?: ([\d, ]+)\.', (str(len(seeds)), ', '.join(map(str, seeds)))),
        (r"Teacher: `([^`]+)` \(MAE, (\d+) epochs on the training split, held-out masked MSE ([\d.]+); made by `([^`]+)`",
         (run['config']['teacher'], f"{made['epoch']:.0f}", f"{made['held_out_mse']:.4f}", made['command'])),
        (r'\(per seed: ([^)]*)\)', (', '.join(f'{d:.2f}%' for d in run['summary']['disagreement_pct']),)),
        (r'all stages ([\d.]+) min, (\d+) at a time \((\d+) thread each\): reproduce\.py ran ([\d.]+) min',
         (f"{sum(r['wall_s'] for r in run['stages']) / 60:.1f}", str(run['config']['jobs']), run['stage_threads'],
          f"{run['wall_s'] / 60:.1f}")),
        (r'Order of the means here: ((?:[a-z-]+ \d+\.\d+ [>=] )+[a-z-]+ \d+\.\d+);', (chain(mean, 2),)),
        (r"the paper's: ((?:[a-z-]+ \d+\.\d [>=] )+[a-z-]+ \d+\.\d)\.", (chain(PAPER, 1),)),
        (r"attention copy closes ([\d.]+)% of the gap \(the aim: ≥ (\d+)%, (met|missed by ([\d.]+) points of gap)\); "
         r"the paper's, ([\d.]+)%", against_aim('copy')),
        (r"attention distillation closes ([\d.]+)% of the gap \(the aim: ≥ (\d+)%, (met|missed by ([\d.]+) points of "
         r"gap)\); the paper's, ([\d.]+)%", against_aim('distill')),
        (r"the ensemble is ([+-][\d.]+) points against fine-tuning alone \(the aim: above it, (met|missed by [\d.]+ "
         r"points)\); the paper's, ([+-][\d.]+)", (f'{over:+.2f}', 'met' if over > 0 else f'missed by {-over:.2f} points',
                                                   f"{PAPER['ensemble'] - PAPER['finetune']:+.1f}")),
        (r'- command: `([^`]+)`(?: \(run as `([^`]+)`, where the driver then was\))?',
         (now, typed) if now != typed else (typed, None)),
        (r'- git commit: ([0-9a-f]{40})', (run['git_commit'],)),
        (r'- machine: (.+?) - every stage', (run['machine'],)),
        (r'were `([^`]+)/<stage>/seed<k>`', (root,)),
        (r'`python -m tools\.reproduce_report results/([\w-]+)`', (name,)),
        (r'the run ended (\d{4}-\d\d-\d\d \d\d:\d\d) UTC',
         (time.strftime('%Y-%m-%d %H:%M', time.gmtime(max(r['started'] + r['wall_s'] for r in run['stages']))),)),
    ]
    if run['config']['quick']:
        checks.append((r'here (both|not both) transfer methods beat scratch \(copy ([+-][\d.]+), distillation '
                       r'([+-][\d.]+) points\)', ('both' if min(above.values()) > 0 else 'not both',
                                                  f"{above['copy']:+.2f}", f"{above['distill']:+.2f}")))
    return checks


def reproduction(name):
    folder = os.path.join(ROOT, 'results', name)
    with open(os.path.join(folder, 'results.json')) as f:
        run = json.load(f)
    made = read_checkpoint(os.path.join(ROOT, run['config']['teacher']))['made']
    with open(os.path.join(folder, 'RESULTS.md'), encoding='utf-8') as f:
        return name, run, made, f.read()


def reproduction_problems(name, run, made, page):
    from tools.reproduce_report import table
    text = page.replace(table(run['summary']), '')            # the generated table, checked where it is made
    for phrase in PAPER_PHRASES:
        text = text.replace(phrase, '')
    return read(flat(text), reproduction_checks(name, run, made))


@pytest.mark.parametrize('name', REPRODUCTIONS)
def test_a_reproductions_page_states_its_numbers(name):
    _, run, made, page = reproduction(name)
    from tools.reproduce_report import table
    assert table(run['summary']) in page, 'the page does not include the table of its results.json'
    assert reproduction_problems(name, run, made, page) == []


@pytest.mark.parametrize('name', REPRODUCTIONS)
def test_a_reproductions_tables_are_made_from_its_results_json(name, tmp_path):
    """TABLE.md as `python -m tools.reproduce_report` makes it now from the committed results.json."""
    from tools.reproduce_report import rewrite
    shutil.copyfile(os.path.join(ROOT, 'results', name, 'results.json'), tmp_path / 'results.json')
    rewrite(str(tmp_path))
    with open(os.path.join(ROOT, 'results', name, 'TABLE.md'), encoding='utf-8') as f:
        assert (tmp_path / 'TABLE.md').read_text(encoding='utf-8') == f.read()


@pytest.mark.parametrize('old, new, found', [
    ('closes 29.5% of the gap', 'closes 29.6% of the gap', "the data gives ('29.5'"),
    ('missed by 20.5 points', 'missed by 20.4 points', "'missed by 20.5 points of gap'"),
    ('(per seed: 6.65%,', '(per seed: 6.66%,', '6.65%, 6.92%, 6.90%'),
    ('ensemble 90.08 > fine-tune 89.86', 'fine-tune 89.86 > ensemble 90.08', 'ensemble 90.08 > fine-tune 89.86'),
    ('reproduce.py ran 41.5 min', 'reproduce.py ran 40.5 min', "'41.5'"),
    ('3 seeds: 0, 1, 2', '3 seeds: 0, 1, 3', "'0, 1, 2'"),
    ('MSE 0.3881', 'MSE 0.3871', "'0.3881'"),
    ('the run ended 2026-11-23 11:55', 'the run ended 2026-11-23 11:45', "'2026-11-23 11:55'"),
    ('on the training split,', 'on the training split in 5 minutes,', "numbers no check reads: ['5']"),
    ('the budget the README calls', 'the one budget the README calls', None),
])
def test_the_reader_finds_a_changed_number(old, new, found):
    name, run, made, page = reproduction('fashion-mnist')
    assert old in page
    problems = reproduction_problems(name, run, made, page.replace(old, new, 1))
    if found is None:   # words changed, no number: nothing to find
        assert problems == []
    else:
        assert len(problems) == 1 and found in problems[0], problems

# -----------------------------------------------------------------------------
# The feature analysis's README.md against its features.json


FEATURES = os.path.join(ROOT, 'results', 'fashion-mnist', 'features')
BLOCKS, SPAN = r'(blocks? \d+(?:-\d+)?(?:, \d+)*)', r'(\d\.\d\d(?:-\d\.\d\d)?)'
IV = r'([+-]?[\d.]+ \[[+-]?[\d.]+, [+-]?[\d.]+\])'
COMPARED = r'(more than|less than|no more than|about as much as)'
FIXED = ('column 0 of every map',)    # the class token is token 0 of every map, whatever the data


def span(values):
    """'0.55-0.70': the lowest and the highest at two digits (one number when they agree; never -0.00)."""
    lo, hi = (f'{round(v, 2) + 0.0:.2f}' for v in (min(values), max(values)))
    return lo if lo == hi else f'{lo}-{hi}'


def named(layers):
    """'block 3', 'blocks 0-4', 'blocks 0, 2, 5'."""
    layers = list(layers)
    if len(layers) == 1:
        return f'block {layers[0]}'
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f'blocks {layers[0]}-{layers[-1]}'
    return 'blocks ' + ', '.join(map(str, layers))


def feature_facts(r):
    """What the sentences about features rest on, from features.json's result: each pair of methods' CKA per block
    (`at`), the blocks the distilled students were taught, those where they are as alike to the teacher as their
    least alike pair is to each other (`close`) and the others (`apart`), the predictions of a fine-tuned and a
    distilled model (`fd`) against two fine-tuned seeds (`ff`), and the numbers as the pages write them."""
    groups = {(g['a'], g['b']): g for g in r['groups']}
    g = lambda a, b: groups.get((a, b)) or groups.get((b, a))
    models = {}
    for k, m in r['models'].items():
        models.setdefault(m['method'], []).append(k)
    t, depth = r['teacher'], r['depth']
    taught = r['models'][models['distill'][0]]['maps_distilled'] or list(range(depth))
    at = lambda a, b, layers=taught: [g(a, b)['tokens'][i]['mean'] for i in layers]
    close = [i for i in range(depth) if at(t, 'distill', [i])[0] >= g('distill', 'distill')['tokens'][i]['min']]
    apart = [i for i in range(depth) if i not in close]
    fd, ff = g('finetune', 'distill')['predictions'], g('finetune', 'finetune')['predictions']
    return {'g': g, 'at': at, 'models': models, 'taught': taught, 'close': close, 'apart': apart, 'fd': fd, 'ff': ff,
            'seeds': len(models['distill']), 'close_blocks': named(close), 'apart_blocks': named(apart),
            'teacher_close': span(at(t, 'distill', close)), 'seeds_close': span(at('distill', 'distill', close)),
            'teacher_apart': span(at(t, 'distill', apart)), 'scratch_seeds': span(at('scratch', 'scratch')),
            'gain_fd': f"{fd['gain']['mean']:+.2f}", 'gain_ff': f"{ff['gain']['mean']:+.2f}"}


def interval(s, k=100, f='.1f'):
    return f"{k * s['mean']:{f}} [{k * s['interval'][0]:{f}}, {k * s['interval'][1]:{f}}]"


def compared(a, b):
    """How a page words a against b: 'more than' / 'less than' only where their intervals do not overlap."""
    if a['interval'][0] > b['interval'][1] or b['interval'][0] > a['interval'][1]:
        return 'more than' if a['mean'] > b['mean'] else 'less than'
    return 'no more than' if a['mean'] <= b['mean'] else 'about as much as'


def feature_checks(record, epochs):
    r, cfg, c = record['result'], record['config'], feature_facts(record['result'])
    t, depth, n, at, g, b = r['teacher'], r['depth'], c['seeds'], c['at'], c['g'], r['bootstrap']
    kl = lambda k: [statistics.fmean(h for m in c['models'][k] for h in r['kl'][m][i]) for i in c['taught']]
    took = f"{record['wall_s'] / 60:.1f} min" if record['wall_s'] >= 120 else f"{record['wall_s']:.0f} s"
    width = max((s['interval'][1] - s['interval'][0]) / 2 for x in r['groups'] for s in x['tokens'])
    scratch_close = [i for i in c['close'] if at(t, 'distill', [i])[0] > at('scratch', 'scratch', [i])[0]]
    cross = [i for i in range(depth) if at('finetune', 'distill', [i])[0] < min(at('finetune', 'finetune', [i])[0],
                                                                                 at('distill', 'distill', [i])[0])]
    every = range(depth)
    fd, ff = c['fd'], c['ff']
    wrong = fd['b_wrong_given_a_wrong' if g('finetune', 'distill')['a'] == 'finetune' else 'a_wrong_given_b_wrong']
    names = [k for k in r['models'] if k != t]
    return [
        (r'Made by `([^`]+)`', (record['command'],)),
        (r"on (.+?) \(`--device (\w+)`, torch (\S+), git commit ([0-9a-f]{40})\) in ([\d.]+ (?:min|s)):",
         (record['machine'], record['device'], record['torch'], record['git_commit'], took)),
        (r'one pass over the first (\d+) images of the (\S+) test split', (str(r['images']), cfg['data'])),
        (r"Teacher `([^`]+)` \(features and maps (only|and predictions)\); (.+?) \(\[where each came from\]",
         (cfg['teacher'], 'only' if r['models'][t]['top1'] is None else 'and predictions',
          ', '.join(f'{k} `{p}`' for k, p in zip(names, cfg['models'])))),
        (r'every token of (\d+) images a sample', (str(r['images']),)),
        (r"\((\d+) resamples of the (\d+) batches they were run in, seed (\d+)\), no cell's mean has a (\d+)% "
         r"interval wider than ±([\d.]+);", (str(b['resamples']), str(b['cka_units']), str(b['seed']),
                                            f"{100 * b['level']:.0f}", f'{width:.3f}')),
        (r'a uniform map: ([\d.]+) px', (f"{r['uniform_distance']:.1f}",)),
        (r'\[its (\d+)% interval, resampling the test images one by one, (\d+) resamples\]',
         (f"{100 * b['level']:.0f}", str(b['resamples']))),
        (r'What this shows, for (\d+) seeds of each method of a (\d+)-block ViT on (\S+)\.',
         (str(n), str(depth), cfg['data'])),
        (rf"KL to the teacher's {SPAN} nats in {BLOCKS}, mean over (\d+) seeds; the scratch models' {SPAN}\)",
         (span(kl('distill')), named(c['taught']), str(n), span(kl('scratch')))),
        (rf'two distilled seeds have a CKA of {SPAN} to each other in {BLOCKS}, not 1',
         (span(at('distill', 'distill')), named(c['taught']))),
        (rf'in {BLOCKS} two scratch seeds reach {SPAN}, two fine-tuned {SPAN}, two distilled {SPAN}, while the '
         rf'teacher and a scratch model reach only {SPAN}\.',
         (named(c['taught']), c['scratch_seeds'], span(at('finetune', 'finetune')), span(at('distill', 'distill')),
          span(at(t, 'scratch')))),
        (rf'In {BLOCKS} the distilled students are at least as alike to the teacher \({SPAN}\) as their least alike '
         rf'pair is to each other \({SPAN}; the mean over their pairs {SPAN}\), and more than two scratch seeds are '
         r'to each other in (\d+) of them', (c['close_blocks'], c['teacher_close'], span(
             [g('distill', 'distill')['tokens'][i]['min'] for i in c['close']]), c['seeds_close'],
             str(len(scratch_close)))),
        (rf'in {BLOCKS} they are less alike to it \({SPAN}\) than to each other \({SPAN}\)',
         (c['apart_blocks'], c['teacher_apart'], span(at('distill', 'distill', c['apart'])))),
        (rf'less alike than two seeds of either in (\d+) of (\d+) blocks \(CKA {SPAN}, against {SPAN} and {SPAN}\)',
         (str(len(cross)), str(depth), span(at('finetune', 'distill', every)),
          span(at('finetune', 'finetune', every)), span(at('distill', 'distill', every)))),
        (rf'disagree on {IV}% of the images, {COMPARED} two fine-tuned seeds \({IV}%\)',
         (interval(fd['disagreement']), compared(fd['disagreement'], ff['disagreement']),
          interval(ff['disagreement']))),
        (rf'wrong on {IV}% of the images the fine-tuned one gets wrong \(another fine-tuned seed: {IV}%\)',
         (interval(wrong, f='.0f'), interval(ff['b_wrong_given_a_wrong'], f='.0f'))),
        (rf'gains {IV} points over the better of its two, {COMPARED} the ensemble of two fine-tuned seeds \({IV}; '
         r'top-1 ([\d.]+) against ([\d.]+)\)', (interval(fd['gain'], 1, '+.2f'), compared(fd['gain'], ff['gain']),
                                               interval(ff['gain'], 1, '+.2f'), f"{fd['top1_ensemble']['mean']:.2f}",
                                               f"{ff['top1_ensemble']['mean']:.2f}")),
        (rf"near the teacher's holds in {BLOCKS},", (c['close_blocks'],)),
        (rf"in {BLOCKS} they are nearer each other's than the teacher's", (c['apart_blocks'],)),
        (r'What they do not show: (\d+) seeds of each method', (str(n),)),
        (r'the intervals resample the (\d+) test images \(for CKA in the (\d+) batches they were run in\)',
         (str(r['images']), str(b['cka_units']))),
        (r'this is a (\d+)-block ViT on (\S+), (\d+) epochs a method', (str(depth), cfg['data'], str(epochs))),
    ]


def features_page():
    with open(os.path.join(FEATURES, 'features.json')) as f:
        record = json.load(f)
    epochs = {read_checkpoint(os.path.join(ROOT, p))['config']['epochs'] for p in record['config']['models']}
    assert len(epochs) == 1, epochs
    with open(os.path.join(FEATURES, 'README.md'), encoding='utf-8') as f:
        return record, epochs.pop(), f.read()


def features_problems(record, epochs, page):
    from tools.features_report import summary
    text = page
    for table in re.findall(r'^\|.*?(?=\n\n|\Z)', summary(record['result']), re.M | re.S)[:6]:   # not the bootstrap's
        assert table in page, f'the page does not include the table that begins {table[:80]!r}'
        text = text.replace(table, '')
    for phrase in FIXED:
        text = text.replace(phrase, '')
    return read(flat(text), feature_checks(record, epochs))


def test_the_feature_analysis_page_states_its_numbers():
    assert features_problems(*features_page()) == []


def test_the_feature_tables_are_made_from_features_json(tmp_path):
    """TABLES.md as `python -m tools.features_report` makes it now from the committed features.json."""
    from tools.features_report import rewrite
    shutil.copyfile(os.path.join(FEATURES, 'features.json'), tmp_path / 'features.json')
    rewrite(str(tmp_path))
    with open(os.path.join(FEATURES, 'TABLES.md'), encoding='utf-8') as f:
        assert (tmp_path / 'TABLES.md').read_text(encoding='utf-8') == f.read()


@pytest.mark.parametrize('old, new, found', [
    ('KL to the teacher\'s 0.00-0.02 nats', 'KL to the teacher\'s 0.00-0.03 nats', "'0.00-0.02'"),
    ('disagree on 6.9 [6.6, 7.4]%', 'disagree on 6.8 [6.6, 7.4]%', "'6.9 [6.6, 7.4]'"),
    ('6.9 [6.6, 7.4]% of the images, more than', '6.9 [6.6, 7.4]% of the images, about as much as', "'more than'"),
    ('in 6 of 6 blocks', 'in 5 of 6 blocks', "('6', '6',"),
    ('a uniform map: 14.4 px', 'a uniform map: 14.5 px', "'14.4'"),
    ('in 7.3 min', 'in 7.4 min', "'7.3 min'"),
    ('3 epochs a method', '4 epochs a method', "'3')"),
    ('fp32, no autocast.', 'fp32, no autocast, 2 threads.', "numbers no check reads: ['2']"),
])
def test_the_feature_reader_finds_a_changed_number(old, new, found):
    record, epochs, page = features_page()
    assert old in page
    problems = features_problems(record, epochs, page.replace(old, new, 1))
    assert len(problems) == 1 and found in problems[0], problems
