"""tools/curves.py on two tiny runs: the PNG it writes beside them, and what its panels draw against a second path to
the same numbers (metrics.jsonl read here, the lr of each logged step from util.engine.lr_at and the run's config)."""
import json
import os
import types

import matplotlib

matplotlib.use('Agg')

from conftest import finetune, read_metrics, run_script  # noqa: E402
from tools import curves  # noqa: E402
from util.engine import lr_at  # noqa: E402


def tiny_runs(tmp_path):
    """Two runs of different schedules and batches, each evaluated twice and logged every 2 steps."""
    runs = [tmp_path / 'runs' / 'a', tmp_path / 'runs' / 'b']
    finetune(runs[0], '--epochs', '2', '--warmup-epochs', '1', '--batch-size', '32', '--log-every', '2')
    finetune(runs[1], '--epochs', '2', '--warmup-epochs', '0.5', '--batch-size', '64', '--log-every', '2')
    return runs


def test_curves_of_two_runs(tmp_path):
    runs = tiny_runs(tmp_path)
    p = run_script('-m', 'tools.curves', *runs)
    assert p.returncode == 0, p.stderr
    with open(tmp_path / 'runs' / 'curves.png', 'rb') as f:   # beside the runs, where they share a folder
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'

    fig = curves.draw([str(r) for r in runs])
    top1, loss, lr = fig.axes
    assert [t.get_text().split(':')[0] for t in top1.get_legend().get_texts()] == ['a', 'b']
    for i, run in enumerate(runs):
        with open(run / 'config.json') as f:
            cfg = json.load(f)
        evals = read_metrics(run)
        x, y = top1.lines[i].get_data()
        assert list(y) == [r['top1'] for r in evals]
        assert list(x) == [r['step'] * cfg['batch_size'] / 1000 for r in evals]
        steps_x, lrs = lr.lines[i].get_data()
        steps = [round(v * 1000 / cfg['batch_size']) for v in steps_x]
        assert len(steps) >= 3
        spe = evals[0]['step']   # one evaluation an epoch
        peak = cfg['blr'] * cfg['batch_size'] / 256
        schedule = types.SimpleNamespace(**cfg)
        for s, logged in zip(steps, lrs):   # the log prints the lr of the step just taken, to 3 figures
            expected = lr_at(schedule, peak, (s - 1) / spe)
            assert abs(logged - expected) <= 6e-3 * expected + 1e-12, (run, s, logged, expected)


def test_curves_refuses_a_folder_without_metrics(tmp_path):
    (tmp_path / 'empty').mkdir()
    p = run_script('-m', 'tools.curves', tmp_path / 'empty', '--out', tmp_path / 'c.png')
    assert p.returncode != 0
    assert p.stderr.strip().count('\n') == 0 and 'metrics.jsonl' in p.stderr
    assert not os.path.exists(tmp_path / 'c.png')
