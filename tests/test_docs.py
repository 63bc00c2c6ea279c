"""The front page, RECIPES.md and the pages under results/ and teachers/: every relative Markdown link
points at a file or folder of the repository."""
import glob
import os
import re

import pytest

from conftest import ROOT

PAGES = ['README.md', 'RECIPES.md', *sorted(os.path.relpath(p, ROOT) for folder in ('results', 'teachers')
                                             for p in glob.glob(os.path.join(ROOT, folder, '**', '*.md'), recursive=True))]
# the target of [text](target), ![alt](target "title"), [![badge](image)](target), <angle brackets> allowed;
# code spans and blocks are skipped
LINK = re.compile(r'\]\(\s*(?:<([^>]*)>|([^)\s]+))')
CODE = re.compile(r'```.*?```|`[^`\n]*`', re.S)


def links(text):
    return [a or b for a, b in LINK.findall(CODE.sub('', text))]


def test_link_pattern_finds_links_and_skips_code():
    text = ('[a](x.md) ![b](img/y.png "title") [![badge](https://b.svg)](https://c.org/) `[no](code.md)`\n'
            '```\n[no](block.md)\n```\n[c](<with space.md>) [d](#anchor)')
    assert links(text) == ['x.md', 'img/y.png', 'https://b.svg', 'https://c.org/', 'with space.md', '#anchor']


@pytest.mark.parametrize('page', PAGES)
def test_relative_links_exist(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        targets = links(f.read())
    dead = []
    for target in targets:
        if re.match(r'[a-z][a-z0-9+.-]*:', target) or target.startswith('#'):   # a URL, or a heading anchor
            continue
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), target.split('#')[0]))
        if not path.startswith(ROOT) or not os.path.exists(path):
            dead.append(target)
    assert not dead, f'{page} links to missing files: {dead}'
