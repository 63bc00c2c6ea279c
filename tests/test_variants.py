"""tools/variants.py against runs written out by hand (mean, std, gap closed, the shifted images' rows, the wall
time), its figure in the palette's colours, and results/fashion-mnist/variants/README.md against its variants.json:
every number a table or a sentence of the page states, and every ordering a sentence states."""
import json
import os
import re

import matplotlib
import pytest
from matplotlib.colors import to_hex

from conftest import ROOT, run_in_process
from tools import palette, variants
from tools.intervals import paired, side

matplotlib.use('Agg')

PAGE = os.path.join(ROOT, 'results', 'fashion-mnist', 'variants')


def write_run(folder, top1s, wall=None):
    os.makedirs(folder)
    with open(os.path.join(folder, 'config.json'), 'w') as f:   # what made it: a run of tools/variants.sh
        json.dump({'argv': ['attention_distill.py']}, f)
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        f.writelines(json.dumps({'epoch': e, 'step': 10 * e, 'top1': t}) + '\n' for e, t in enumerate(top1s, 1))
    if wall is not None:
        with open(os.path.join(folder, 'wall_s.txt'), 'w') as f:
            f.write(f'{wall}\n')


@pytest.fixture
def tree(tmp_path, monkeypatch):
    here, out = tmp_path / 'fm', tmp_path / 'fm' / 'variants'
    for method, finals in {'scratch': (80, 82), 'finetune': (90, 92), 'copy': (83, 85), 'distill': (88, 88)}.items():
        for seed, top1 in enumerate(finals):
            write_run(here / 'logs' / method / f'seed{seed}', [50, top1])
    write_run(out / 'logs' / 'distill-q' / 'seed0', [60, 86], wall=100)
    write_run(out / 'logs' / 'distill-q' / 'seed1', [60, 87], wall=200)
    os.makedirs(out / 'logs' / 'distill-q' / 'seed2')                       # a run not finished: left out
    rows = [{'top1': {'none': t, 'invert': t / 2}} for t in (80, 90, 84, 88, 91)]
    os.makedirs(out / 'shift' / 'seed0')
    (out / 'shift' / 'seed0' / 'robustness.json').write_text(json.dumps({'rows': rows}))
    (out / 'shift' / 'seed0' / 'wall_s.txt').write_text('30')
    monkeypatch.setattr(variants, 'HERE', str(here))
    monkeypatch.setattr(variants, 'OUT', str(out))
    return out


def test_collect_against_numbers_worked_by_hand(tree):
    r = variants.collect()
    assert r['baselines']['scratch']['mean'] == 81 and r['baselines']['finetune']['mean'] == 91
    q = r['runs']['distill-q']
    assert q['seeds'] == {0: 86, 1: 87} and q['mean'] == 86.5
    assert q['std'] == pytest.approx(0.5 ** 0.5) and q['gap'] == pytest.approx(55.0)
    assert r['baselines']['distill']['gap'] == pytest.approx(70.0) and r['baselines']['distill']['std'] == 0
    assert r['shifted']['invert']['ensemble']['mean'] == 45.5
    assert r['shifted']['invert']['copy']['gap'] == pytest.approx(40.0)    # (42 - 40) / (45 - 40)
    assert r['wall_s'] == 330


def test_the_figure_draws_each_method_in_its_colour(tree, monkeypatch, tmp_path):
    odd = {k: f'#{17 * (i + 1):02x}{(40 + 23 * i) % 256:02x}{(200 - 19 * i) % 256:02x}'
           for i, k in enumerate(palette.PALETTE)}
    for k, c in odd.items():
        monkeypatch.setitem(palette.PALETTE, k, c)
    rows = [{'top1': {'none': t + 1, 'invert': t / 2 + 3}} for t in (80, 90, 84, 88, 91)]   # seed 1
    os.makedirs(tree / 'shift' / 'seed1')
    (tree / 'shift' / 'seed1' / 'robustness.json').write_text(json.dumps({'rows': rows}))
    (tree / 'shift' / 'seed1' / 'wall_s.txt').write_text('30')
    fig = variants.plot(variants.collect(), tmp_path / 'v.png')
    left, right = fig.axes
    bars = {}                                  # each method's error bars on the shifted images: its std
    for c in right.collections:
        bars[to_hex(c.get_color()[0])] = sorted(s[1][1] - s[0][1] for s in c.get_segments())
    spread = pytest.approx([2 * 0.5 ** 0.5, 2 * 4.5 ** 0.5])                 # none, invert
    assert bars == {odd[m]: spread for m in variants.METHODS}
    assert {to_hex(c) for s in left.collections for c in s.get_facecolor()} == {odd['distill']}
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        assert labels and all(to_hex(h.get_color()) == to_hex(palette.colour(label)) for h, label in zip(handles, labels))
        assert 'does not start at 0' in ax.get_title()
    assert [t.get_text() for t in left.get_yticklabels()] == ['distillation, queries only']   # the course's names


@pytest.mark.parametrize('name, shown', [('copy-v', 'copy, values only'), ('distill-heads4', 'distillation, 4 heads of 8'),
                                         ('distill-layers3-5', 'distillation, blocks 3-5'),
                                         ('distill-layer0', 'distillation, block 0 alone'),
                                         ('copy-mean-queries', 'copy, maps averaged over queries'),
                                         ('distill-local', 'distillation, a locality prior, no teacher')])
def test_the_figure_names_runs_as_the_course_does(name, shown):
    assert variants.label(name) == shown

@pytest.mark.parametrize('damage', ['an empty metrics.jsonl', 'a missing wall_s.txt', 'a nan top-1',
                                    'a nan shifted top-1'])
def test_a_damaged_file_is_one_line_naming_it(tree, monkeypatch, damage):
    """Each ended in a traceback (a nan top-1 in a mean of nan, written without a word)."""
    run = tree / 'logs' / 'distill-q' / 'seed1'
    named = {'an empty metrics.jsonl': run / 'metrics.jsonl',
             'a missing wall_s.txt': run / 'wall_s.txt', 'a nan top-1': run / 'metrics.jsonl',
             'a nan shifted top-1': tree / 'shift' / 'seed0' / 'robustness.json'}[damage]
    if damage == 'a missing wall_s.txt':
        named.unlink()
    elif damage == 'a nan shifted top-1':
        named.write_text(named.read_text().replace('80', 'NaN', 1))
    else:
        named.write_text({'an empty metrics.jsonl': '',
                          'a nan top-1': '{"epoch": 1, "step": 10, "top1": NaN}\n'}[damage])
    before = sorted(os.listdir(tree))
    msg = run_in_process(monkeypatch, variants, '--dirty', 'true')
    fix = 'run the same command again' if damage == 'an empty metrics.jsonl' else 'move it away'
    assert msg and msg.startswith(f'error: {named}') and fix in msg, msg
    assert sorted(os.listdir(tree)) == before   # variants.json and the figure not written


# -----------------------------------------------------------------------------
# The page against its data

CELL = re.compile(r'^(-?\d+\.\d+)(?: ± (\d+\.\d+))?$|^(-?\d+\.\d+)%$|^(-?\d+\.\d+(?: / -?\d+\.\d+)+)$')
PAIR = re.compile(r'`([\w/-]+)` (-?\d+\.\d+)(%?)')
CHAIN = re.compile(r'`([\w/-]+)` (-?\d+\.\d+)%? ([<>=≈]) (?=`([\w/-]+)` (-?\d+\.\d+)%?)')
COMPARES = re.compile(r'\b(above|below|beats?|behind|ahead|higher|lower|better|worse|best|worst|more|less|falls?|'
                      r'drops?|hurts?|helps?|gains?|loses?|costs?)\b')


@pytest.fixture(scope='module')
def page():
    with open(os.path.join(PAGE, 'variants.json')) as f:
        data = json.load(f)
    with open(os.path.join(PAGE, 'README.md')) as f:
        return f.read(), data


def entry(data, key):
    """A run, a baseline, or 'shift/method' of the shifted test images."""
    if '/' in key:
        shift, method = key.split('/')
        return data['shifted'][shift][method]
    return data['runs'].get(key) or data['baselines'][key]


def agrees(value, text):
    digits = len(text.split('.')[1])
    return value is not None and round(value, digits) == float(text)


def table_problems(text, data):
    out, header = [], []
    for line in text.splitlines():
        if not line.startswith('|'):
            header = []
            continue
        cells = [c.strip() for c in line.strip('|').split('|')]
        if not header:
            header = cells
            continue
        key = re.fullmatch(r'`([\w/-]+)`', cells[0])
        if not key:
            continue
        for column, cell in zip(header[1:], cells[1:]):
            m = CELL.match(cell)
            if not m:
                continue
            on = re.fullmatch(r'`([\w-]+)`', column)            # the shifted images: a method per column
            r = entry(data, f'{key[1]}/{on[1]}' if on else key[1])
            if m[1] and not (agrees(r['mean'], m[1]) and (m[2] is None or agrees(r['std'], m[2]))):
                out.append(f'{key[1]} {column}: {cell}, the data {r["mean"]:.2f} ± {r["std"]:.2f}')
            if m[3] and not agrees(r['gap'], m[3]):
                out.append(f'{key[1]} {column}: {cell}, the data {r["gap"]:.1f}%')
            if m[4] and [float(v) for v in m[4].split(' / ')] != [round(v, 2) for v in r['seeds'].values()]:
                out.append(f'{key[1]} {column}: {cell}, the data {list(r["seeds"].values())}')
    return out


def sentences(text):
    prose = [line for line in text.splitlines() if line.strip() and not line.startswith(('|', '#', '    ', '!['))]
    return re.split(r'(?<=[.;:])\s+(?=[A-Z(`])', ' '.join(' '.join(prose).split()))


def prose_problems(text, data):
    out = []
    for s in sentences(text):
        for key, number, percent in PAIR.findall(s):
            r = entry(data, key)
            if not agrees(r['gap' if percent else 'mean'], number):
                out.append(f'{key} {number}{percent}: the data {r["gap" if percent else "mean"]:.2f}')
        chains = CHAIN.findall(s)
        for a, x, op, b, y in chains:
            ra, rb = entry(data, a), entry(data, b)
            holds = {'>': float(x) > float(y), '<': float(x) < float(y), '=': x == y,
                     '≈': decided(ra, rb) == 'undecided'}[op]
            if not holds:
                out.append(f'{a} {x} {op} {b} {y} does not hold')
        rest = re.sub(r'arXiv \d{4}\.\d{4,5}', '', PAIR.sub('', s))         # a paper's number is no measurement
        for number in re.findall(r'-?\d+\.\d+', rest):
            if not re.search(rf'{re.escape(number)} h\b', rest) or not agrees(data['wall_s'] / 3600, number):
                out.append(f'{number}: a number this test cannot check, in {s!r}')
        if COMPARES.search(s) and '`' in s and not chains:
            out.append(f'a comparison stated without the numbers that show it: {s!r}')
    return out


def test_every_number_of_the_tables_is_the_datas(page):
    text, data = page
    assert table_problems(text, data) == []
    assert len(re.findall(r'^\| `', text, re.M)) >= 20                  # the tables are read, not skipped


def test_every_number_and_ordering_of_the_sentences_is_the_datas(page):
    text, data = page
    assert prose_problems(text, data) == []


def test_the_checks_catch_a_wrong_number_and_a_wrong_ordering(page):
    _, data = page
    d = data['runs']['distill-q']
    wrong = f"Queries alone: `distill-q` {d['mean'] + 0.5:.2f}."
    assert prose_problems(wrong, data)
    worse = f"`distill-q` {d['mean']:.2f} < `distill-q` {d['mean']:.2f} is stated here."
    assert prose_problems(worse, data)
    assert prose_problems('Queries alone do better than `distill-q`.', data)
    assert table_problems(f"| run | mean |\n|---|---|\n| `distill-q` | {d['mean'] + 0.01:.2f} ± {d['std']:.2f} |",
                          data)


def decided(ra, rb):
    """Where the 95% interval over seeds of a - b, taken seed by seed, lies (tools/intervals.py): 'above', 'below' or
    'undecided'."""
    return side(paired(ra['seeds'], rb['seeds']))


def spread_problems(text, data):
    """The orderings (`<`, `>`) a page states between runs the seeds do not order (the interval of their difference
    holds 0, or lies on the other side), in a sentence that does not say it compares the means."""
    prose = ' '.join(line for line in text.splitlines()
                     if line.strip() and not line.startswith(('|', '#', '    ', '![')))
    out = []
    for s in re.split(r'(?<=\.)\s+(?=[A-Z(`])', ' '.join(prose.split())):
        for a, x, op, b, y in CHAIN.findall(s):
            if op in '<>' and decided(entry(data, a), entry(data, b)) != {'>': 'above', '<': 'below'}[op] \
                    and not re.search(r'\bmeans?\b', s):
                out.append(f'{a} {op} {b}: not decided by the seeds, stated as an ordering')
    return out


def test_every_ordering_is_stated_as_far_as_its_seeds_decide_it(page):
    text, data = page
    assert spread_problems(text, data) == []
    q, k = data['runs']['copy-q'], data['runs']['copy-k']
    assert decided(q, k) == 'undecided'
    assert spread_problems(f"Queries help most: `copy-q` {q['mean']:.2f} > `copy-k` {k['mean']:.2f}.", data)
    assert not spread_problems(f"On the means: `copy-q` {q['mean']:.2f} > `copy-k` {k['mean']:.2f}.", data)


def test_the_page_says_later_layers_matter_more_only_where_the_data_does(page):
    """The one-block runs: 'later layers matter more' would need the gap closed to rise block by block; the page says
    it does not, and that only the first two blocks matter less (each of blocks 2-5 above both)."""
    text, data = page
    gap = [data['runs'][f'distill-layer{i}']['gap'] for i in range(6)]
    halves = [data['runs'][f'distill-layers{h}']['gap'] for h in ('0-2', '3-5')]
    rises = all(a < b for a, b in zip(gap[2:], gap[3:])) and halves[1] > halves[0]
    said = ' '.join(text.split())
    assert ('Later layers do not matter more here' in said) == (not rises)
    assert 'only the first two blocks matter less' in said and min(gap[2:]) > max(gap[:2])
    assert 'each later block more again' not in said
