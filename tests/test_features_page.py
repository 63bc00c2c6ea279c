"""The feature analysis's page (results/fashion-mnist/features/README.md) is written by hand: every number it states
is checked against features.json (and the models' checkpoints for their training length), read by the patterns of
tests/test_pages.py: each kind of statement by one pattern, any number no pattern reads failing the page. The facts
the README's and the notebook's sentences about features rest on are computed here too (`feature_facts`)."""
import json
import os
import re
import shlex
import statistics
import subprocess

import pytest

from conftest import ROOT
from test_pages import flat, read
from tools.features import tables
from util.checkpoints import read_checkpoint

FEATURES = os.path.join(ROOT, 'results', 'fashion-mnist', 'features')
BLOCKS, SPAN = r'(blocks? \d+(?:-\d+)?(?:, \d+)*)', r'(\d\.\d\d(?:-\d\.\d\d)?)'
IV = r'([+-]?[\d.]+ \[[+-]?[\d.]+, [+-]?[\d.]+\])'
COMPARED = r'(more than|less than|no more than|about as much as)'
FIXED = ('column 0 of every map',)    # the class token is token 0 of every map, whatever the data
REMADE = r'The top-1 and CKA tables are made again by the analysis as it is now, \S+: `([^`]+)`'


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
    # the course's reading (README, notebook): as alike to the teacher as to a second seed where the teacher's CKA lies
    # within the distilled pairs' mean ± std, parted from it elsewhere
    pairs = g('distill', 'distill')['tokens']
    within = [i for i in range(depth) if abs(at(t, 'distill', [i])[0] - pairs[i]['mean']) <= pairs[i]['std']]
    beyond = [i for i in range(depth) if i not in within]
    fd, ff = g('finetune', 'distill')['predictions'], g('finetune', 'finetune')['predictions']
    return {'g': g, 'at': at, 'models': models, 'taught': taught, 'close': close, 'apart': apart, 'fd': fd, 'ff': ff,
            'seeds': len(models['distill']), 'close_blocks': named(close), 'apart_blocks': named(apart),
            'teacher_close': span(at(t, 'distill', close)), 'seeds_close': span(at('distill', 'distill', close)),
            'teacher_apart': span(at(t, 'distill', apart)), 'scratch_seeds': span(at('scratch', 'scratch')),
            'within': within, 'beyond': beyond, 'within_blocks': named(within), 'beyond_blocks': named(beyond),
            'teacher_within': span(at(t, 'distill', within)), 'seeds_within': span(at('distill', 'distill', within)),
            'teacher_beyond': span(at(t, 'distill', beyond)), 'seeds_beyond': span(at('distill', 'distill', beyond)),
            'gain_fd': f"{fd['gain']['mean']:+.2f}", 'gain_ff': f"{ff['gain']['mean']:+.2f}"}


def interval(s, k=100, f='.1f'):
    return f"{k * s['mean']:{f}} [{k * s['interval'][0]:{f}}, {k * s['interval'][1]:{f}}]"


def compared(a, b):
    """How a page words a against b: 'more than' / 'less than' only where their intervals do not overlap."""
    if a['interval'][0] > b['interval'][1] or b['interval'][0] > a['interval'][1]:
        return 'more than' if a['mean'] > b['mean'] else 'less than'
    return 'no more than' if a['mean'] <= b['mean'] else 'about as much as'


def last_holding(found):
    """The commit before the one that removed tools/features.py from the tree, short, as many times as the page names
    it (where git has no such history, a shallow clone, what the page states is taken as it is)."""
    git = lambda *a: subprocess.run(['git', '-C', ROOT, *a], capture_output=True, text=True).stdout.strip()
    removed = git('log', '-1', '--format=%H', '--diff-filter=D', '--', 'tools/features.py')
    return (git('rev-parse', '--short=7', removed + '^') if removed else found[0],) * len(found)


def feature_checks(record, epochs):
    r, cfg, c = record['result'], record['config'], feature_facts(record['result'])
    t, depth, n, at, g, b = r['teacher'], r['depth'], c['seeds'], c['at'], c['g'], r['bootstrap']
    kl = lambda k: [statistics.fmean(h for m in c['models'][k] for h in r['kl'][m][i]) for i in c['taught']]
    took = f"{record['wall_s'] / 60:.1f} min" if record['wall_s'] >= 120 else f"{record['wall_s']:.0f} s"
    width = max((s['interval'][1] - s['interval'][0]) / 2 for x in r['groups'] for s in x['tokens'])
    cross = [i for i in range(depth) if at('finetune', 'distill', [i])[0] < min(at('finetune', 'finetune', [i])[0],
                                                                                 at('distill', 'distill', [i])[0])]
    every = range(depth)
    fd, ff = c['fd'], c['ff']
    wrong = fd['b_wrong_given_a_wrong' if g('finetune', 'distill')['a'] == 'finetune' else 'a_wrong_given_b_wrong']
    names = [k for k in r['models'] if k != t]
    return [
        # the machine, right after the command (not the first 'on' of the page): read before the command is cut
        (r"(?<=`) on (.+?) \(`--device (\w+)`, torch (\S+), git commit ([0-9a-f]{40})\) in ([\d.]+ (?:min|s)):",
         (record['machine'], record['device'], record['torch'], record['git_commit'], took)),
        (r'Made by `([^`]+)`', (record['command'],)),
        (r'one pass over the first (\d+) images of the (\S+) test split', (str(r['images']), cfg['data'])),
        (r'commit ([0-9a-f]{7}) is the last that holds it \(`git show ([0-9a-f]{7}):tools/features\.py`.*?`git '
         r'checkout ([0-9a-f]{7})`', last_holding),
        (REMADE, (shlex.join(['python', '-m', 'tools.features', '--teacher', cfg['teacher'],
                              '--out-dir', 'runs/features', '--models', *cfg['models']]),)),
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
        (rf'[Ii]n {BLOCKS} two scratch seeds reach {SPAN}, two fine-tuned {SPAN}, two distilled {SPAN}, while the '
         rf'teacher and a scratch model reach only {SPAN}\.',
         (named(c['taught']), c['scratch_seeds'], span(at('finetune', 'finetune')), span(at('distill', 'distill')),
          span(at(t, 'scratch')))),
        # the course's reading of the blocks (README, notebook): the teacher's CKA within the distilled seeds' spread
        (rf"In {BLOCKS} the distilled students' features are as alike to the teacher's \({SPAN}\) as two distilled "
         rf"seeds are to each other \({SPAN}\), within the seeds' spread",
         (c['within_blocks'], c['teacher_within'], c['seeds_within'])),
        (rf'[Ii]n {BLOCKS} they are less alike to it \({SPAN}\) than to each other \({SPAN}\)',
         (c['beyond_blocks'], c['teacher_beyond'], c['seeds_beyond'])),
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
        (rf"near the teacher's holds in {BLOCKS},", (c['within_blocks'],)),
        (rf"[Ii]n {BLOCKS} they are nearer each other's than the teacher's", (c['beyond_blocks'],)),
        (r'What they do not show: (\d+) seeds of each method', (str(n),)),
        (r'[Tt]he intervals resample the (\d+) test images \(for CKA in the (\d+) batches they were run in\)',
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


def sections(text):
    """{heading: its Markdown table} of TABLES.md: each table under the `## ` line above it."""
    return dict(re.findall(r'^## (.+)\n\n((?:\|.*\n?)+)', text, re.M))


def features_problems(record, epochs, page):
    with open(os.path.join(FEATURES, 'TABLES.md'), encoding='utf-8') as f:
        made = f.read()
    text = page
    for table in re.findall(r'^\|.*?(?=\n\n|\Z)', page, re.M | re.S):
        assert table in made, f'the page has a table TABLES.md does not: {table[:80]!r}'
        text = text.replace(table, '')
    for phrase in FIXED:
        text = text.replace(phrase, '')
    return read(flat(text), feature_checks(record, epochs))


def test_the_feature_analysis_page_states_its_numbers():
    assert features_problems(*features_page()) == []


def test_the_feature_tables_are_those_tools_features_writes_from_features_json():
    """TABLES.md was made by the first version of the analysis (the page names the commit that made it): its top-1 and
    CKA tables are those tools/features.py writes from the committed features.json, digit for digit."""
    r = features_page()[0]['result']
    with open(os.path.join(FEATURES, 'TABLES.md'), encoding='utf-8') as f:
        committed = sections(f.read())
    made = sections(tables({**r, 'blocks': list(range(r['depth']))}))
    assert len(made) == 3 and all(committed[heading] == table for heading, table in made.items()), made.keys()


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
