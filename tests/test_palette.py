"""One colour per method across every figure: tools/palette.py is read from one place. Each figure-making function
is drawn with the palette's colours changed to ones no default would give, and must draw each method in its
changed colour: a figure that hard-codes a colour, or numbers its methods 'C0', 'C1', ..., fails. The notebook's
own figures name their colours through PALETTE."""
import json
import os
import re

import matplotlib
import nbformat
import pytest
from matplotlib.colors import same_color, to_hex

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from conftest import ROOT  # noqa: E402
from tools import palette, reproduce_report, tutorial  # noqa: E402

# a colour for each key that no figure could reach by chance
ODD = {k: f'#{17 * (i + 1):02x}{(40 + 23 * i) % 256:02x}{(200 - 19 * i) % 256:02x}'
       for i, k in enumerate(palette.PALETTE)}


@pytest.fixture
def odd_palette(monkeypatch):
    for k, c in ODD.items():
        monkeypatch.setitem(palette.PALETTE, k, c)
    yield ODD
    plt.close('all')


def says_where_its_axes_start(fig):
    """Every panel whose y axis does not start at 0 says so in its title, or in the title over its row (a subfigure's,
    for panels that share one axis)."""
    return all('does not start at 0' in ax.get_title() + ax.get_figure(root=False).get_suptitle()
               for ax in fig.axes if ax.get_ylim()[0] > 0)


def colours_of(artist):
    """Every colour an artist (a line, a collection, a patch) is drawn in, as hex."""
    found = []
    for get in ('get_color', 'get_facecolor', 'get_edgecolor'):
        c = getattr(artist, get, lambda: None)()
        if c is None:
            continue
        rows = c if hasattr(c, 'ndim') and c.ndim == 2 else [c]
        found += [to_hex(x, keep_alpha=False) for x in rows if not (hasattr(x, '__len__') and len(x) == 4 and x[3] == 0)]
    return set(found)


def legend_colours(ax):
    """{label: colours} of every labelled artist of an axes."""
    handles, labels = ax.get_legend_handles_labels()
    return {label: colours_of(h.lines[0] if hasattr(h, 'lines') and h.lines and h.lines[0] else h)
            for h, label in zip(handles, labels)}


def test_the_palette_gives_each_method_one_colour_of_its_own():
    colours = list(palette.PALETTE.values())
    assert len({to_hex(c) for c in colours}) == len(colours), 'two methods share a colour'
    for name, key in palette.ALIASES.items():
        assert palette.colour(name) == palette.PALETTE[key]
    with pytest.raises(KeyError):
        palette.colour('no such method')


def test_results_figure_draws_each_method_in_its_colour(odd_palette, tmp_path):
    with open(os.path.join(ROOT, 'results', 'fashion-mnist', 'results.json')) as f:
        summary = json.load(f)['summary']
    fig = reproduce_report.plot(summary, tmp_path / 'results.png')
    left, right = fig.axes
    drawn = []                                                     # the seeds' dots and bars, in STAGES order
    for c in left.collections + left.lines:
        drawn += [x for x in sorted(colours_of(c)) if x not in drawn]
    assert sorted(drawn) == sorted(odd_palette[m] for m in reproduce_report.STAGES)
    curves = legend_colours(right)
    for m in reproduce_report.STAGES[:4]:
        assert curves[reproduce_report.LABELS[m]] == {odd_palette[m]}, m
    assert says_where_its_axes_start(fig)


def test_the_followup_figure_draws_each_method_in_its_colour(odd_palette, tmp_path):
    from test_followup import made_up
    from tools import followup
    runs = {arm: {str(k): v for k, v in r.items()} for arm, r in made_up(True).items()}
    fig = followup.plot({'runs': runs, 'components': 'a component'}, tmp_path / 'followup.png')
    (ax,) = fig.axes
    drawn = set().union(*(colours_of(c) for c in ax.collections))   # hollow and filled dots, the means' bars
    assert drawn == {odd_palette[m] for m in followup.METHODS}
    assert says_where_its_axes_start(fig)


def fake_run(folder, top1):
    os.makedirs(folder)
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        for e, t in enumerate(top1, 1):
            f.write(json.dumps({'epoch': e, 'step': 10 * e, 'top1': t}) + '\n')
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'batch_size': 64, 'accum_steps': 1, 'world_size': 1}, f)   # as every run's config.json
    return str(folder)


def test_the_notebooks_figure_functions_draw_each_method_in_its_colour(odd_palette, tmp_path):
    names = {'scratch': 'scratch', 'fine-tune': 'finetune', 'attention copy': 'copy', 'attention distillation': 'distill'}
    runs = {label: fake_run(tmp_path / key, [50 + i, 60 + i]) for i, (label, key) in enumerate(names.items())}
    tutorial.plot_curves(runs, 'runs', committed=tutorial.reproduction_curves(os.path.join(ROOT, 'results', 'fashion-mnist')))
    fig = plt.gcf()                                                # shown, and still open under Agg
    for ax in fig.axes:
        for label, colours in legend_colours(ax).items():
            assert colours == {odd_palette[names[label.split(':')[0]]]}, label
    assert says_where_its_axes_start(fig)
    logs = {m: {'cross-entropy': [2.3, 2.0], 'attention loss': [3.9, 3.8], 'floor': [3.5, 3.5]}
            for m in ('scratch', 'copy', 'distillation')}
    tutorial.plot_training(logs, 'steps')
    fig = plt.gcf()
    for ax in fig.axes:
        shown = legend_colours(ax)
        for m in logs:
            assert shown[m] == {odd_palette[palette.ALIASES.get(m, m)]}, m
    assert legend_colours(fig.axes[1])["the floor: the teacher's entropy"] == {odd_palette['teacher']}
    assert says_where_its_axes_start(fig)
    tutorial.draw_methods()
    fig = plt.gcf()
    arrows = [to_hex(t.arrow_patch.get_edgecolor(), keep_alpha=False) for ax in fig.axes for t in ax.texts
              if getattr(t, 'arrow_patch', None)]
    assert set(arrows) == {odd_palette['copy'], odd_palette['distill']}
    boxes = [{to_hex(p.get_facecolor(), keep_alpha=False) for p in ax.patches} for ax in fig.axes]
    assert boxes == [{odd_palette['teacher'], odd_palette['copy']}, {odd_palette['teacher'], odd_palette['distill']}]
    assert 'test image 0' in fig.get_supxlabel()
    with open(os.path.join(ROOT, 'results', 'fashion-mnist', 'features', 'features.json')) as f:
        tutorial.plot_features(json.load(f)['result'])
    fig = plt.gcf()
    plain = {'scratch', 'fine-tune', 'copy', 'distillation'}
    for ax in fig.axes:
        for label, colours in legend_colours(ax).items():
            method = label.removeprefix('distillation and ')
            if method in plain:                                    # a method, by the course's name: its colour
                assert colours == {odd_palette[palette.ALIASES.get(method, method)]}, label
            else:                                                  # the teacher's heads, a uniform map, its heads
                assert label in ("the teacher's heads", 'a uniform map', 'its heads'), label
    assert says_where_its_axes_start(fig)


def test_the_notebook_names_its_colours_through_the_palette():
    """No code cell of tutorial.ipynb writes a method's colour itself: a literal colour that is also a palette colour
    (or a 'CN' cycle colour, which a palette colour may be) must be PALETTE[...]."""
    with open(os.path.join(ROOT, 'tutorial.ipynb')) as f:
        source = '\n'.join(c.source for c in nbformat.read(f, as_version=4).cells if c.cell_type == 'code')
    literals = re.findall(r"""col(?:or|our)s?\s*=\s*\[?\s*['"]([^'"]+)['"]""", source)
    literals += re.findall(r"""['"](tab:\w+|C\d)['"]""", source)
    clash = [c for c in literals if re.fullmatch(r'C\d', c) or any(same_color(c, p) for p in palette.PALETTE.values())]
    assert not clash, f'tutorial.ipynb draws with {clash}: use PALETTE[method]'
    assert 'PALETTE[' in source
