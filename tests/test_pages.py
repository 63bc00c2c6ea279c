"""The results pages are written by hand; every number they state is checked here against the files the run left:
a reproduction's RESULTS.md against its results.json (and the teacher checkpoint's record of how it was made); the
feature analysis's page, by the same reader, in tests/test_features_page.py. Each kind of statement is read by one
pattern whose numbers are computed again here from those files; a number that no pattern reads fails the page, so
that none goes unchecked. The table a page includes is the one its TABLE.md holds, and that is what the tool makes
now from the committed JSON. The reader itself is tested on a page with one number changed."""
import json
import math
import os
import re
import shutil
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

    from tools.intervals import side
    from tools.reproduce_report import difference
    summary = run['summary']
    n = len(seeds)

    def verdict(iv, than, missed):   # a sign only where the whole interval carries it
        return {'above': 'met', 'below': missed}.get(side(iv, than), f'not decided by {n} seeds: the interval '
                                                                     f'holds it')

    def against_aim(k):
        share = summary['shares'][k]
        return lambda g: (f'{gap[k]:.1f}', f"{100 * share['low']:.1f}", f"{100 * share['high']:.1f}", g[3],
                          verdict(share, int(g[3]) / 100, 'missed: the whole interval lies below it'),
                          f'{paper_gap[k]:.1f}')
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
        (r"Order of the means here(?:, one seed's draw)?: ((?:[a-z-]+ \d+\.\d+ [>=] )+[a-z-]+ \d+\.\d+);", (chain(mean, 2),)),
        (r"the paper's: ((?:[a-z-]+ \d+\.\d [>=] )+[a-z-]+ \d+\.\d)\.", (chain(PAPER, 1),)),
        (r'- command: `([^`]+)`(?: \(run as `([^`]+)`, where the driver then was\))?',
         (now, typed) if now != typed else (typed, None)),
        (r'- git commit: ([0-9a-f]{40})', (run['git_commit'],)),
        (r'- machine: (.+?) - every stage', (run['machine'],)),
        (r'were `([^`]+)/<stage>/seed<k>`', (root,)),
        (r'`python -m tools\.reproduce_report results/([\w-]+)`', (name,)),
        (r'the run ended (\d{4}-\d\d-\d\d \d\d:\d\d) UTC',
         (time.strftime('%Y-%m-%d %H:%M', time.gmtime(max(r['started'] + r['wall_s'] for r in run['stages']))),)),
    ]
    if run['config']['quick']:   # a smoke run states no aim
        return checks + [(r'here (both|not both) transfer methods beat scratch \(copy ([+-][\d.]+), distillation '
                          r'([+-][\d.]+) points\)', ('both' if min(above.values()) > 0 else 'not both',
                                                     f"{above['copy']:+.2f}", f"{above['distill']:+.2f}"))]
    fine_distill = difference(summary, 'finetune', 'distill')
    ensemble_over = difference(summary, 'ensemble', 'finetune')
    share_pattern = (r"closes ([\d.]+)% of the gap \(per seed, 95% interval ([\d.]+) to ([\d.]+)%; the aim: ≥ (\d+)%, "
                     r"(met|missed: the whole interval lies below it|not decided by \d+ seeds: the interval holds it)\); "
                     r"the paper's, ([\d.]+)%")
    aims = [   # a result is read against the aims, each by its interval; a smoke run (--quick) is not, and states none
        (r'What every seed carries: ((?:[a-z-]+ [<?] )+[a-z-]+);', (summary['every_seed'].replace('finetune', 'fine-tune')
                                                       .replace('distill', 'distillation'),)),
        (r'fine-tuning ends ([\d.]+) points above distillation \(95% interval ([\d.]+) to ([\d.]+)\)',
         (f"{fine_distill['mean']:.2f}", f"{fine_distill['low']:.2f}", f"{fine_distill['high']:.2f}")),
        (r'attention copy ' + share_pattern, against_aim('copy')),
        (r'attention distillation ' + share_pattern, against_aim('distill')),
        (r"the ensemble is ([+-][\d.]+) points against fine-tuning alone \(95% interval ([+-][\d.]+) to ([+-][\d.]+); "
         r"the aim: above it, (met|missed: the whole interval lies below it|not decided by \d+ seeds: the interval "
         r"holds it)\); the paper's, ([+-][\d.]+)",
         (f'{over:+.2f}', f"{ensemble_over['low']:+.2f}", f"{ensemble_over['high']:+.2f}",
          verdict(ensemble_over, 0, 'missed: the whole interval lies below it'),
          f"{PAPER['ensemble'] - PAPER['finetune']:+.1f}")),
    ]
    checks += aims
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
def test_a_smoke_run_is_called_one_and_sets_no_aims(name, tmp_path):
    """A --quick run's page is titled a smoke run, not the paper's Table 1, states no aim met or missed, and its figure
    says it is a smoke run above its panels; the committed reproduction's page and figure are a result's."""
    from tools.reproduce_report import plot
    _, run, _, page = reproduction(name)
    quick, title = run['config']['quick'], page.splitlines()[0]
    assert ('smoke run' in title and 'Table 1' not in title) == quick, title
    assert ('the aim' in page) == (not quick)
    fig = plot(run['summary'], tmp_path / 'results.png', smoke=quick)
    assert ('smoke run' in fig.get_suptitle()) == quick


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
    ('95% interval 18.9 to 40.2%', '95% interval 18.9 to 40.3%', "'40.2'"),
    ('the aim: above it, met', 'the aim: above it, not decided by 3 seeds: the interval holds it', "'met'"),
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
# The README's sentence on a longer-trained teacher, against the validation runs it cites


def test_the_readme_states_what_a_longer_trained_teacher_lifts():
    """'Against a finished 24-epoch teacher, a 48-epoch one lifts fine-tuning +a, copy +b and distillation +c': each
    the last top-1 of the 48-epoch teacher's student minus the finished 24-epoch one's (VALIDATION.md#teacher)."""
    def last(run):
        with open(os.path.join(ROOT, 'results', 'fashion-mnist', 'validation', run, 'metrics.jsonl')) as f:
            return json.loads(f.read().splitlines()[-1])['top1']
    lifts = tuple(f'{last(f"bf16-{m}48") - last(f"bf16-{m}24"):.2f}' for m in ('ft', 'copy', 'distill'))
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = flat(f.read())
    found = re.search(r'Against a finished 24-epoch teacher, a 48-epoch one lifts fine-tuning \+([\d.]+), copy '
                      r'\+([\d.]+) and distillation \+([\d.]+)', text)
    assert found, 'the README no longer states the 48-epoch teacher\'s lifts'
    assert found.groups() == lifts
