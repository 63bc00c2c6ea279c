"""The front page, RECIPES.md, the pages under results/ and teachers/ and the notebook's text: every relative
Markdown link points at a file or folder of the repository; the README reads as a front page (what it is,
the figure, Start here, then the results, the reference, the citation and the licence); and its first command
leaves a fresh clone's `git status` clean."""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, sub_env

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
# The README as a front page


def sections():
    """[(heading, text up to the next heading of level 1 or 2)] of README.md, code blocks included."""
    found, fenced = [], False
    for line in read_page('README.md').splitlines(keepends=True):
        fenced ^= line.startswith('```')
        if not fenced and re.match(r'#{1,2} ', line):
            found.append((line.strip(), ''))
        elif found:
            found[-1] = (found[-1][0], found[-1][1] + line)
    return found


def test_readme_is_a_front_page():
    heads = [h for h, _ in sections()]
    title, intro = sections()[0]
    assert title.startswith('# ') and heads[1] == '## Start here' and heads[2].startswith('## Results'), heads
    # one paragraph: the paper, the authors' code, the figure
    assert 'arxiv.org/abs/2411.09702' in intro and 'github.com/alexlioralexli/attention-transfer' in intro
    assert re.search(r'^!\[[^\]]*\]\([^)]+\.png\)', intro, re.M), 'no figure before "Start here"'
    start = dict(sections())['## Start here']
    assert '[![Open In Colab]' in start
    blocks = re.findall(r'```bash\n(.*?)```', start, re.S)
    assert len(blocks) >= 2 and 'reproduce.py' in blocks[0] and 'pytest' in blocks[0], blocks
    assert any('--data imagenet' in b for b in blocks[1:]), 'no ImageNet command in "Start here"'
    # the reference after the results; the speed internals after the usage, their details in their own page
    assert heads.index('## Every script, every scale') < heads.index('## Speed and memory')
    assert 'results/benchmark/README.md' in dict(sections())['## Speed and memory']
    # the supervised teacher's table has a heading of its own, apart from the MAE results
    supervised = [h for h in heads if 'supervised' in h.lower()]
    assert supervised and supervised[0] != heads[2]
    assert '@inproceedings{' in dict(sections())['## Citation']
    assert '(LICENSE)' in dict(sections())['## License'] and os.path.isfile(os.path.join(ROOT, 'LICENSE'))


def first_command():
    """The arguments of the README's first reproduce.py command, as a newcomer types it."""
    block = re.search(r'```bash\n(.*?)```', dict(sections())['## Start here'], re.S)[1]
    line = block.splitlines()[0].split('#')[0]
    command = next(c for c in line.split('&&') if 'reproduce.py' in c)
    args = shlex.split(command)
    return args[args.index('reproduce.py') + 1:]


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
    p = subprocess.run([sys.executable, 'reproduce.py', *tiny], cwd=clone, env=sub_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f'reproduce.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    assert glob.glob(str(clone / 'runs' / '**' / 'RESULTS.md'), recursive=True), 'no report under runs/'
    status = subprocess.run(['git', 'status', '--porcelain'], cwd=clone, capture_output=True, text=True, check=True)
    assert status.stdout == '', f'the README\'s first command changed the checkout:\n{status.stdout}'
