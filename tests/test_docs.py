"""The front page, RECIPES.md, the pages under results/ and teachers/ and the notebook's text: every relative
Markdown link points at a file or folder of the repository; the README's first screen holds the figure, the
reading order and the commands; every command it names exists and its flags parse; and its first command
leaves a fresh clone's `git status` clean."""
import dataclasses
import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, sub_env
from util.launch import parse_config

PAGES = ['README.md', 'REFERENCE.md', 'RECIPES.md', *sorted(os.path.relpath(p, ROOT) for folder in ('results', 'teachers')
                                             for p in glob.glob(os.path.join(ROOT, folder, '**', '*.md'), recursive=True)),
         'tutorial.ipynb']
# the target of [text](target), ![alt](target "title"), [![badge](image)](target), <angle brackets> allowed;
# code spans and blocks are skipped
LINK = re.compile(r'\]\(\s*(?:<([^>]*)>|([^)\s]+))')
CODE = re.compile(r'```.*?```|`[^`\n]*`', re.S)


def links(text):
    return [a or b for a, b in LINK.findall(CODE.sub('', text))]


def read_page(page):
    """A Markdown file's text; for a notebook, the text of its Markdown cells."""
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        if not page.endswith('.ipynb'):
            return f.read()
        return '\n\n'.join(''.join(c['source']) for c in json.load(f)['cells'] if c['cell_type'] == 'markdown')


def test_link_pattern_finds_links_and_skips_code():
    text = ('[a](x.md) ![b](img/y.png "title") [![badge](https://b.svg)](https://c.org/) `[no](code.md)`\n'
            '```\n[no](block.md)\n```\n[c](<with space.md>) [d](#anchor)')
    assert links(text) == ['x.md', 'img/y.png', 'https://b.svg', 'https://c.org/', 'with space.md', '#anchor']


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_exist(page):
    dead = []
    for target in links(read_page(page)):
        if re.match(r'[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):   # a URL, or a heading anchor
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target.split('#')[0]))
        if not path.startswith(ROOT) or not os.path.exists(path):
            dead.append(target)
    assert not dead, f'{page} links to missing files: {dead}'

# -----------------------------------------------------------------------------
# The README: its first screen, and every command it names


def code_lines(text):
    """The command lines of the ```bash blocks of a Markdown text, continuation lines joined, comments cut."""
    lines = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' #')[0].strip()
            if line and not line.startswith('#'):
                lines.append(line)
    return lines


def test_readme_first_screen():
    """Within its first 40 lines: the figure with a caption, a reading order of files that exist, the commands."""
    first = '\n'.join(read_page('README.md').splitlines()[:40])
    figure = re.search(r'^!\[[^\]]+\]\(([^)]+\.png)\)\n\*[^*]+\*', first, re.M)
    assert figure and os.path.isfile(os.path.join(ROOT, figure[1])), 'no figure with its caption on the first screen'
    order = re.findall(r'^\d+\. \[`([^`]+)`\]', first, re.M)
    assert len(order) >= 5, f'no reading order of files on the first screen: {order}'
    assert all(os.path.isfile(os.path.join(ROOT, f)) for f in order), order
    assert code_lines(first), 'no commands on the first screen'


def test_the_readme_opens_the_notebook_before_anything_else():
    """The front door: before the reading order, a virtual environment made and entered first (a Debian Python
    refuses pip outside one; git ignores it), PyTorch's CPU-only index for a machine without a GPU, then one command
    that installs what the notebook needs, Jupyter included (requirements.txt names none), and opens tutorial.ipynb
    with it; Colab as it stands. The sources of the timings (a run's minutes of CPU, the shell's clock) are on
    REFERENCE.md and the results pages, not here."""
    text = read_page('README.md')
    door = text.split('## Read in this order')[0]
    lines = code_lines(door)
    venv = [shlex.split(part) for part in lines[0].split('&&')]
    assert venv[0][:3] == ['python3', '-m', 'venv'] and venv[1] == ['.', f'{venv[0][3]}/bin/activate'], lines[0]
    with open(os.path.join(ROOT, '.gitignore')) as f:
        assert f'{venv[0][3]}/' in f.read().split(), 'the environment in the clone is not ignored by git'
    cpu = shlex.split(lines[1])
    assert cpu[:4] == ['pip', 'install', '-r', 'requirements.txt'] and \
        cpu[4:] == ['--extra-index-url', 'https://download.pytorch.org/whl/cpu'], lines[1]
    opens = [line for line in lines if 'tutorial.ipynb' in line]
    assert opens, 'no command before the reading order opens tutorial.ipynb'
    parts = [shlex.split(part) for part in opens[0].split('&&')]
    install = next((p for p in parts if p[:3] == ['pip', 'install', '-r']), None)
    assert install and install[3] == 'requirements.txt' and {'jupyterlab', 'notebook'} & set(install[4:]), parts
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        assert 'jupyter' not in f.read(), 'requirements.txt installs Jupyter: the command need not name it'
    assert parts[-1][:2] in (['jupyter', 'lab'], ['jupyter', 'notebook']) and parts[-1][2] == 'tutorial.ipynb', parts
    assert 'Colab' in door and 'REPO_URL' in door
    assert not re.search(r'of CPU|from the shell|taskset', text), 'timing provenance on the front page'


# a finding stated as the paper's: its verbs, and the words of a second-hand summary
AS_THE_PAPERS = re.compile(r"\b(?:the paper(?:'s)?|Li et al\.?)\b[^.]*?"
                           r"\b(?:finds?|found|reports?|reported|shows?|showed|says|saturates?)\b"
                           r"|\breportedly\b|summaries of it", re.I)
# where in arXiv 2411.09702 it is said: a part a reader can turn to
CITED = re.compile(r'\b(?:Abstract|Section \d|§ ?\d|Table \d|Fig(?:ure|\.) ?\d)')
COURSE_PAGES = ['README.md', 'results/fashion-mnist/WHY.md', 'results/fashion-mnist/variants/README.md',
                'results/fashion-mnist/VALIDATION.md', 'results/fashion-mnist/RESULTS.md', 'teachers/README.md',
                'tutorial.ipynb']


def uncited(text):
    """The sentences of a text that state a finding as the paper's without naming where in it (a section, table,
    figure, or its abstract)."""
    flat = ' '.join(CODE.sub('', text).split())
    return [s for s in re.split(r'(?<=[.:])\s+(?=[A-Z*])', flat) if AS_THE_PAPERS.search(s) and not CITED.search(s)]


@pytest.mark.parametrize('page', COURSE_PAGES)
def test_the_paper_is_cited_where_it_speaks(page):
    """Every finding a course page states as the paper's names the part of arXiv 2411.09702 that states it; a line
    that cannot be sourced is not there (no 'reportedly', no summary of summaries)."""
    assert uncited(read_page(page)) == [], page
    assert uncited('Queries alone reportedly do best. The paper finds that heads saturate near 12 of 16.') == [
        'Queries alone reportedly do best.', 'The paper finds that heads saturate near 12 of 16.']
    assert uncited('The paper finds the ensemble above either (arXiv 2411.09702, Abstract).') == []


def script_of(command):
    """(script path or tools.NAME module, its arguments) of a `python ...` / `torchrun ...` line; None if neither."""
    for part in command.split('&&'):
        args = shlex.split(part)
        if args and args[0] in ('python', 'torchrun'):
            rest = [a for a in args[1:] if a.endswith('.py')][:1] if args[0] == 'torchrun' else args[1:]
            if args[:3] == ['python', '-m', 'pytest'] or not rest:
                continue
            if rest[0] == '-m':
                return rest[1], rest[2:]
            i = args.index(rest[0])
            return rest[0], args[i + 1:]
    return None


README_COMMANDS = [c for c in map(script_of, code_lines(read_page('README.md'))) if c]
# the README's commands, then those of the reference page it links for everything that is not the course
DOC_COMMANDS = README_COMMANDS + [c for c in map(script_of, code_lines(read_page('REFERENCE.md'))) if c]


def test_readme_names_commands():
    assert len(DOC_COMMANDS) >= 10, DOC_COMMANDS
    assert len(README_COMMANDS) >= 5, README_COMMANDS


@pytest.mark.parametrize('script, args', DOC_COMMANDS, ids=[' '.join([s, *a])[:60] for s, a in DOC_COMMANDS])
def test_readme_command_exists_and_parses(script, args):
    """Every script the README and REFERENCE.md run exists, and its flags parse with that script's config and
    presets: an unknown flag or a bad value would stop it here, before anything is made or loaded."""
    module = script[:-3].replace('/', '.') if script.endswith('.py') else script
    assert os.path.isfile(os.path.join(ROOT, module.replace('.', '/') + '.py')), f'{script}: no such file'
    mod = importlib.import_module(module)
    if hasattr(mod, 'parser'):   # a tool of plain argparse (tools/curves.py): its own parser
        mod.parser().parse_args(args)
        return
    cls = next(v for v in vars(mod).values() if dataclasses.is_dataclass(v) and v.__module__ == mod.__name__
               and 'Config' in v.__name__ and v.__name__ != 'TransferConfig')
    parse_config(cls, getattr(mod, 'PRESETS', None), args)


def first_command():
    """The arguments of the README's first command (the quick reproduction), as a newcomer types it."""
    script, args = README_COMMANDS[0]
    assert script == 'tools.reproduce', README_COMMANDS[0]
    return args


def test_the_folder_section_makes_its_own_teacher_first():
    """*Train on your data* pre-trains a teacher on the folder before any student takes one: its first command is
    mae_pretrain.py on the folder the students read, and every --teacher there is a checkpoint one of its commands
    writes (not the Fashion-MNIST teacher of the three commands above)."""
    section = re.search(r'^## Train on your data$(.*?)^## ', read_page('README.md'), re.M | re.S)[1]
    commands = [script_of(line) for line in code_lines(section)]
    commands = [c for c in commands if c]
    options = [dict(zip(args[::2], args[1::2])) for _, args in commands]
    assert commands[0][0] == 'mae_pretrain.py' and options[0]['--data'] == 'folder', commands[0]
    folders = {o['--data-dir'] for o in options if '--data-dir' in o}
    assert len(folders) == 1, folders
    written = {os.path.join(o['--out-dir'], 'checkpoint.pt') for o in options if '--out-dir' in o}
    teachers = [o['--teacher'] for o in options if '--teacher' in o]
    assert teachers and all(t in written for t in teachers), (teachers, written)
    first = [i for i, o in enumerate(options) if '--teacher' in o][0]
    assert os.path.join(options[0]['--out-dir'], 'checkpoint.pt') in teachers and first > 0


def test_readme_first_command_leaves_git_status_clean(tmp_path):
    """The first command in a fresh clone, on fake images and 2 steps a stage instead of the quick command's 80:
    everything it writes (runs, report) lands where git ignores it."""
    if subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True).returncode:
        pytest.skip('the repository is not a git checkout')
    args = first_command()
    assert args[:2] == ['--data', 'fashion-mnist'] and not {'--out-dir', '--results-dir'} & set(args), args
    clone = tmp_path / 'clone'
    subprocess.run(['git', 'clone', '-q', '--depth', '1', f'file://{ROOT}', str(clone)], check=True)
    tiny = ['--data', 'fake', *args[2:], '--fake-size', '256', '--num-workers', '0', '--max-steps', '2']
    p = subprocess.run([sys.executable, '-m', 'tools.reproduce', *tiny], cwd=clone, env=sub_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f'tools.reproduce failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    assert glob.glob(str(clone / 'runs' / '**' / 'TABLE.md'), recursive=True), 'no report under runs/'
    status = subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == '', f'the README\'s first command changed the checkout:\n{status.stdout}'

# -----------------------------------------------------------------------------
# The README's table of budgets, against the code that sets each: the notebook's MODE cell, the scripts' preset,
# tools/reproduce.py's preset and --quick


BUDGET_NAMES = ('the hand-written loop', 'notebook quick mode', 'notebook full mode', 'the committed reproduction',
                'the quick command')
TRAIN, TEST = 60000, 10000      # Fashion-MNIST's splits


def budget_rows(text):
    """{name: {column: cell}} of the README's table of budgets."""
    table = re.search(r'^\| budget \|.*?(?=\n\n)', text, re.M | re.S)
    assert table, 'the README has no table of budgets'
    head, _, *rows = [[c.strip() for c in line.strip('|').split('|')] for line in table[0].splitlines()]
    return {r[0]: dict(zip(head, r)) for r in rows}


def number(cell):
    return float(re.match(r'[\d,.]+', cell)[0].replace(',', ''))


def notebook_cell(marker):
    """The code cell of the notebook that holds `marker`, parsed."""
    import ast
    with open(os.path.join(ROOT, 'tutorial.ipynb'), encoding='utf-8') as f:
        cell = next(''.join(c['source']) for c in json.load(f)['cells']
                    if c['cell_type'] == 'code' and marker in ''.join(c['source']))
    return ast.parse(cell)


def notebook_loop():
    """(steps, batch, lr, test images) of the notebook's hand-written loop, read from the cell that defines train."""
    import ast
    line = next(n for n in notebook_cell('def train(').body if isinstance(n, ast.Assign)
                and isinstance(n.targets[0], ast.Tuple)
                and [t.id for t in n.targets[0].elts] == ['STEPS', 'BATCH', 'LR', 'W', 'N_EVAL'])
    steps, batch, lr, _, test = ast.literal_eval(line.value)
    return steps, batch, lr, test


def notebook_budget():
    """(training images, test images, flags) of the notebook's quick mode: QUICK and SLICE, read from the cell that
    starts the runs, where quick mode trains on write_slice(*SLICE, RUNS_DIR) with BUDGET = QUICK."""
    import ast
    tree = notebook_cell("if MODE == 'quick':")
    named = {n.targets[0].id: ast.literal_eval(n.value) for n in tree.body
             if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name) and n.targets[0].id in ('QUICK', 'SLICE')}
    quick = next(n for n in tree.body if isinstance(n, ast.If)).body
    assert any(ast.unparse(n) == 'DATA_DIR, BUDGET = (write_slice(*SLICE, RUNS_DIR), QUICK)' for n in quick), \
        [ast.unparse(n) for n in quick]
    (n_train, n_test), flags = named['SLICE'], named['QUICK']
    return n_train, n_test, dict(zip(flags[::2], flags[1::2]))


def expected_budgets():
    """What each budget is, from the code: images, steps, batch, epochs, peak lr, warm-up (epochs), seeds."""
    import attention_copy
    import attention_distill
    import finetune
    from tools import reproduce
    teacher = ['--teacher', 'teachers/fashion-mnist-mae.pt']
    presets = [parse_config(cls, mod.PRESETS, ['--data', 'fashion-mnist', '--out-dir', 'x', *extra])
               for mod, cls, extra in ((finetune, finetune.FinetuneConfig, []),
                                       (attention_copy, attention_copy.CopyConfig, teacher),
                                       (attention_distill, attention_distill.DistillConfig, teacher))]
    keys = ('epochs', 'batch_size', 'blr', 'warmup_epochs')
    assert len({tuple(getattr(p, k) for k in keys) for p in presets}) == 1, 'the scripts differ in their budget'
    p = presets[0]
    per_epoch = lambda n, batch: n // batch    # the training loader drops its last, partial batch
    out = {'notebook full mode': dict(train=TRAIN, test=TEST, batch=p.batch_size, epochs=p.epochs,
                                      steps=per_epoch(TRAIN, p.batch_size) * p.epochs,
                                      lr=p.blr * p.batch_size / 256, warmup=p.warmup_epochs, seeds=1)}
    steps, batch, lr, test = notebook_loop()       # every training image seen once, one lr throughout
    out['the hand-written loop'] = dict(train=steps * batch, test=test, batch=batch, epochs=1, steps=steps, lr=lr,
                                        warmup=0, seeds=1)
    n_train, n_test, f = notebook_budget()
    out['notebook quick mode'] = dict(train=n_train, test=n_test, batch=f['--batch-size'], epochs=f['--epochs'],
                                      steps=per_epoch(n_train, f['--batch-size']) * f['--epochs'],
                                      lr=f['--blr'] * f['--batch-size'] / 256, warmup=f['--warmup-epochs'], seeds=1)
    for name, argv in (('the committed reproduction', []), ('the quick command', ['--quick', 'true'])):
        r = reproduce.parse(['--data', 'fashion-mnist', *argv])
        batch, blr = r.batch_size or p.batch_size, r.blr or p.blr          # 0: each script's own
        whole = per_epoch(TRAIN, batch) * r.epochs
        out[name] = dict(train=TRAIN, test=TEST, batch=batch, epochs=r.epochs, whole=whole,
                         steps=min(r.max_steps, whole) if r.max_steps else whole, lr=blr * batch / 256,
                         warmup=r.epochs / 10, seeds=len(r.seeds))
    return out


def budget_problems(text):
    """What in the README's table of budgets the code disagrees with (empty: nothing)."""
    rows, want, out = budget_rows(text), expected_budgets(), []
    if tuple(rows) != BUDGET_NAMES:
        return [f'the rows are {list(rows)}, not {list(BUDGET_NAMES)}']
    for name, w in want.items():
        row = rows[name]
        steps = re.match(r'([\d,]+) × (\d+)', row['steps × batch'])
        got = dict(train=number(row['training images']), test=number(row['test images']), steps=number(steps[1]),
                   batch=int(steps[2]), lr=number(row['peak lr']), warmup=number(row['warm-up']),
                   seeds=int(row['seeds']))
        out += [f'{name}: {k} {got[k]:g}, the code gives {w[k]:g}' for k in got if got[k] != w[k]]
        epochs = re.search(r'\((?:cut from ([\d,]+), )?(\d+) epochs?\)', row['steps × batch'])
        if not epochs or int(epochs[2]) != w['epochs']:
            out.append(f"{name}: {row['steps × batch']}, the code gives {w['epochs']} epoch(s)")
        elif 'whole' in w and w['steps'] < w['whole'] and (epochs[1] is None or number(epochs[1]) != w['whole']):
            out.append(f"{name}: cut from a schedule of {w['whole']} steps, which the row does not say")
    return out


def test_readme_budgets_table():
    """One row per budget, each named once, with what the code that sets it runs; the results pages call their
    budget by the same name."""
    assert budget_problems(read_page('README.md')) == []
    for name, page in (('the committed reproduction', 'results/fashion-mnist/RESULTS.md'),
                       ('the quick command', 'results/fashion-mnist-quick/RESULTS.md')):
        assert name in ' '.join(read_page(page).split()), f'{page} does not call its budget "{name}"'


def test_budgets_reader_finds_a_wrong_cell():
    """The checker itself: a changed lr, step count or seed count in one row is found."""
    text = read_page('README.md')
    row = next(line for line in text.splitlines() if line.startswith('| the committed reproduction |'))
    for old, new, said in (('| 0.002 |', '| 0.004 |', 'lr 0.004'), ('1,404 ×', '1,400 ×', 'steps 1400'),
                           ('| 3 |', '| 1 |', 'seeds 1')):
        found = budget_problems(text.replace(row, row.replace(old, new)))
        assert found == [f'the committed reproduction: {said}, the code gives ' + found[0].split('gives ')[1]], found


@pytest.mark.parametrize('page', ['results/fashion-mnist/RESULTS.md', 'results/fashion-mnist-quick/RESULTS.md'])
def test_results_page_gives_a_command_that_runs(page):
    """The command a results page says made it is one that runs at this commit, and parses."""
    from tools import reproduce
    command = re.search(r'^- command: `([^`]+)`', read_page(page), re.M)
    assert command and command[1].startswith('python -m tools.reproduce '), command
    reproduce.parse(shlex.split(command[1])[3:])


def misquoted(text):
    """The code spans of the README's reading order that quote code (an assignment, a product) but are not in the
    file their item names, character for character."""
    out = []
    for path, item in re.findall(r'^\d+\. \[`([^`]+)`\]\([^)]*\)(.*?)(?=^\d+\. |\n\n)', text, re.M | re.S):
        with open(os.path.join(ROOT, path), encoding='utf-8') as f:
            source = f.read()
        out += [f'{path}: `{span}`' for span in re.findall(r'`([^`]+)`', item)
                if (' = ' in span or ' @ ' in span) and span not in source]
    return out


def test_readme_quotes_code_as_it_is():
    text = read_page('README.md')
    assert misquoted(text) == []
    assert re.search(r'`[^`]* @ v`', text), 'the reading order no longer quotes the line that applies a map'
    wrong = text.replace('`out = attn @ v`', '`out = attn.to(v.dtype) @ v`', 1)
    assert misquoted(wrong) == ['vit.py: `out = attn.to(v.dtype) @ v`']


def test_the_reliability_table_names_tests_that_exist():
    """REFERENCE.md's reliability tables: every test a row names in its last cell (file::name, a bare name of the
    file named before it in its cell, * for several) is a test of that file, and every row names at least one."""
    import ast
    import fnmatch
    section = read_page('REFERENCE.md').split('### Reliability')[1].split('\n### ')[0]
    rows = [line.rstrip(' |').split(' | ')[-1] for line in section.splitlines()
            if line.startswith('| ') and ' | ' in line and not line.endswith(' tests |')]   # no header
    assert len(rows) >= 5, section
    for cell in rows:
        file, named = None, 0
        for ref in re.findall(r'`(test_[\w*]+(?:\.py)?(?:::test_[\w*]+)?)`', cell):
            path, _, name = ref.partition('::') if '.py' in ref else (file, '', ref)
            file = path
            tree = ast.parse(open(os.path.join(ROOT, 'tests', file)).read())
            tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith('test_')]
            assert tests and (not name or fnmatch.filter(tests, name)), f'{ref}: no such test in tests/{file}'
            named += 1
        assert named, cell


def test_the_readme_estimates_full_mode_from_the_reproductions_speed():
    """Full mode's time: its four stages (the preset's epochs over the whole training set) at the speed each method
    ran in the committed reproduction (the last progress line of each seed's log, mean over the seeds)."""
    import statistics
    from util.config import SMALL_PRESETS
    speed = {}
    for stage in ('scratch', 'finetune', 'copy', 'distill'):
        rates = []
        for path in glob.glob(os.path.join(ROOT, 'results', 'fashion-mnist', 'logs', stage, 'seed*', 'log.txt')):
            with open(path) as f:
                rates.append(float(re.findall(r'\| (\d+) img/s', f.read())[-1]))
        speed[stage] = statistics.fmean(rates)
    epochs = SMALL_PRESETS['fashion-mnist']['epochs']
    hours = sum(epochs * 60000 / v for v in speed.values()) / 3600
    text = ' '.join(read_page('README.md').split())
    stated = (f'{min(speed.values()):.0f} to {max(speed.values()):.0f} training images a second), its four '
              f'{epochs}-epoch stages would take about {hours:.1f} hours')
    assert stated in text, stated
