"""tools/curves.py on two tiny runs, a scratch and a distillation (taught by the scratch run's checkpoint): the PNG it
writes under the folder it runs in, each run in its method's colour (tools/palette.py, from the run's config.json),
distillation's attention loss in a panel of its own, the losses labelled for what they are, one lr curve for runs
that share a schedule, a single evaluation drawn as a marker; what its panels draw against a second path to the same
numbers (metrics.jsonl and log.txt read here, the lr of each logged step from util.engine.lr_at and the run's
config)."""
import json
import os
import re
import types

import matplotlib
import pytest

matplotlib.use('Agg')

from matplotlib.colors import to_hex  # noqa: E402

from conftest import TINY, finetune, read_metrics, run_in_process, run_script  # noqa: E402
from tools import curves  # noqa: E402
from tools.palette import PALETTE  # noqa: E402
from util.engine import lr_at  # noqa: E402


@pytest.fixture(scope='module')
def two_runs(tmp_path_factory):
    """A scratch run evaluated once (1 epoch, label smoothing 0.1) and a distillation of its checkpoint, of another
    schedule and batch, evaluated twice with label smoothing off; both logged every 2 steps."""
    runs = tmp_path_factory.mktemp('curves') / 'runs'
    scratch, distill = runs / 'scratch', runs / 'distill'
    finetune(scratch, '--epochs', '1', '--warmup-epochs', '0.5', '--batch-size', '32', '--log-every', '2',
             '--smoothing', '0.1')
    p = run_script('attention_distill.py', *TINY, '--teacher', scratch / 'checkpoint.pt', '--out-dir', distill,
                   '--epochs', '2', '--warmup-epochs', '1', '--batch-size', '64', '--log-every', '2',
                   '--smoothing', '0')
    assert p.returncode == 0, p.stderr[-3000:]
    return scratch, distill


def logged(run, name):
    """Each progress line's value of one loss in a run's log.txt ('... | ce 2.3 attn 19.1 | lr ...')."""
    with open(run / 'log.txt') as f:
        return [float(m[1]) for m in re.finditer(rf'\| (?:\w+ [\d.]+ )*{name} ([\d.]+)\b[^|]*\| lr', f.read())]


def teacher_entropy(run, images=256):
    """The floor worked out again: the teacher's row entropy (torch.special.entr of its maps, in float64), the mean
    over its layers, heads, rows and the run's first 256 test images (the tiny fake set's 64)."""
    import torch
    from data import build_eval_set
    from util.checkpoints import build_from_checkpoint
    with open(run / 'config.json') as f:
        cfg = json.load(f)
    teacher = build_from_checkpoint(cfg['teacher'], img_size=cfg['img_size']).eval()
    dataset, _ = build_eval_set(types.SimpleNamespace(**cfg))
    x = torch.stack([dataset[i][0] for i in range(min(images, len(dataset)))]).float()
    with torch.no_grad():
        maps = [l.double().softmax(-1) for l in teacher.attention(x, range(teacher.depth)).values()]
    return torch.stack([torch.special.entr(p).sum(-1).mean() for p in maps]).mean().item()


def test_colours_panels_and_labels(two_runs):
    scratch, distill = two_runs
    fig = curves.draw([str(scratch), str(distill)])
    top1, loss, attention, lr = fig.axes
    assert [to_hex(line.get_color()) for line in top1.lines] == [to_hex(PALETTE['scratch']), to_hex(PALETTE['distill'])]
    assert [t.get_text() for t in top1.get_legend().get_texts()] == \
        [f"scratch (scratch): {read_metrics(scratch)[-1]['top1']:.2f}%",
         f"distill (distillation): {read_metrics(distill)[-1]['top1']:.2f}%"]
    # scratch's one evaluation: a marker big enough to see, in top-1 and in the test loss
    assert top1.lines[0].get_marker() not in ('', 'None', None) and top1.lines[0].get_markersize() >= 8
    # the losses: the test loss as markers, the training loss as lines; each kind named for what it is
    kinds = [t.get_text() for t in loss.get_legend().get_texts()]
    assert kinds == ['training: cross-entropy | cross-entropy with label smoothing 0.1', 'test: cross-entropy']
    assert 'training label-smoothed (0.1), test not' in loss.get_title()
    for run in (scratch, distill):
        test_loss = next(line for line in loss.lines if line.get_label() == run.name)
        assert list(test_loss.get_ydata()) == [r['loss'] for r in read_metrics(run)]
        assert test_loss.get_linestyle() == 'None'
    assert [list(line.get_ydata()) for line in loss.lines if line.get_label().startswith('_')] == \
        [logged(scratch, 'ce'), logged(distill, 'ce')]
    # the attention loss: distillation's alone, a layer (its log's sum over the teacher's 2 layers, halved), in its
    # colour, over its floor; the title says what it is
    curve, bottom = attention.lines
    assert curve.get_label() == 'distill' and len(logged(distill, 'attn')) >= 3
    assert list(curve.get_ydata()) == pytest.approx([v / 2 for v in logged(distill, 'attn')])
    assert to_hex(curve.get_color()) == to_hex(PALETTE['distill'])
    assert 'a layer, the mean over layers all' in attention.get_title() and 'ce + 3 ×' in attention.get_title()
    assert bottom.get_label().startswith("floor: the teacher's entropy")
    assert to_hex(bottom.get_color()) == to_hex(PALETTE['teacher'])
    assert bottom.get_ydata()[0] == pytest.approx(teacher_entropy(distill), abs=5e-5)   # to 4 decimals
    assert [line.get_label() for line in lr.lines] == ['scratch', 'distill'] and '2 schedules for 2 runs' in lr.get_title()


def test_the_lr_drawn_is_each_runs_schedule_and_one_schedule_is_drawn_once(two_runs):
    scratch, distill = two_runs
    lr = curves.draw([str(scratch), str(distill)]).axes[-1]
    for line, run in zip(lr.lines, two_runs):
        with open(run / 'config.json') as f:
            cfg = json.load(f)
        seen_x, lrs = line.get_data()
        steps = [round(v * 1000 / cfg['batch_size']) for v in seen_x]
        assert len(steps) >= 3
        spe = 256 // cfg['batch_size']   # steps an epoch: the tiny preset's 256 images
        peak = cfg['blr'] * cfg['batch_size'] / 256
        schedule = types.SimpleNamespace(**cfg)
        for s, value in zip(steps, lrs):   # the log prints the lr of the step just taken, to 3 figures
            expected = lr_at(schedule, peak, (s - 1) / spe)
            assert abs(value - expected) <= 6e-3 * expected + 1e-12, (run, s, value, expected)
    twice = curves.draw([str(distill), str(distill)])
    assert len(twice.axes[-1].lines) == 1 and 'one schedule, shared by all 2 runs' in twice.axes[-1].get_title()
    # runs of one method: one colour, told apart by their markers
    top1 = twice.axes[0].lines
    assert to_hex(top1[0].get_color()) == to_hex(top1[1].get_color()) and top1[0].get_marker() != top1[1].get_marker()


def test_no_attention_panel_without_an_attention_loss(two_runs):
    scratch, _ = two_runs
    assert len(curves.draw([str(scratch)]).axes) == 3


def test_the_default_output_is_under_the_working_folder(two_runs, tmp_path, monkeypatch):
    """Not beside the runs (a tracked folder of committed logs, say): runs/curves.png where the command runs."""
    monkeypatch.chdir(tmp_path)
    assert run_in_process(monkeypatch, curves, *two_runs) is None
    with open(tmp_path / 'runs' / 'curves.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert not any(os.path.exists(r.parent / 'curves.png') or os.path.exists(r / 'curves.png') for r in two_runs)


def test_curves_refuses_a_folder_without_metrics(tmp_path):
    (tmp_path / 'empty').mkdir()
    p = run_script('-m', 'tools.curves', tmp_path / 'empty', '--out', tmp_path / 'c.png')
    assert p.returncode != 0
    assert p.stderr.strip().count('\n') == 0 and 'metrics.jsonl' in p.stderr
    assert not os.path.exists(tmp_path / 'c.png')


def test_curves_refuses_a_run_of_no_training_script(two_runs, tmp_path, monkeypatch):
    """A folder whose config.json names another program: one line naming it, and no figure."""
    import shutil
    other = tmp_path / 'other'
    shutil.copytree(two_runs[0], other)
    with open(other / 'config.json') as f:
        cfg = json.load(f)
    cfg['argv'] = ['ensemble.py', '--models', 'a.pt']
    (other / 'config.json').write_text(json.dumps(cfg))
    said = run_in_process(monkeypatch, curves, other, '--out', tmp_path / 'c.png')
    assert said and 'a run of ensemble.py, not of a training script' in said
    assert not os.path.exists(tmp_path / 'c.png')


def test_curves_writes_over_nothing_but_its_own_figure_and_advises_no_deletion(two_runs, tmp_path, monkeypatch):
    """--out X.png replaced a user's X.png; --out x.pt or x.xyz ended in matplotlib's traceback after every run was
    read; a folder that is not a run (in the probe, a user's image data) was advised to be deleted."""
    mine = tmp_path / 'X.png'
    mine.write_bytes(b'\x89PNG\r\n\x1a\nmy own figure')
    msg = run_in_process(monkeypatch, curves, *two_runs, '--out', mine)
    assert msg and f'--out {mine} exists and is not' in msg, msg
    assert mine.read_bytes() == b'\x89PNG\r\n\x1a\nmy own figure'
    ours = tmp_path / 'c.pdf'
    for _ in range(2):   # its own figure, replaced
        assert run_in_process(monkeypatch, curves, *two_runs, '--out', ours) is None
    assert ours.read_bytes().startswith(b'%PDF')
    for bad in ('x.pt', 'x.xyz'):   # refused before any run is read: this folder is none
        msg = run_in_process(monkeypatch, curves, tmp_path / 'no-run', '--out', tmp_path / bad)
        assert msg and f'--out {tmp_path / bad}: no format of that name (png, pdf, svg)' in msg, msg
    images = tmp_path / 'images'
    (images / 'cat').mkdir(parents=True)
    msg = run_in_process(monkeypatch, curves, images, '--out', tmp_path / 'c.png')
    assert msg and 'metrics.jsonl' in msg and 'delete' not in msg, msg
    assert sorted(os.listdir(tmp_path)) == ['X.png', 'c.pdf', 'images'] and os.listdir(images) == ['cat']
