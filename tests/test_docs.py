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
from util.cli import parse_config

PAGES = ['README.md', 'RECIPES.md', *sorted(os.path.relpath(p, ROOT) for folder in ('results', 'teachers')
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


def test_readme_names_commands():
    assert len(README_COMMANDS) >= 10, README_COMMANDS


@pytest.mark.parametrize('script, args', README_COMMANDS, ids=[' '.join([s, *a])[:60] for s, a in README_COMMANDS])
def test_readme_command_exists_and_parses(script, args):
    """Every script the README runs exists, and its flags parse with that script's config and presets: an
    unknown flag or a bad value would stop it here, before anything is made or loaded."""
    module = script[:-3].replace('/', '.') if script.endswith('.py') else script
    assert os.path.isfile(os.path.join(ROOT, module.replace('.', '/') + '.py')), f'{script}: no such file'
    mod = importlib.import_module(module)
    cls = next(v for v in vars(mod).values() if dataclasses.is_dataclass(v) and v.__module__ == mod.__name__
               and 'Config' in v.__name__ and v.__name__ != 'TransferConfig')
    parse_config(cls, getattr(mod, 'PRESETS', None), args)


def first_command():
    """The arguments of the README's first command (the quick reproduction), as a newcomer types it."""
    script, args = README_COMMANDS[0]
    assert script == 'tools.reproduce', README_COMMANDS[0]
    return args


def test_readme_first_command_leaves_git_status_clean(tmp_path):
    """The first command in a fresh clone, on fake images and 2 steps a stage instead of Fashion-MNIST's 200:
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
    assert glob.glob(str(clone / 'runs' / '**' / 'RESULTS.md'), recursive=True), 'no report under runs/'
    status = subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == '', f'the README\'s first command changed the checkout:\n{status.stdout}'
