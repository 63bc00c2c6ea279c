"""The README's sentences about the quick reproduction against the run they cite
(results/fashion-mnist-quick/results.json): every top-1 quoted, every ordering stated, the budget, the time and
the machine. A sentence that compares methods in words this reader does not know fails too, so that no claim
goes unchecked; a sentence that names the paper is read against the paper's numbers instead."""
import json
import math
import os
import re

import pytest

from conftest import ROOT
from tools.reproduce_report import PAPER

QUICK = os.path.join(ROOT, 'results', 'fashion-mnist-quick')
NAMES = {'scratch': 'scratch', 'fine-tuning': 'finetune', 'fine-tune': 'finetune', 'copy': 'copy',
         'distillation': 'distill', 'ensemble': 'ensemble'}
M = '(' + '|'.join(NAMES) + ')'
OPS = {'>': lambda a, b: a > b, '<': lambda a, b: a < b, '=': lambda a, b: a == b}
# the comparisons this reader knows: 'a 1.0 > b 0.5' chains, 'a [and b] is / are above / below c', 'a [and b] beat c'
CHAIN = re.compile(rf'{M} (\d+\.\d+) ([<>=]) (?={M} (\d+\.\d+))')
WORDS = re.compile(rf'{M}(?:,? and {M})? (?:is |are )?(above|below|beats?) (?:the )?{M}')
COMPARES = re.compile(r'\b(above|below|beats?|ahead|behind|higher|lower|better|worse|passes|exceeds)\b|[<>]')


def quick_run():
    with open(os.path.join(QUICK, 'results.json')) as f:
        return json.load(f)


def sentences(text):
    """The sentences of a paragraph (Markdown line breaks joined; a decimal point ends none)."""
    return re.split(r'(?<=\.)\s+(?=[A-Z])', ' '.join(text.split()))


def relations(sentence):
    """(method, op, method, digits) for each comparison the sentence states (digits: those its numbers are quoted
    with, None for words), and what is left of the sentence once those are cut."""
    found = [(a, op, b, len(x.split('.')[1])) for a, x, op, b, _ in CHAIN.findall(sentence)]
    for a, and_b, word, c in WORDS.findall(sentence):
        op = '<' if word == 'below' else '>'
        found += [(x, op, c, None) for x in (a, and_b) if x]
    rest = WORDS.sub('', re.sub(rf'{M} \d+\.\d+(?: [<>=])?', '', sentence))
    return found, rest


def lr_share(reached, epochs, warmup):
    """The lr at `reached` epochs as a share of the peak: linear warm-up, then half a cosine to 0 (the maths,
    written again here rather than imported from util/engine.py)."""
    if reached < warmup:
        return reached / warmup
    return 0.5 * (1 + math.cos(math.pi * (reached - warmup) / (epochs - warmup)))


def problems(paragraph, run, logs=''):
    """What in a paragraph about the quick run its results disagree with (empty: nothing)."""
    means = {m: r['mean'] for m, r in run['summary']['methods'].items()}
    stage = next(r for r in run['stages'] if r['stage'] == 'distill')
    given = dict(zip(stage['command'], stage['command'][1:]))
    epochs, reached = run['config']['epochs'], stage['metrics']['epoch']
    out = []
    for s in sentences(paragraph):
        # a sentence that names the paper may quote its numbers: each number and relation holds in the run or there
        sources = [means, PAPER] if 'paper' in s else [means]
        for name, number in re.findall(rf'{M} (\d+\.\d+)', s):
            digits = len(number.split('.')[1])
            if all(round(v[NAMES[name]], digits) != float(number) for v in sources):
                out.append(f'{name} {number}: the run has {means[NAMES[name]]:.2f}')
        found, rest = relations(s)
        for a, op, b, digits in found:
            if not any(OPS[op](*(round(v[NAMES[x]], digits) if digits else v[NAMES[x]] for x in (a, b)))
                       for v in sources):
                out.append(f'{a} {op} {b} does not hold: {means[NAMES[a]]:.2f}, {means[NAMES[b]]:.2f}')
        if COMPARES.search(rest) and re.search(M, rest):
            out.append(f'a comparison this test cannot read: {s!r}')
        if re.search(r"paper's order", s) and not re.search(r'\bnot\b', s):   # claimed: every step of it must hold
            pattern = [('scratch', '<', 'copy'), ('copy', '<=', 'distill'), ('distill', '<=', 'finetune'),
                       ('finetune', '<', 'ensemble')]
            out += [f"the paper's ordering: not {a} {op} {b} here" for a, op, b in pattern
                    if not (means[a] < means[b] if op == '<' else means[a] <= means[b])]
        out += [f'{n} steps: the run stopped after {run["config"]["max_steps"]}'
                for n in re.findall(r'(\d+) steps', s) if int(n) != run['config']['max_steps']]
        for n in re.findall(r'(\d+)-epoch schedule', s):
            out += [] if int(n) == epochs else [f'a {n}-epoch schedule: the run had {epochs}']
        for n in re.findall(r'warm-up (\d*\.?\d+) epoch', s):
            out += [] if float(n) == float(given['--warmup-epochs']) else [f'warm-up {n}: the stages had '
                                                                              f'{given["--warmup-epochs"]}']
        for n in re.findall(r'(\d+)% of the way', s):
            out += [] if int(n) == round(100 * reached / epochs) else [f'{n}% of the way: the run got {reached:.3f}']
        for n in re.findall(r'lr still at (\d+)%', s):
            share = lr_share(reached, epochs, float(given['--warmup-epochs']))
            out += [] if int(n) == round(100 * share) else [f'lr at {n}%: it was {100 * share:.1f}%']
        for m, sec in re.findall(r'took (\d+) min (\d+) s', s):
            out += [] if divmod(round(run['wall_s']), 60) == (int(m), int(sec)) else \
                [f'{m} min {sec} s: the run took {run["wall_s"]:.0f} s']
        for cores, cpu in re.findall(r'(\d+)-core ([A-Z][\w ]*?) with', s):
            out += [] if f'{cpu}, {cores} CPUs' in run['machine'] else [f'{cores}-core {cpu}: {run["machine"]}']
        if 'bf16' in s and 'autocast torch.bfloat16' not in logs:
            out.append('bf16: the stages\' logs do not say they ran under bf16 autocast')
        if re.search(r'\bone seed\b', s) and len(run['config']['seeds']) != 1:
            out.append(f'one seed: the run had {run["config"]["seeds"]}')
    return out


def readme_paragraphs():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        return [p for p in f.read().split('\n\n') if 'results/fashion-mnist-quick/' in p]


def stage_logs():
    out = ''
    for stage in ('scratch', 'finetune', 'copy', 'distill'):
        with open(os.path.join(QUICK, 'logs', stage, 'seed0', 'log.txt')) as f:
            out += f.read()
    return out


def test_the_readme_says_what_the_quick_run_shows():
    paragraphs, run = readme_paragraphs(), quick_run()
    assert paragraphs, 'the README cites results/fashion-mnist-quick/ nowhere'
    text = '\n\n'.join(paragraphs)
    quoted = {NAMES[n] for s in sentences(text) if 'paper' not in s for n, _ in re.findall(rf'{M} (\d+\.\d+)', s)}
    assert quoted == set(NAMES.values()), f'the README quotes the quick top-1 of {sorted(quoted)} only'
    assert problems(text, run, stage_logs()) == []


@pytest.mark.parametrize('claim, wrong', [
    # the sentence the README had: the quick run does not show the paper's ordering
    ("On a 2-core AMD EPYC it took 2 min 59 s and showed the paper's ordering on its one seed: scratch 67.9, "
     "fine-tune 82.2, copy 78.4, distillation 73.7 top-1.", ["the paper's ordering: not copy <= distill here",
                                                              "the paper's ordering: not finetune < ensemble here"]),
    ('It gave copy 78.4 > distillation 73.7.', []),
    ('It gave distillation 73.7 > copy 78.4.', ['distillation > copy does not hold: 73.68, 78.40']),
    ('Here the ensemble is above fine-tuning.', ['ensemble > fine-tuning does not hold: 81.56, 82.24']),
    ('Copy and distillation beat scratch.', []),
    ('Here distillation beats copy.', ['distillation > copy does not hold: 73.68, 78.40']),
    ('It gave scratch 68.0.', ['scratch 68.0: the run has 67.93']),
    ("The paper has distillation above copy, scratch 83.0.", []),
    ("Unlike the paper, scratch 67.9 > copy 78.4.", ['scratch > copy does not hold: 67.93, 78.40']),
    ('Fine-tuning does better than copy here.', ["a comparison this test cannot read: "
                                                 "'Fine-tuning does better than copy here.'"]),
    ("The paper's numbers: distillation 85.7 = fine-tune 85.7 > copy 85.1.", []),
    ('Each stage is stopped after 100 steps, 40% of the way through it, with its lr still at 50% of the peak.',
     ['100 steps: the run stopped after 200', '40% of the way: the run got 0.427', 'lr at 50%: it was 70.8%']),
])
def test_the_reader_finds_what_disagrees(claim, wrong):
    """The checker itself, on sentences whose truth is known: it is no check if it passes everything."""
    assert problems(claim, quick_run(), stage_logs()) == wrong

# -----------------------------------------------------------------------------
# The README's sentences about features, against the committed feature analysis


FEATURES = os.path.join(ROOT, 'results', 'fashion-mnist', 'features', 'features.json')


def feature_claims():
    from tools.features_report import claims
    with open(FEATURES) as f:
        return claims(json.load(f)['result'])


def stated_features(c, text):
    """What in the README's (or the notebook's) paragraph about features the analysis does not say (empty:
    nothing): each number it quotes, and the two words that rest on a comparison."""
    text = ' '.join(text.split())
    wrong = [f'{k}: {c[k]}' for k in ('close_blocks', 'teacher_close', 'seeds_close', 'scratch_seeds', 'apart_blocks',
                                      'teacher_apart', 'gain_ff', 'gain_fd')
             if not re.search(rf'(?<![\d.]){re.escape(c[k])}(?!\d)', text)]
    if 'no sign of features of its own' in text and c['fd']['gain']['mean'] > c['ff']['gain']['mean']:
        wrong.append('the distilled student adds more than a second fine-tuned seed')
    if f"{c['seeds']} seeds" not in text:
        wrong.append(f"{c['seeds']} seeds")
    return wrong


@pytest.mark.skipif(not os.path.isfile(FEATURES), reason='no committed feature analysis')
def test_the_readme_says_what_the_feature_analysis_shows():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = next(p for p in f.read().split('\n\n') if 'results/fashion-mnist/features/README.md)),' in p)
    c = feature_claims()
    assert c is not None and stated_features(c, text) == []
    # the reader catches a number or a word changed
    assert stated_features(c, text.replace(c['teacher_close'], '0.12-0.34')) == ['teacher_close: ' + c['teacher_close']]
    swapped = {**c, 'fd': c['ff'], 'ff': {'gain': {'mean': c['ff']['gain']['mean'] - 1}}}
    assert 'the distilled student adds more than a second fine-tuned seed' in stated_features(swapped, text)
