"""The repository's layout: the root holds the course and the scripts a user runs, the machinery they share is
one folder (util/) that never imports a script run as a command, and no module imports itself round a cycle."""
import ast
import os

from conftest import ROOT

SHARED = {'vit', 'data'}   # the root's files that the machinery may import: the model and what it is fed


def root_modules():
    return sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith('.py'))


def local_imports(path, known):
    """The modules of this repository (root names, util.NAME) that a file imports."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] + [f'{node.module}.{a.name}' for a in node.names] \
            if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found.update(n for n in names if n in known)
    return found


def graph():
    """{module: the repository's modules it imports}, for the root's files and util/'s."""
    util = [f'util.{f[:-3]}' for f in os.listdir(os.path.join(ROOT, 'util')) if f.endswith('.py') and f != '__init__.py']
    known = set(root_modules()) | set(util)
    return {m: local_imports(os.path.join(ROOT, *m.split('.')) + '.py', known) - {m} for m in known}


def test_the_root_holds_the_course_and_its_scripts():
    root = root_modules()
    assert len(root) <= 9, f'{len(root)} Python files at the root: {root}'
    readme = open(os.path.join(ROOT, 'README.md')).read()
    course = readme.split('The course, one idea per file')[1].split('\n\n')[1]   # the README's table of them
    assert all(f'`{m}.py`' in course for m in root), [m for m in root if f'`{m}.py`' not in course]


def test_the_machinery_imports_no_script():
    g = graph()
    util = {m for m in g if m.startswith('util.')}
    bad = {m: sorted(g[m] - SHARED - util) for m in util if g[m] - SHARED - util}
    assert not bad, f'util/ imports scripts of the root: {bad}'


def test_no_import_cycle():
    g, done, path = graph(), set(), []

    def visit(m):
        assert m not in path, f"import cycle: {' -> '.join(path[path.index(m):] + [m])}"
        if m in done:
            return
        path.append(m)
        for n in sorted(g[m]):
            visit(n)
        path.pop()
        done.add(m)
    for m in sorted(g):
        visit(m)
