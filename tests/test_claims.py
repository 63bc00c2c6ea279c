"""The README's sentences about the quick reproduction against the run they cite
(results/fashion-mnist-quick/results.json): every top-1 quoted, every ordering stated, the budget, the time and
the machine. A sentence that compares methods in words this reader does not know fails too, so that no claim
goes unchecked; a sentence that names the paper is read against the paper's numbers instead."""
import json
import math
import os
import re
import statistics

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


def quick_run(path=QUICK):
    with open(os.path.join(path, 'results.json')) as f:
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
        fp32 = re.search(r'--amp off|\bfp32\b|\bwithout bf16\b', s, re.I)
        if 'bf16' in s and not fp32 and 'autocast torch.bfloat16' not in logs:
            out.append('bf16: the stages\' logs do not say they ran under bf16 autocast')
        if fp32 and ('autocast None' not in logs or 'autocast torch.' in logs):
            out.append('fp32: the stages\' logs do not say they ran without autocast')
        if re.search(r'\bone seed\b', s) and len(run['config']['seeds']) != 1:
            out.append(f'one seed: the run had {run["config"]["seeds"]}')
    return out


def readme_paragraphs(cited='results/fashion-mnist-quick/'):
    """The paragraphs of the README and of REFERENCE.md (where the timings live) that cite a quick run's page."""
    out = []
    for page in ('README.md', 'REFERENCE.md'):
        with open(os.path.join(ROOT, page), encoding='utf-8') as f:
            out += [p for p in f.read().split('\n\n') if cited in p]
    return out


def stage_logs(path=QUICK):
    out = ''
    for stage in ('scratch', 'finetune', 'copy', 'distill'):
        with open(os.path.join(path, 'logs', stage, 'seed0', 'log.txt')) as f:
            out += f.read()
    return out


def test_the_readme_says_what_the_quick_run_shows():
    paragraphs, run = readme_paragraphs(), quick_run()
    assert paragraphs, 'the README and REFERENCE.md cite results/fashion-mnist-quick/ nowhere'
    text = '\n\n'.join(paragraphs)
    quoted = {NAMES[n] for s in sentences(text) if 'paper' not in s for n, _ in re.findall(rf'{M} (\d+\.\d+)', s)}
    assert quoted == set(NAMES.values()), f'the README quotes the quick top-1 of {sorted(quoted)} only'
    assert problems(text, run, stage_logs()) == []
    assert time_problems(text, *shell_time(QUICK)) == [] and re.search(r'of CPU', text)


# The same command in fp32 (--amp off), from a fresh clone on one core: its run, and the shell's `time` beside it


QUICK_FP32 = os.path.join(ROOT, 'results', 'fashion-mnist-quick-fp32')


def shell_time(path=QUICK_FP32):
    """(real, user + sys) seconds, from the output of bash's `time` kept beside the run (TIME.txt)."""
    with open(os.path.join(path, 'TIME.txt')) as f:
        t = {k: 60 * int(m) + float(sec) for k, m, sec in re.findall(r'^(real|user|sys)\s+(\d+)m([\d.]+)s$', f.read(), re.M)}
    return t['real'], t['user'] + t['sys']


def time_problems(text, real, cpu):
    """What in a paragraph the shell's `time` (real: from the shell; cpu: user + sys) disagrees with."""
    out, flat = [], ' '.join(text.split())
    for what, seconds, pattern in (('shell', real, r'(\d+) min (\d+) s from the shell'),
                                   ('CPU', cpu, r'(\d+) min (\d+) s of CPU')):
        said = re.findall(pattern, flat)
        out += [f'{m} min {sec} s ({what}): it was {seconds:.0f} s' for m, sec in said
                if divmod(round(seconds), 60) != (int(m), int(sec))]
    for n in re.findall(r'of CPU, within (\d+) minutes', flat):
        out += [] if cpu <= 60 * int(n) else [f'within {n} minutes of CPU: it used {cpu:.0f} s']
    for n in re.findall(r'from the shell, within (\d+) minutes', flat):
        out += [] if real <= 60 * int(n) else [f'within {n} minutes from the shell: it took {real:.0f} s']
    return out


def fp32_problems(text, run, logs, real, cpu):
    """What in the README's paragraph about the fp32 quick run the run and its timing disagree with."""
    return problems(text, run, logs) + time_problems(text, real, cpu)


def test_the_readme_says_what_the_fp32_quick_run_shows():
    paragraphs = readme_paragraphs('results/fashion-mnist-quick-fp32/')
    assert paragraphs, 'the README and REFERENCE.md cite results/fashion-mnist-quick-fp32/ nowhere'
    text, run, logs = '\n\n'.join(paragraphs), quick_run(QUICK_FP32), stage_logs(QUICK_FP32)
    assert run['config']['amp'] == 'off' and 'autocast None' in logs and 'fp32' in text
    assert fp32_problems(text, run, logs, *shell_time()) == []
    assert re.search(r'(?:of CPU|from the shell), within 5 minutes', ' '.join(text.split())), 'no 5-minute bound stated'
    real, cpu = shell_time()
    assert fp32_problems(text, run, logs, real + 61, cpu) != []      # the reader catches a time off by a minute
    assert fp32_problems(text.replace('fp32', 'bf16'), run, logs, real, cpu) != []


def one_seeds_orderings(text):
    """The sentences of a text that order the quick run's methods (not the paper's) without saying that one seed's
    draw decides that order."""
    return [s for s in sentences(text) if 'paper' not in s and relations(s)[0] and not re.search(r"\bdraw\b", s)]


QUICK_PAGES = [os.path.join(QUICK, 'RESULTS.md'), os.path.join(QUICK_FP32, 'RESULTS.md')]


def test_no_page_orders_the_quick_runs_methods_as_more_than_one_seeds_draw():
    """One seed of a run cut at 17% of its schedule decides its methods' order, which another seed, torch release or
    CPU can change: the README, REFERENCE.md and the quick runs' pages state none as what the command shows, each
    ordering said to be that seed's draw."""
    texts = readme_paragraphs() + readme_paragraphs('results/fashion-mnist-quick-fp32/')
    for path in QUICK_PAGES:
        with open(path, encoding='utf-8') as f:
            texts.append(f.read())
    assert [s for t in texts for s in one_seeds_orderings(t)] == []
    assert one_seeds_orderings('It shows that every stage runs, and that copy and distillation beat scratch.')
    assert not one_seeds_orderings("Its one seed's draw: copy and distillation beat scratch.")


@pytest.mark.parametrize('claim, wrong', [
    # a sentence of the kind the README once had: the quick run does not show the paper's ordering
    ("On a 2-core AMD EPYC it took 7 min 9 s and showed the paper's ordering on its one seed: scratch 61.1, "
     "fine-tune 70.3, copy 71.1, distillation 66.2 top-1.", ["the paper's ordering: not copy <= distill here"]),
    ('It gave copy 71.1 > distillation 66.2.', []),
    ('It gave distillation 66.2 > copy 71.1.', ['distillation > copy does not hold: 66.18, 71.11']),
    ('Here the ensemble is above fine-tuning.', []),
    ('Here fine-tuning is above the ensemble.', ['fine-tuning > ensemble does not hold: 70.27, 74.46']),
    ('Copy and distillation beat scratch.', []),
    ('Here distillation beats copy.', ['distillation > copy does not hold: 66.18, 71.11']),
    ('It gave scratch 68.0.', ['scratch 68.0: the run has 61.06']),
    ("The paper has distillation above copy, scratch 83.0.", []),
    ("Unlike the paper, scratch 61.1 > copy 71.1.", ['scratch > copy does not hold: 61.06, 71.11']),
    ('Fine-tuning does better than copy here.', ["a comparison this test cannot read: "
                                                 "'Fine-tuning does better than copy here.'"]),
    ("The paper's numbers: distillation 85.7 = fine-tune 85.7 > copy 85.1.", []),
    ('Each stage is stopped after 100 steps, 40% of the way through it, with its lr still at 50% of the peak.',
     ['100 steps: the run stopped after 160', '40% of the way: the run got 0.171', 'lr at 50%: it was 98.5%']),
    ('Without bf16 (--amp off) it gave copy 71.1.', ["fp32: the stages' logs do not say they ran without autocast"]),
])
def test_the_reader_finds_what_disagrees(claim, wrong):
    """The checker itself, on sentences whose truth is known: it is no check if it passes everything."""
    assert problems(claim, quick_run(), stage_logs()) == wrong

# -----------------------------------------------------------------------------
# The README's sentences about features, against the committed feature analysis


FEATURES = os.path.join(ROOT, 'results', 'fashion-mnist', 'features', 'features.json')


def feature_claims():
    from test_features_page import feature_facts
    with open(FEATURES) as f:
        return feature_facts(json.load(f)['result'])


def stated_features(c, text):
    """What in the README's (or the notebook's) paragraph about features the analysis does not say (empty:
    nothing): each number it quotes, and the two words that rest on a comparison."""
    text = ' '.join(text.split())
    wrong = [f'{k}: {c[k]}' for k in ('within_blocks', 'teacher_within', 'seeds_within', 'scratch_seeds',
                                      'beyond_blocks', 'teacher_beyond', 'seeds_beyond', 'gain_ff', 'gain_fd')
             if not re.search(rf'(?<![\d.]){re.escape(c[k])}(?!\d)', text)]
    # where the distilled features part from the teacher's: the blocks beyond the seeds' spread, never a block within
    for blocks in re.findall(r'[Ii]n (blocks \d-\d) (?:they|the distilled features) part from the teacher', text):
        if blocks != c['beyond_blocks']:
            wrong.append(f"part in {blocks}: beyond the seeds' spread only in {c['beyond_blocks']}")
    # the ensemble's gain read as no sign of features unlike the fine-tuned model's: the distilled student may add no
    # more than a second fine-tuned seed
    says_no_sign = any(s in text for s in ('no sign of features of its own', 'no sign of features unlike',
                                           "does the ensemble's gain show features unlike"))
    if says_no_sign and c['fd']['gain']['mean'] > c['ff']['gain']['mean']:
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
    # where the distilled features part from the teacher's, how alike two distilled seeds stay (the README says both)
    said = ' '.join(text.split())
    assert (f"In {c['beyond_blocks']} they part from the teacher's ({c['teacher_beyond']}, against {c['seeds_beyond']} "
            'between seeds)') in said
    assert f"in {c['within_blocks']}" in said and c['within'] + c['beyond'] == list(range(6))
    # the reader catches a number or a word changed
    assert stated_features(c, text.replace(c['teacher_within'], '0.12-0.34')) == ['teacher_within: ' + c['teacher_within']]
    assert stated_features(c, text.replace('In blocks 4-5 they part', 'In blocks 3-5 they part')) != []
    swapped = {**c, 'fd': c['ff'], 'ff': {'gain': {'mean': c['ff']['gain']['mean'] - 1}}}
    assert 'the distilled student adds more than a second fine-tuned seed' in stated_features(swapped, text)

# -----------------------------------------------------------------------------
# The README's sentences about the committed reproduction (the figure's caption and the Results section), against
# results/fashion-mnist/results.json: the table, each gap closed, the ensemble's gain, each ordering, the time


FULL = os.path.join(ROOT, 'results', 'fashion-mnist')
ROWS = {'train from scratch': 'scratch', 'fine-tune the MAE teacher': 'finetune', 'attention copy': 'copy',
        'attention distillation': 'distill', 'ensemble': 'ensemble'}


def full_run():
    with open(os.path.join(FULL, 'results.json')) as f:
        return json.load(f)


def readme_about_full():
    """The caption under the README's figure and its Results section (up to the next section)."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    caption = re.search(r'^!\[[^\]]*\]\(results/fashion-mnist/results\.png\)\n(\*[^*]+\*)', text, re.M)
    results = re.search(r'^## Results\b.*?(?=^## )', text, re.M | re.S)
    assert caption and results, 'the README has no caption under results/fashion-mnist/results.png, or no Results'
    return caption[1] + '\n\n' + results[0]


def full_problems(text, run):
    """What in the README's text about the committed reproduction its results.json disagrees with (empty:
    nothing)."""
    m, out = run['summary']['methods'], []
    mean = {k: r['mean'] for k, r in m.items()}
    gap = {'copy': run['summary']['gap_closed']['copy'], 'distillation': run['summary']['gap_closed']['distill']}
    flat = ' '.join(text.split())
    for label, key in ROWS.items():   # | method (...) | mean ± std | gap closed | paper |
        for row in re.findall(rf'^\| {re.escape(label)}\b[^|]*\| \**(\d+\.\d+) ± (\d+\.\d+)\** \|([^|]*)\|', text, re.M):
            if (float(row[0]), float(row[1])) != (round(mean[key], 2), round(m[key]['std'], 2)):
                out.append(f'{label}: {row[0]} ± {row[1]}, the run has {mean[key]:.2f} ± {m[key]["std"]:.2f}')
            share = re.search(r'(\d+\.\d)%', row[2])
            if share and float(share[1]) != round(100 * run['summary']['gap_closed'][key], 1):
                out.append(f'{label} closes {share[1]}%: the run, {100 * run["summary"]["gap_closed"][key]:.1f}%')
    for name, n in re.findall(r"(?<!paper's )\b(copy|distillation) closes (?:only )?(\d+\.\d)%", flat, re.I):
        if float(n) != round(100 * gap[name.lower()], 1):
            out.append(f'{name} closes {n}%: the run, {100 * gap[name.lower()]:.1f}%')
    # the intervals over seeds (tools/intervals.py): of a share, of a difference; the order every seed shows
    from tools.reproduce_report import difference
    summary = run['summary']
    for name, low, high in re.findall(r"(?<!paper's )\b(copy|distillation) closes (?:only )?\d+\.\d% (?:of the "
                                      r"(?:scratch-to-fine-tune )?gap )?\((?:95% interval over seeds )?(\d+\.\d) to "
                                      r"(\d+\.\d)%\)", flat, re.I):
        share = summary['shares'][NAMES[name.lower()]]
        there = (round(100 * share['low'], 1), round(100 * share['high'], 1))
        out += [] if (float(low), float(high)) == there else [f'{name} interval {low} to {high}: the run, {there}']
    for a, b, low, high in re.findall(r'(Fine-tuning|Distillation|Copy) stays above (fine-tuning|distillation|copy|'
                                      r'scratch) here \([^)]*\), by \d+\.\d+ points \(95% interval (\d+\.\d+) to '
                                      r'(\d+\.\d+)\)', flat):
        iv = difference(summary, NAMES[a.lower()], NAMES[b])
        there = (round(iv['low'], 2), round(iv['high'], 2))
        out += [] if (float(low), float(high)) == there else [f'{a} - {b} interval {low} to {high}: the run, {there}']
    for low, high in re.findall(r'per seed; 95% interval (\d+\.\d+) to (\d+\.\d+)', flat):
        iv = difference(summary, 'ensemble', 'finetune')
        there = (round(iv['low'], 2), round(iv['high'], 2))
        out += [] if (float(low), float(high)) == there else [f'ensemble gain interval {low} to {high}: the run, {there}']
    for chain in re.findall(r'(?:in the order|ends in the order) ((?:[a-z-]+ [<?] )+[a-z-]+)', flat):
        there = summary['every_seed'].replace('finetune', 'fine-tune').replace('distill', 'distillation')
        out += [] if chain == there else [f'every seed: {chain}; the run, {there}']
    gain = mean['ensemble'] - mean['finetune']
    for n in re.findall(r'beats fine-tuning(?: alone)? by (\d+\.\d+)', flat):
        out += [] if float(n) == round(gain, len(n.split('.')[1])) else [f'ensemble gain {n}: the run, {gain:.2f}']
    per_seed = [e - f for e, f in zip(m['ensemble']['top1'], m['finetune']['top1'])]
    for said in re.findall(r'\(((?:[+−-]\d+\.\d+, )+[+−-]\d+\.\d+) per seed', flat):
        said, there = [float(x.replace('−', '-')) for x in said.split(', ')], [round(g, 2) for g in per_seed]
        out += [] if said == there else [f'per seed {said}: the run, {there}']
    for n in re.findall(r'disagree on (\d+\.\d)% of the images', flat):
        dis = statistics.mean(run['summary']['disagreement_pct'])
        out += [] if float(n) == round(dis, 1) else [f'disagree on {n}%: the run, {dis:.2f}%']
    for n in re.findall(r'gains (\d+\.\d) points over scratch', flat):
        out += [] if float(n) == round(mean['copy'] - mean['scratch'], 1) else [f'copy gains {n}']
    if 'beat training from scratch on every seed' in flat:
        out += [f'{k} does not beat scratch on seed {i}' for k in ('copy', 'distill')
                for i, (a, b) in enumerate(zip(m[k]['top1'], m['scratch']['top1'])) if not a > b]
    for a, b, x, y in re.findall(r'(Fine-tuning|Distillation|Copy) stays above (fine-tuning|distillation|copy|scratch) '
                                 r'here \((\d+\.\d+) against (\d+\.\d+)\)', flat):
        ka, kb = NAMES[a.lower()], NAMES[b]
        if not (mean[ka] > mean[kb] and (float(x), float(y)) == (round(mean[ka], 2), round(mean[kb], 2))):
            out.append(f'{a} above {b} ({x}, {y}): the run has {mean[ka]:.2f}, {mean[kb]:.2f}')
    for mi, s in re.findall(r'in (\d+) min (\d+) s', flat):
        out += [] if divmod(round(run['wall_s']), 60) == (int(mi), int(s)) else [f'{mi} min {s} s: {run["wall_s"]:.0f} s']
    for n in re.findall(r'for (\d+) epochs, (\d+) seeds', flat):
        if (int(n[0]), int(n[1])) != (run['config']['epochs'], len(run['config']['seeds'])):
            out.append(f'{n[0]} epochs, {n[1]} seeds: the run had {run["config"]["epochs"]}, {run["config"]["seeds"]}')
    return out


def test_the_readme_says_what_the_committed_reproduction_shows():
    text = readme_about_full()
    assert full_problems(text, full_run()) == []
    # each kind of sentence is there to be read (a sentence reworded out of the reader's reach fails here)
    flat = ' '.join(text.split())
    for pattern in (r'Distillation closes \d', r'beats fine-tuning(?: alone)? by', r'per seed', r'disagree on \d',
                    r'on every seed', r'stays above', r'in \d+ min \d+ s', r'^\| attention copy',
                    r'gap \(95% interval over seeds \d', r'\(95% interval \d', r'per seed; 95% interval \d',
                    r'in the order scratch'):
        assert re.search(pattern, flat if '^' not in pattern else text, re.M), pattern


@pytest.mark.parametrize('claim, wrong', [
    ('Distillation closes 80.6% of the gap; copy closes 29.5%.', []),
    ('Distillation closes 86.3% of the gap.', ['Distillation closes 86.3%: the run, 80.6%']),
    ("The paper's copy closes 77.8%.", []),
    ('The ensemble beats fine-tuning alone by 0.33 points.', ['ensemble gain 0.33: the run, 0.21']),
    ('(+0.25, +0.22, +0.17 per seed)', []),
    ('(+0.25, +0.17, +0.22 per seed)', ['per seed [0.25, 0.17, 0.22]: the run, [0.25, 0.22, 0.17]']),
    ('The two disagree on 6.9% of the images.', ['disagree on 6.9%: the run, 6.82%']),
    ('Distillation stays above fine-tuning here (89.86 against 88.93).',
     ['Distillation above fine-tuning (89.86, 88.93): the run has 88.93, 89.86']),
    ('It ran in 40 min 30 s.', ['40 min 30 s: 2490 s']),
    ('Copy closes 29.5% (18.9 to 40.2%).', []),
    ('Distillation closes 80.6% of the gap (95% interval over seeds 78.0 to 94.5%).',
     ['Distillation interval 78.0 to 94.5: the run, (66.6, 94.5)']),
    ('Fine-tuning stays above distillation here (89.86 against 88.93), by 0.93 points (95% interval 0.27 to 1.60).',
     ['Fine-tuning - distillation interval 0.27 to 1.60: the run, (0.27, 1.59)']),
    ('Every seed ends in the order scratch < distillation < copy < fine-tune < ensemble.',
     ['every seed: scratch < distillation < copy < fine-tune < ensemble; the run, '
      'scratch < copy < distillation < fine-tune < ensemble']),
    ('| attention copy (layers 0-4 of 6) | 86.48 ± 0.14 | 29.5% | 85.1 (77.8%) |', []),
    ('| attention copy (layers 0-4 of 6) | 86.58 ± 0.14 | 39.5% | 85.1 (77.8%) |',
     ['attention copy: 86.58 ± 0.14, the run has 86.48 ± 0.14', 'attention copy closes 39.5%: the run, 29.5%']),
])
def test_the_committed_reproduction_reader_finds_what_disagrees(claim, wrong):
    """The checker itself, on sentences whose truth is known."""
    assert full_problems(claim, full_run()) == wrong

# -----------------------------------------------------------------------------
# VALIDATION.md's row for the preset (8 heads, 3 epochs, 3 seeds, validation split), against the runs' logs


def validation_row():
    """(scratch, fine-tune, copy, copy's share, distillation, its share, ensemble, gain, per-seed gains) as
    VALIDATION.md's budget table states them for the 8-head preset."""
    with open(os.path.join(FULL, 'VALIDATION.md'), encoding='utf-8') as f:
        row = next(line for line in f if line.startswith('| **3 epochs, 8-head teacher** |'))
    return [float(x) for x in re.findall(r'[+-]?\d+\.\d+', row.split('|', 4)[4].rsplit('|', 3)[0])]


def validation_runs():
    """The same numbers, computed from the runs' own files under results/fashion-mnist/validation/."""
    v = os.path.join(FULL, 'validation')
    def last(d):   # the run's final evaluation
        with open(os.path.join(v, d, 'metrics.jsonl')) as f:
            return json.loads(f.read().strip().splitlines()[-1])['top1']
    runs = {m: [last(f'bf16-{m}-h8{s}') for s in ('', '-s1', '-s2')] for m in ('scratch', 'ft', 'copy', 'distill')}
    ens = [json.load(open(os.path.join(v, f'bf16-ensemble-h8{s}', 'ensemble.json')))['ensemble']['top1']
           for s in ('', '-s1', '-s2')]
    s, f, c, d = (statistics.mean(runs[m]) for m in ('scratch', 'ft', 'copy', 'distill'))
    gains = [e - x for e, x in zip(ens, runs['ft'])]
    return [round(s, 2), round(f, 2), round(c, 2), round(100 * (c - s) / (f - s), 1), round(d, 2),
            round(100 * (d - s) / (f - s), 1), round(statistics.mean(ens), 2), round(statistics.mean(gains), 2),
            *[round(g, 2) for g in gains]]


def test_validation_states_the_presets_row_as_its_runs_give_it():
    assert validation_row() == validation_runs()

# -----------------------------------------------------------------------------
# Orderings under the shifted test images (results/fashion-mnist/variants/variants.json), by the one rule the notebook
# states in its section 9: one result is below another *beyond the seeds' spread* when its mean + std is below the
# other's mean - std (their ranges of one std apart); where the ranges overlap, an ordering holds on the means only,
# and a sentence says so ('on the means only', or `≈` between two quoted results).


VARIANTS = os.path.join(FULL, 'variants')
SHIFT_WORDS = {'translation': 'translate', 'inversion': 'invert', 'inverted images': 'invert',
               'rotation': 'rotate', 'blur': 'blur', 'noise': 'noise'}
SHIFT = '(' + '|'.join(SHIFT_WORDS) + ')'
SUBJECTS = {'both transferred students': ('copy', 'distill'), 'both': ('copy', 'distill'),
            'copy and distillation': ('copy', 'distill'),
            'they': ('copy', 'distill'), 'copy': ('copy',), 'distillation': ('distill',)}
OBJECTS = {'scratch': 'scratch', 'fine-tuning': 'finetune'}
CLAIM = re.compile(r"\b(both transferred students|both|they|copy and distillation|copy|distillation) (?:falls?|stays?|ends?|is|are) "
                   r"(?:far |also )?(below|behind|above|ahead of) (scratch|fine-tuning|it)\b", re.I)
ONLY_UNDER = re.compile(r"\b(below|behind) (scratch|fine-tuning) only under ((?:\w+ \((?:both|copy|distillation)\)"
                        r"(?:, | and )?)+)", re.I)
ORDERED = re.compile(r'\b(below|behind|above|ahead|beats?|worse|better)\b|[<>≈]')
CHAIN_KEYS = re.compile(r'`(\w+)/(\w+)` (\d+\.\d+) ([<>≈]) (?=`(\w+)/(\w+)` (\d+\.\d+))')


def shifted():
    with open(os.path.join(VARIANTS, 'variants.json')) as f:
        return json.load(f)['shifted']


def beyond(v, shift, a, b):
    """a below b beyond the seeds' spread under a shift: their ranges of one std apart."""
    ra, rb = v[shift][a], v[shift][b]
    return ra['mean'] + ra['std'] < rb['mean'] - rb['std']


def shifts_named(sentence):
    """The shifts a sentence speaks of: 'under noise', 'under every shift but rotation', ..."""
    every = re.search(r'\b(?:under|on) every shift(?: but ([\w ]+?))?\b(?=[,.;:]|$| the| where)', sentence, re.I)
    if every:
        but = {SHIFT_WORDS.get(every[1].strip().lower())} if every[1] else set()
        return [s for s in ('translate', 'invert', 'rotate', 'blur', 'noise') if s not in but]
    return [SHIFT_WORDS[w.lower()] for w in re.findall(rf'\bunder {SHIFT}\b', sentence, re.I)]


def shift_problems(text, v):
    """What the sentences of a text that state an ordering under a shift say against variants.json, read by the rule:
    stated plainly, an ordering must hold beyond the seeds' spread; stated 'on the means only' (or as `≈`), it must
    hold on the means and not beyond. A sentence that names a shift and an ordering this reader cannot read fails."""
    out = []
    for s in sentences(text):
        chains = CHAIN_KEYS.findall(s)
        for sa, a, x, op, sb, b, y in chains:
            if sa != sb or sa == 'none':
                continue
            lo, hi = (a, b) if op == '<' else (b, a)
            apart = beyond(v, sa, lo, hi) or beyond(v, sa, hi, lo)
            if (op == '≈') == apart or (op != '≈' and not beyond(v, sa, lo, hi)):
                out.append(f'{sa}/{a} {op} {sb}/{b}: not what the rule gives')
        if not shifts_named(s):
            continue
        found = bool(chains)
        for word, obj, pairs in ONLY_UNDER.findall(s):          # '... behind scratch only under noise (both) and ...'
            found = True
            said = {(SHIFT_WORDS[w.lower()], m) for w, who in re.findall(r'(\w+) \((\w+)\)', pairs)
                    for m in SUBJECTS[who.lower()]}
            there = {(sh, m) for sh in v if sh != 'none' for m in ('copy', 'distill') if beyond(v, sh, m, OBJECTS[obj])}
            if said != there:
                out.append(f'behind {obj} beyond the spread only under {sorted(said)}: the data, {sorted(there)}')
        last, shifts = None, []
        for clause in re.split(r';', s):                        # a clause's shifts, else the clause's before it
            shifts = shifts_named(clause) or shifts
            means_only = re.search(r'on (?:the|its) means? only', clause) is not None
            for who, word, obj in CLAIM.findall(clause):
                found = True
                obj = last if obj.lower() == 'it' else OBJECTS[obj.lower()]
                last = obj
                for shift in shifts:
                    for m in SUBJECTS[who.lower()]:
                        lo, hi = (m, obj) if word.lower() in ('below', 'behind') else (obj, m)
                        on_means = v[shift][lo]['mean'] < v[shift][hi]['mean']
                        if means_only and not (on_means and not beyond(v, shift, lo, hi)):
                            out.append(f'{m} {word} {obj} under {shift} on the means only: not what the data give')
                        if not means_only and not beyond(v, shift, lo, hi):
                            out.append(f'{m} {word} {obj} under {shift}: not beyond the seeds\' spread '
                                       f'({v[shift][m]["mean"]:.2f} ± {v[shift][m]["std"]:.2f} against '
                                       f'{v[shift][obj]["mean"]:.2f} ± {v[shift][obj]["std"]:.2f})')
        if not found and ORDERED.search(s):
            out.append(f'an ordering under a shift this test cannot read: {s!r}')
    return out


def course_pages():
    """{page: its prose}: the README, the notebook's Markdown cells, the variants page."""
    import nbformat
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        pages = {'README.md': f.read()}
    with open(os.path.join(ROOT, 'tutorial.ipynb'), encoding='utf-8') as f:
        pages['tutorial.ipynb'] = '\n\n'.join(c.source for c in nbformat.read(f, as_version=4).cells
                                              if c.cell_type == 'markdown')
    with open(os.path.join(VARIANTS, 'README.md'), encoding='utf-8') as f:
        pages['variants/README.md'] = '\n\n'.join(p for p in f.read().split('\n\n') if not p.startswith(('|', '    ')))
    return pages


def test_every_ordering_under_a_shift_follows_the_notebooks_rule():
    v = shifted()
    for page, text in course_pages().items():
        assert shift_problems(text, v) == [], page


def test_the_notebook_states_the_rule_once():
    """Where 'beyond the seeds' spread' is first used, in section 9; no other Markdown cell defines it again."""
    import nbformat
    with open(os.path.join(ROOT, 'tutorial.ipynb'), encoding='utf-8') as f:
        cells = [c.source for c in nbformat.read(f, as_version=4).cells if c.cell_type == 'markdown']
    flat = [' '.join(c.split()) for c in cells]
    first = next(i for i, c in enumerate(flat) if "beyond the seeds' spread" in c.lower())
    rule = "*beyond the seeds' spread* when each mean ± its standard deviation stays clear of the other's"
    assert rule in flat[first] and flat[first].startswith("## 9. The paper's other questions")
    assert sum(rule in c for c in flat) == 1


@pytest.mark.parametrize('claim, wrong', [
    ('Under noise both transferred students fall far below scratch (copy 39.5 and distillation 37.3 against 64.4).',
     []),
    # the sentence the README had: under rotation distillation is below scratch on the means only
    ('Under noise both fall below scratch; under rotation copy and distillation fall below it too.',
     ["distill below scratch under rotate: not beyond the seeds' spread (51.16 ± 1.96 against 55.65 ± 3.46)"]),
    ('Under rotation, copy does better than scratch.',
     ["an ordering under a shift this test cannot read: 'Under rotation, copy does better than scratch.'"]),
    ('Under rotation distillation falls below scratch.',
     ["distill below scratch under rotate: not beyond the seeds' spread (51.16 ± 1.96 against 55.65 ± 3.46)"]),
    ('Under rotation copy falls below scratch too; distillation falls below it on the means only.', []),
    ('Under rotation copy falls below scratch on the means only.',
     ['copy below scratch under rotate on the means only: not what the data give']),
    ('Under every shift, both transferred students fall behind fine-tuning.',
     ["distill behind finetune under rotate: not beyond the seeds' spread (51.16 ± 1.96 against 55.45 ± 4.24)"]),
    ('Both transferred students fall behind fine-tuning under every shift but rotation.', []),
    ("Beyond the seeds' spread they fall behind scratch only under noise (both) and rotation (copy).", []),
    ("Beyond the seeds' spread they fall behind scratch only under noise (both) and rotation (both).",
     ["behind scratch beyond the spread only under [('noise', 'copy'), ('noise', 'distill'), ('rotate', 'copy'), "
      "('rotate', 'distill')]: the data, [('noise', 'copy'), ('noise', 'distill'), ('rotate', 'copy')]"]),
    ('Here: `rotate/distill` 51.16 < `rotate/scratch` 55.65.', ['rotate/distill < rotate/scratch: not what the rule gives']),
    ('Here: `rotate/distill` 51.16 ≈ `rotate/scratch` 55.65.', []),
    ('Here: `noise/copy` 39.51 ≈ `noise/scratch` 64.39.', ['noise/copy ≈ noise/scratch: not what the rule gives']),
])
def test_the_shift_reader_finds_what_disagrees(claim, wrong):
    """The checker itself, on sentences whose truth is known."""
    assert shift_problems(claim, shifted()) == wrong

# -----------------------------------------------------------------------------
# The size an image folder trains at by default, as README.md and REFERENCE.md state it, against the scripts' configs


def folder_sizes_stated():
    """{page: [each size the page states as a folder's default]}: the README's *Train on your data* ('trains at 28
    px', '(224 px by default'), REFERENCE.md's row for `folder` (its preset cell's 'N×N')."""
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        readme = ' '.join(re.search(r'^## Train on your data$(.*?)^## ', f.read(), re.M | re.S)[1].split())
    with open(os.path.join(ROOT, 'REFERENCE.md'), encoding='utf-8') as f:
        row = next(line for line in f if line.startswith('| `folder` |'))
    said = re.findall(r'\btrains? at (\d+) px|\((\d+) px by default|(\d+) px by default', readme)
    return {'README.md': [int(next(x for x in m if x)) for m in said],
            'REFERENCE.md': [int(n) for n in re.findall(r'(\d+)×\1', row.rsplit('|', 2)[1])[:1]]}


def test_the_pages_state_the_size_a_folder_trains_at():
    """Each training script, given `--data folder` and nothing else about the size, trains at the size both pages
    state (no preset: the config's default)."""
    import importlib
    from util.launch import parse_config
    sizes = set()
    for script, config in (('finetune', 'FinetuneConfig'), ('attention_copy', 'CopyConfig'),
                           ('attention_distill', 'DistillConfig')):
        mod = importlib.import_module(script)
        sizes.add(parse_config(getattr(mod, config), mod.PRESETS, ['--data', 'folder', '--teacher', 'unread.pt']
                               if script != 'finetune' else ['--data', 'folder']).img_size)
    assert len(sizes) == 1, sizes
    size = sizes.pop()
    stated = folder_sizes_stated()
    assert all(stated.values()), f'a page states no default size for a folder: {stated}'
    assert stated == {page: [size] * len(said) for page, said in stated.items()}, f'{size} px: {stated}'


def test_validations_targets_are_judged_by_their_intervals():
    """VALIDATION.md's table of targets: each verdict (met, missed, not decided) is where the test split's interval over
    seeds lies against the aim (tools/intervals.side), and the interval it states is results.json's."""
    from tools.intervals import side
    from tools.reproduce_report import difference
    summary = full_run()['summary']
    with open(os.path.join(FULL, 'VALIDATION.md'), encoding='utf-8') as f:
        rows = {m[1]: m for m in re.finditer(r'^\| (copy closes ≥ 50%|distillation closes ≥ 78%|ensemble > fine-tune) '
                                             r'\|.*\| \*\*(met|missed|not decided)\*\*[^|]*interval over seeds, '
                                             r'([+-]?\d+\.\d+) to ([+-]?\d+\.\d+)%?', f.read(), re.M)}
    assert len(rows) == 3, sorted(rows)
    verdict = {'above': 'met', 'below': 'missed', 'undecided': 'not decided'}
    for name, key, aim in (('copy closes ≥ 50%', 'copy', 0.5), ('distillation closes ≥ 78%', 'distill', 0.78)):
        share = summary['shares'][key]
        assert rows[name][2] == verdict[side(share, aim)], name
        assert (rows[name][3], rows[name][4]) == (f"{100 * share['low']:.1f}", f"{100 * share['high']:.1f}"), name
    gain = difference(summary, 'ensemble', 'finetune')
    assert rows['ensemble > fine-tune'][2] == verdict[side(gain, 0)]
    assert (rows['ensemble > fine-tune'][3], rows['ensemble > fine-tune'][4]) == (f"{gain['low']:+.2f}",
                                                                                  f"{gain['high']:+.2f}")


def test_copys_schedule_is_chosen_as_its_runs_say():
    """VALIDATION.md#copys-schedule against tools/copy_schedule.sh's runs: each schedule's mean ± std and seeds, the
    release's against the presets' seed by seed with its interval, and the choice it leads to (the release's schedule
    adopted only where its interval lies above 0)."""
    from tools.intervals import interval, paired, side
    with open(os.path.join(FULL, 'VALIDATION.md'), encoding='utf-8') as f:
        page = f.read()
    text = page[page.index("### Copy's schedule"):page.index('## History')]
    top1 = {}
    for name in ('today', 'release'):
        folder = os.path.join(FULL, 'validation', 'copy-schedule', name)
        top1[name] = {}
        for k in range(3):
            with open(os.path.join(folder, f'seed{k}', 'metrics.jsonl')) as f:
                top1[name][str(k)] = json.loads(f.read().splitlines()[-1])['top1']
            with open(os.path.join(folder, f'seed{k}', 'config.json')) as f:
                config = json.load(f)
            assert config['val_size'] == 5000 and config['seed'] == k and config['script'] == 'attention_copy.py'
            assert (config['min_lr_ratio'], config['layer_decay']) == ((0.25, 0.75) if name == 'release' else (0, 1))
        iv = interval(top1[name].values())
        row = next(line for line in text.splitlines() if f'`{name}`' in line)
        assert f"{iv['mean']:.2f} ± {iv['std']:.2f}" in row, row
        assert ' / '.join(f'{v:.2f}' for v in top1[name].values()) in row, row
    d = paired(top1['release'], top1['today'])
    flat = ' '.join(text.split())
    assert f"{d['mean']:.2f} ± {d['std']:.2f} points, seed by seed" in flat
    assert f"{d['low']:.2f} to {d['high']:+.2f}" in flat
    assert all(top1['release'][k] < top1['today'][k] for k in top1['today']) and 'lower on every seed' in flat
    assert side(d) == 'undecided' and '3 seeds do not decide it' in flat
    assert 'keeps the presets\' schedule' in flat and side(d) != 'above'   # adopted only above 0
