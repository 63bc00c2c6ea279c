"""The prose a learner reads: the Markdown cells of tutorial.ipynb, the README and every page of the repository the
notebook links, counted as a reader meets them: a mean of at most 20 words a sentence and no sentence over 40 words on
each, and at most 3,300 words of notebook prose.

What is counted: the text of paragraphs and list items. Left out: fenced code blocks, inline code, tables (lines
that start with '|'), headings, math ($...$), HTML tags (their text kept), images and badges, bare URLs, and link
targets (a link counts its text). A sentence ends at the end of a paragraph or list item, and at '.', '!' or '?'
(alone, or followed by a closing bracket or an emphasis mark) followed by a space and a capital letter, an opening
bracket, an emphasis mark or inline code; not after an initial, 'et al.' or an exercise's bold number ('A. C. Li',
'et al. (2019)', '**2. Whose routing?**'). A word is a run of non-space characters holding a letter or a digit.

    python tests/test_prose.py                        # the counts, and the longest sentences
    python tests/test_prose.py OTHER.ipynb OTHER.md   # the same for another copy (e.g. an earlier commit's)
"""
import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ROOT  # noqa: E402

NOTEBOOK, README = os.path.join(ROOT, 'tutorial.ipynb'), os.path.join(ROOT, 'README.md')
MEAN_WORDS, LONG, NOTEBOOK_WORDS = 20, 40, 3300
CODE = '\u00a7'     # what an inline code span leaves: no word, but a sentence may start with it
# the end of a sentence: a stop, then a space and what may start one; not after 'A.', 'al.' or '**2.'
SPLIT = re.compile(r'(?:(?<=[.!?])(?<!\b[A-Z]\.)(?<!\bal\.)(?<!\*\d\.)|(?<=[.!?]\))|(?<=[.!?]\*)|(?<=[.!?]\*\*))'
                   r'\s+(?=[A-Z(\[*\u00a7])')


def notebook_markdown(path=NOTEBOOK):
    with open(path, encoding='utf-8') as f:
        cells = json.load(f)['cells']
    return [''.join(c['source']) for c in cells if c['cell_type'] == 'markdown']


def blocks(markdown):
    """The paragraphs and list items of a Markdown text, each as one line of plain prose."""
    text = re.sub(r'```.*?```', '\n\n', markdown, flags=re.S)                # fenced code
    text = re.sub(r'<!--.*?-->', ' ', text, flags=re.S)
    out, current = [], []
    for line in text.splitlines() + ['']:
        stripped = line.strip()
        item = re.match(r'^(?:[-*+]|\d+\.)\s+', stripped)
        if not stripped or stripped.startswith(('|', '#')) or item:
            if current:
                out.append(' '.join(current))
            current = []
            if item:
                current = [stripped[item.end():]]
            continue
        current.append(stripped)
    return [b for b in map(plain, out) if b]


def plain(text):
    """Inline Markdown made plain: images, code, math, tags and link targets out."""
    text = re.sub(r'!\[[^\]]*\]\([^)]*\)', ' ', text)                        # images
    text = re.sub(r'\[!\[[^\]]*\]\([^)]*\)\]\([^)]*\)', ' ', text)           # a badge
    text = re.sub(r'`[^`]*`', CODE, text)                                    # inline code: no word, may start one
    text = re.sub(r'\$[^$]*\$', ' ', text)                                   # math
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', text)                     # a link: its text
    text = re.sub(r'<[^>]+>', ' ', text)                                     # HTML tags, their text kept
    text = re.sub(r'https?://\S+', ' ', text)
    return ' '.join(text.split())


def sentences(markdown):
    return [s for b in blocks(markdown) for s in re.split(SPLIT, b) if words(s)]


def words(sentence):
    return len([w for w in sentence.split() if re.search(r'[A-Za-z0-9]', w)])


def counts(markdown):
    """(words, sentences, mean words a sentence, sentences over LONG words) of a Markdown text."""
    found = sentences(markdown)
    n = [words(s) for s in found]
    return sum(n), len(n), sum(n) / max(len(n), 1), sum(k > LONG for k in n)


def readme():
    with open(README, encoding='utf-8') as f:
        return f.read()


def test_the_counter_leaves_out_code_tables_links_and_math():
    text = ('# A heading\n\nOne `code span` here, [a link](https://x.org/a/b) and $x^2$. Two words!\n\n'
            '| a | table |\n|---|---|\n\n```python\nprint("no")\n```\n\n- an item without a stop\n'
            '- <b>bold</b> item. **2. Bold lead.** A. C. Li et al. (2024) wrote it. (An aside.) The end. '
            '`x` starts one.')
    assert sentences(text) == ['One \u00a7 here, a link and .', 'Two words!', 'an item without a stop', 'bold item.',
                               '**2. Bold lead.**', 'A. C. Li et al. (2024) wrote it.', '(An aside.)', 'The end.',
                               '\u00a7 starts one.']
    assert counts(text)[:2] == (31, 9)


def linked_pages():
    """The repository's Markdown pages the notebook's Markdown links ('[text](results/x/README.md#part)'), sorted."""
    found = {m.split('#')[0] for text in notebook_markdown() for m in re.findall(r'\]\(([^)\s]+)\)', text)}
    return sorted(p for p in found if not re.match(r'\w+://', p) and p.endswith('.md'))


def test_the_notebook_reads_in_short_sentences():
    total, n, mean, long = counts('\n\n'.join(notebook_markdown()))
    assert total <= NOTEBOOK_WORDS, f'{total} words of notebook prose: at most {NOTEBOOK_WORDS}'
    assert mean <= MEAN_WORDS, f'{mean:.1f} words a sentence in the notebook: at most {MEAN_WORDS}'
    assert long == 0, f'{long} sentences over {LONG} words in the notebook: none'


@pytest.mark.parametrize('page', ['README.md', *linked_pages()])
def test_each_page_reads_in_short_sentences(page):
    """The README, and every page the notebook links (its tables, command lines and code are not prose)."""
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        total, n, mean, long = counts(f.read())
    assert mean <= MEAN_WORDS, f'{mean:.1f} words a sentence in {page}: at most {MEAN_WORDS}'
    long_ones = [s for s in sentences(open(os.path.join(ROOT, page), encoding='utf-8').read()) if words(s) > LONG]
    assert not long_ones, f'{len(long_ones)} sentences over {LONG} words in {page}: none, e.g. {long_ones[0][:120]!r}'


def test_the_notebook_links_the_pages_a_learner_reads():
    """The pages measured above are found from the notebook's links: the results, the features, the variants."""
    pages = linked_pages()
    assert {'results/fashion-mnist/RESULTS.md', 'results/fashion-mnist/features/README.md',
            'results/fashion-mnist/variants/README.md', 'teachers/README.md'} <= set(pages), pages


if __name__ == '__main__':
    notebook, readme_path = (sys.argv[1:] + [NOTEBOOK, README][len(sys.argv) - 1:])[:2]
    with open(readme_path, encoding='utf-8') as f:
        readme_text = f.read()
    for name, text in (('tutorial.ipynb', '\n\n'.join(notebook_markdown(notebook))), ('README.md', readme_text)):
        total, n, mean, long = counts(text)
        print(f'{name}: {total} words in {n} sentences, mean {mean:.1f}, {long} over {LONG} words')
        for s in sorted(sentences(text), key=words, reverse=True)[:8]:
            print(f'  {words(s)}: {s[:160]}')
