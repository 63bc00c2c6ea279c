"""reproduce.py: the whole pipeline on fake data, run again (nothing is trained twice) and after an
interruption (the stage resumes); the commands each stage gets, planned before any runs; what it refuses before
a stage runs; the report's arithmetic."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, TINY, made_once, read_metrics, run_in_process, run_script, sub_env
from ensemble import EnsembleConfig
from finetune import FinetuneConfig
from mae_pretrain import MAEConfig
from tools.reproduce import (ORDER, PRESETS, QUICK, Failures, command, jobs_at_a_time, parse, plan, run_dir, run_stage,
                             stage_env)
from tools.reproduce_report import LABELS, STAGES, budget_table, format_gap, gap_closed, mean_std, plot
from util.launch import parse_config
from util.config import ConfigError
from util.files import sha256_of

# -----------------------------------------------------------------------------
# The report's arithmetic


def test_gap_closed_on_the_papers_numbers():
    assert gap_closed(85.1, 83.0, 85.7) == pytest.approx(2.1 / 2.7)      # attention copy on ImageNet
    assert format_gap(gap_closed(85.1, 83.0, 85.7)) == '77.8%'
    assert gap_closed(85.7, 83.0, 85.7) == 1.0 and gap_closed(83.0, 83.0, 85.7) == 0.0
    assert gap_closed(81.0, 83.0, 85.7) < 0                              # worse than scratch: shown, not hidden
    for finetune in (83.0, 82.0):                                        # fine-tuning does not beat scratch
        assert gap_closed(84.0, 83.0, finetune) is None
    assert format_gap(None) == 'not meaningful (fine-tune ≤ scratch)'


def test_the_budget_from_the_stages_commands():
    """What a stage ran, from the command it was started with: its schedule, how far --max-steps let it go and the lr
    there (the warm-up + cosine maths, as a share of the peak), and the wall times."""
    def row(epochs, step, steps_per_epoch, extra=()):
        cmd = ['python', 'attention_distill.py', '--epochs', str(epochs), '--warmup-epochs', str(epochs / 10),
               '--max-steps', str(step), *extra]
        runs = [{'stage': 'mae', 'command': [], 'wall_s': 60.0},
                {'stage': 'distill', 'command': cmd, 'metrics': {'step': step, 'epoch': step / steps_per_epoch},
                 'wall_s': 120.0}]
        cfg = parse([*TINY, '--jobs', '2', '--seeds', '0', '4'])
        lines = budget_table(cfg, runs, {'stage_threads': '1', 'wall_s': 150.0}).splitlines()
        cells = lambda line: [c.strip() for c in line.strip('|').split('|')]
        return dict(zip(cells(lines[0]), cells(lines[2])))
    lr = 0.5 * (1 + math.cos(math.pi * (200 / 468 - 0.1) / 0.9))       # 0.708: warm-up over, 36% of the cosine
    assert row(1, 200, 468) == {
        'seeds': '0, 4', 'epochs': '1', 'warm-up (epochs)': '0.1', 'blr': 'preset', 'batch': 'preset',
        'steps a stage': '200', 'of the schedule': '43%', 'lr at the last step (of the peak)': f'{lr:.0%}',
        'all stages (min)': '3.0', 'at a time': '2', 'threads a stage': '1', 'reproduce.py (min)': '2.5'}
    whole = row(3, 1404, 468, ['--blr', '0.004', '--batch-size', '64'])
    assert (whole['blr'], whole['batch'], whole['of the schedule'], whole['lr at the last step (of the peak)']) == \
        ('0.004', '64', '100%', '0%')


def test_mean_std_formatting():
    assert mean_std([1.0, 2.0, 3.0]) == '2.00 ± 1.00'                    # sample std: n - 1
    assert mean_std([85.1, 85.3]) == '85.20 ± 0.14'
    assert mean_std([70.0, 70.0, 70.0]) == '70.00 ± 0.00'
    assert mean_std([80.0]) == '80.00'                                   # one seed: no spread to show


def test_the_figure_shows_curves_only_when_there_are_epochs_to_draw(tmp_path):
    """The per-epoch panel needs two evaluations per run; quick mode's runs are evaluated once."""
    def summary(epochs, seeds):
        top1 = [80.0 + k for k in range(seeds)]
        return {'methods': {m: {'top1': top1, 'mean': sum(top1) / seeds, 'std': 0.5 if seeds > 1 else None,
                                'curve': {'epoch': epochs, 'top1': [70.0 + e for e in epochs]}}
                            for m in STAGES}}
    for epochs, seeds, panels, title in (([1.0, 2.0, 3.0], 3, 2, 'mean ± std over 3 seeds'),
                                         ([0.43], 1, 1, 'one seed')):
        fig = plot(summary(epochs, seeds), tmp_path / 'results.png')
        assert len(fig.axes) == panels and title in fig.axes[0].get_title()
        ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert ticks == ['scratch', 'fine-tune', 'copy', 'distillation', 'ensemble']   # the course's
        assert (tmp_path / 'results.png').read_bytes().startswith(b'\x89PNG')
        if panels == 2:
            assert list(fig.axes[1].lines[0].get_xdata()) == epochs


# -----------------------------------------------------------------------------
# Presets and the commands of the stages


def test_presets_quick_and_your_flags():
    full = parse(['--data', 'fashion-mnist'])
    assert all(getattr(full, k) == v for k, v in PRESETS['fashion-mnist'].items()) and full.seeds == [0, 1, 2]
    quick = parse(['--data', 'fashion-mnist', '--quick', 'true'])
    assert all(getattr(quick, k) == v for k, v in QUICK.items())
    assert quick.teacher == full.teacher and os.path.isfile(os.path.join(ROOT, full.teacher))   # shipped
    assert parse(['--teacher', '']).teacher == ''                          # or pre-train their own
    assert parse(['--quick', 'true', '--seeds', '3', '4', '--max-steps', '7']).seeds == [3, 4]   # flags win
    assert parse(['--data', 'cifar10']).epochs == 20 and parse(TINY).max_steps == 2
    with pytest.raises(ConfigError):
        parse(['--seeds', '1', '1'])
    with pytest.raises(SystemExit, match="--data: invalid choice: 'imagenet'"):   # as the line is parsed
        parse(['--data', 'imagenet'])


def test_stage_commands(tmp_path):
    cfg, root = parse(TINY), str(tmp_path)
    cmd = command(cfg, 'copy', 1, root, 'teacher.pt')
    assert cmd[1].endswith('attention_copy.py')
    assert dict(zip(cmd[2::2], cmd[3::2])) == {
        '--data': 'fake', '--data-dir': './data', '--seed': '1', '--fake-size': '256', '--num-workers': '0',
        '--out-dir': os.path.join(root, 'copy', 'seed1'), '--epochs': '1', '--warmup-epochs': '0.1',
        '--max-steps': '2', '--teacher': 'teacher.pt'}
    assert command(cfg, 'distill', 0, root, 't.pt')[1].endswith('attention_distill.py')
    assert command(cfg, 'finetune', 0, root, 't.pt')[-2:] == ['--init', 't.pt']
    scratch = command(cfg, 'scratch', 0, root, 't.pt')
    assert scratch[1].endswith('finetune.py') and '--init' not in scratch and 't.pt' not in scratch
    mae = command(cfg, 'mae', 0, root, '')
    assert mae[1].endswith('mae_pretrain.py') and mae[-2:] == ['--global-pool', 'false']
    assert mae[mae.index('--out-dir') + 1] == os.path.join(root, 'mae')
    ens = command(cfg, 'ensemble', 2, root, 't.pt')
    assert ens[1].endswith('ensemble.py') and '--out-dir' not in ens and ens[-2:] == ['--overwrite', 'true']
    i = ens.index('--models')
    assert ens[i + 1:i + 3] == [os.path.join(root, s, 'seed2', 'checkpoint.pt') for s in ('finetune', 'distill')]
    assert ens[ens.index('--out') + 1] == os.path.join(root, 'ensemble', 'seed2', 'ensemble.json')
    # --val-size: every stage, the ensemble included, evaluates on the same held-out training images
    val = parse([*TINY, '--val-size', '64'])
    for stage in ['mae', *STAGES]:
        c = command(val, stage, 0, root, 't.pt')
        assert c[c.index('--val-size') + 1] == '64', stage
    for cls, args in ((EnsembleConfig, ['--models', 'a.pt']), (MAEConfig, []), (FinetuneConfig, [])):
        assert parse_config(cls, {}, ['--val-size', '64', *args]).val_size == 64


def test_the_plan_is_every_stage_in_the_order_they_start(tmp_path):
    """The teacher (unless --teacher names one), the training stages of every seed, the longest first, then the
    ensembles; each with the command line it runs."""
    root = str(tmp_path)
    cfg = parse([*TINY, '--seeds', '0', '1'])
    steps = plan(cfg, root, 't.pt')
    assert [key for key, _ in steps] == [('mae', 0), *[(s, k) for s in ORDER for k in (0, 1)], ('ensemble', 0),
                                         ('ensemble', 1)]
    assert all(argv == command(cfg, *key, root, 't.pt') for key, argv in steps)
    assert [key for key, _ in plan(parse([*TINY, '--teacher', 't.pt']), root, 't.pt')][0] == ('distill', 0)
    assert sorted(ORDER + ['ensemble']) == sorted(STAGES)

# -----------------------------------------------------------------------------
# The whole pipeline, tiny


def reproduce(runs, results):   # two stages at a time
    p = run_script('-m', 'tools.reproduce', *TINY, '--jobs', '2', '--out-dir', runs, '--results-dir', results,
                   timeout=300)
    assert p.returncode == 0, f'reproduce.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
    """The whole pipeline once for the test run, whichever process asks first: (its folder, holding runs/ and
    results/; what it printed). Read only: a test that runs it again does so on a copy (copy_of)."""
    def make(d):
        p = reproduce(d / 'runs', d / 'results')
        (d / 'stdout.txt').write_text(p.stdout)
    d = made_once(tmp_path_factory, 'reproduce', make)
    return d, SimpleNamespace(stdout=(d / 'stdout.txt').read_text())


def test_first_run_makes_every_stage_and_the_report(first_run):
    d, p = first_run
    root = str(d / 'runs')
    assert p.stdout.count(': running ') == 6 and 'scratch seed 0 | ' in p.stdout    # scripts' output shown
    for stage in ['mae', *STAGES]:
        with open(os.path.join(run_dir(root, stage, 0), 'done.json')) as f:
            done = json.load(f)
        assert done['stage'] == stage and not done['resumed'] and done['wall_s'] > 0
        if stage != 'ensemble':
            assert os.path.exists(os.path.join(run_dir(root, stage, 0), 'checkpoint.pt'))
            assert done['metrics'] == read_metrics(run_dir(root, stage, 0))[-1] and done['metrics']['step'] == 2
    results = json.loads((d / 'results' / 'results.json').read_text())
    methods = results['summary']['methods']
    assert set(methods) == set(STAGES) and results['config']['seeds'] == [0]
    assert methods['scratch']['top1'] == [read_metrics(run_dir(root, 'scratch', 0))[-1]['top1']]   # the final epoch
    with open(os.path.join(run_dir(root, 'ensemble', 0), 'ensemble.json')) as f:
        assert methods['ensemble']['top1'] == [json.load(f)['ensemble']['top1']]
    assert set(results['summary']['gap_closed']) == {'copy', 'distill'}
    md = (d / 'results' / 'TABLE.md').read_text()
    for label in LABELS.values():
        assert f'| {label} |' in md and f'| {label} |' in p.stdout    # the table, also printed at the end
    assert '\n| 0 | 1 | 0.1 | preset | preset | 2 |' in md                # the budget: 2 steps a stage
    assert results['git_commit'] and results['machine'] and '--data fake' in results['command']
    png = (d / 'results' / 'results.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 10_000


def test_the_report_is_rewritten_from_results_json_alone(first_run, tmp_path):
    """`python -m tools.reproduce_report DIR`: the same tables and figure from results.json, with no run directory
    left; a page written by hand beside them is left as it is."""
    d, _ = first_run
    (tmp_path / 'results.json').write_bytes((d / 'results' / 'results.json').read_bytes())
    (tmp_path / 'RESULTS.md').write_text('written by hand\n')
    p = run_script('-m', 'tools.reproduce_report', tmp_path, '--dirty', 'true')   # whatever the tree here
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'TABLE.md').read_text() == (d / 'results' / 'TABLE.md').read_text()
    assert (tmp_path / 'results.png').read_bytes() == (d / 'results' / 'results.png').read_bytes()
    assert (tmp_path / 'RESULTS.md').read_text() == 'written by hand\n'
    p = run_script('-m', 'tools.reproduce_report', tmp_path / 'nowhere', '--dirty', 'true')
    assert p.returncode != 0 and 'results.json: cannot read it (No such file' in p.stderr and not (tmp_path / 'nowhere').exists()


def test_stages_run_side_by_side_once_those_they_need_are_done(first_run):
    d, p = first_run
    done = {}
    for stage in ['mae', *STAGES]:
        with open(os.path.join(run_dir(str(d / 'runs'), stage, 0), 'done.json')) as f:
            r = json.load(f)
        done[stage] = (r['started'], r['started'] + r['wall_s'])
    assert all(done[s][0] >= done['mae'][1] for s in STAGES)              # every stage waits for the teacher
    assert done['ensemble'][0] >= max(done['finetune'][1], done['distill'][1])
    (a0, a1), (b0, b1) = done['distill'], done['copy']
    assert a0 < b1 and b0 < a1, 'with --jobs 2 distill and copy start together'
    started = [line[3:].split(':')[0] for line in p.stdout.splitlines()
               if line.startswith('== ') and ': running ' in line]
    assert started[0] == 'mae' and started[-1] == 'ensemble seed 0'      # the longest first, two at a time
    assert set(started[1:3]) == {'distill seed 0', 'copy seed 0'} and set(started[3:5]) == {'scratch seed 0',
                                                                                            'finetune seed 0'}


def test_jobs_auto_is_one_on_a_cpu_and_what_a_gpu_holds(monkeypatch):
    """--jobs 0 (auto): on a CPU one stage at a time, two for fashion-mnist (measured); on a GPU one a 4 GiB of its
    free memory and a CPU core, at most the stages there are to run; a number given is taken as it is."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert jobs_at_a_time(parse(TINY), 4)[0] == 1
    assert jobs_at_a_time(parse(['--data', 'fashion-mnist', '--quick', 'true']), 4)[0] == 2
    assert jobs_at_a_time(parse([*TINY, '--jobs', '3']), 4) == (3, '--jobs 3')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(os, 'cpu_count', lambda: 16)
    for free, stages, n in ((80, 12, 12), (80, 30, 16), (20, 12, 5), (2, 12, 1)):
        monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda *a, free=free: (free * 2 ** 30, 80 * 2 ** 30))
        assert jobs_at_a_time(parse(['--data', 'fashion-mnist']), stages)[0] == n, (free, stages)


def test_a_stage_writes_each_line_whole(monkeypatch, tmp_path):
    """Stages side by side print from two threads: each line goes out in one write, so that another stage's line
    can never land between a line and its end (print writes its end apart)."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass
    monkeypatch.setattr(sys, 'stdout', Recorder())
    argv = [sys.executable, '-c', "print('one'); print('two'); raise SystemExit(1)"]
    failed = Failures()
    assert run_stage(('scratch', 0), argv, str(tmp_path), sub_env(), {}, failed) is None
    lines = [w for w in writes if w]
    assert [w.rstrip('\n').split(': running')[0] for w in lines] == ['== scratch seed 0', '   scratch seed 0 | one',
                                                                      '   scratch seed 0 | two']
    assert all(w.count('\n') == 1 and w.endswith('\n') for w in lines), writes
    assert failed and 'scratch seed 0 failed (exit 1): two' in failed[0]


def test_the_stages_share_the_threads(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    assert stage_env(parse([*TINY, '--jobs', '2']))['OMP_NUM_THREADS'] == '4'
    assert stage_env(parse([*TINY, '--jobs', '16']))['OMP_NUM_THREADS'] == '1'
    assert 'OMP_NUM_THREADS' not in stage_env(parse(TINY))                # one at a time: torch's default
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert stage_env(parse([*TINY, '--jobs', '2']))['OMP_NUM_THREADS'] == '3'   # yours, when set


def test_a_failed_stage_lets_the_running_one_finish_and_starts_no_other(tmp_path):
    fail = tmp_path / 'fail.py'
    fail.write_text("import sys\nprint('error: no such thing')\nsys.exit(1)\n")
    code = ('import tools.reproduce as reproduce\nfrom util.launch import run_main\n'
            f'reproduce.SCRIPTS["copy"] = {str(fail)!r}\n'
            'reproduce.preflight = lambda steps, with_teacher: None   # fail.py has no flags to check\n'
            'run_main(reproduce.main)\n')
    runs = tmp_path / 'runs'
    p = run_script('-c', code, *TINY, '--jobs', '2', '--out-dir', runs, '--results-dir', tmp_path / 'results')
    assert p.returncode != 0 and 'copy seed 0 failed (exit 1): no such thing' in p.stderr, p.stderr[-2000:]
    assert os.path.exists(os.path.join(run_dir(str(runs), 'distill', 0), 'done.json'))   # it ran on to the end
    assert not os.path.exists(run_dir(str(runs), 'scratch', 0)) and not (tmp_path / 'results').exists()


def test_run_again_it_trains_nothing_and_resumes_a_stage_stopped_after_its_last_checkpoint(made_here):
    """The same command again: every finished stage skipped, its checkpoint untouched; a stage without its done.json
    (stopped after its last checkpoint) resumed from it, with --resume true."""
    runs, results = made_here
    ckpts = sorted(runs.rglob('checkpoint.pt'))
    assert len(ckpts) == 5                                       # mae, scratch, finetune, copy, distill
    before = [c.stat().st_mtime_ns for c in ckpts]
    scratch = run_dir(str(runs), 'scratch', 0)
    os.remove(os.path.join(scratch, 'done.json'))
    p = reproduce(runs, results)
    assert p.stdout.count('done, skipped') == 5 and p.stdout.count(': resuming ') == 1
    assert 'scratch seed 0: resuming' in p.stdout and '--resume true' in p.stdout and ': running ' not in p.stdout
    kept = [c for c in ckpts if not str(c).startswith(scratch)]
    assert [c.stat().st_mtime_ns for c in kept] == [t for c, t in zip(ckpts, before) if c in kept]
    assert '| attention distillation |' in p.stdout
    with open(os.path.join(scratch, 'done.json')) as f:
        done = json.load(f)
    assert done['resumed'] and done['metrics']['step'] == 2 and done['command'][-2:] == ['--resume', 'true']


# -----------------------------------------------------------------------------
# What a reproduction finds on disk: a moved reproduction, a replaced teacher, another one's results, damaged files


def snapshot(*roots):
    """{path: bytes} of every file under roots: what a refused command must leave as it was."""
    return {str(p): p.read_bytes() for r in roots for p in sorted(r.rglob('*')) if p.is_file()}


def copy_of(first_run, tmp_path, moved):
    """A copy of the first run's runs and results at another path: (runs, results). moved=False: its files
    name the copy's paths, as if it had been made there."""
    import shutil
    d, _ = first_run
    runs, results = tmp_path / 'copy' / 'runs', tmp_path / 'copy' / 'results'
    shutil.copytree(d / 'runs', runs)
    shutil.copytree(d / 'results', results)
    for f in [] if moved else [*runs.rglob('*.json'), *results.rglob('*.json')]:
        f.write_text(f.read_text().replace(str(d / 'runs'), str(runs)).replace(str(d / 'results'), str(results)))
    return runs, results


@pytest.fixture
def moved(first_run, tmp_path):
    return copy_of(first_run, tmp_path, moved=True)


@pytest.fixture
def made_here(first_run, tmp_path):
    return copy_of(first_run, tmp_path, moved=False)


def reproduce_in_process(monkeypatch, runs, results, *args):
    """reproduce.py's main() in this process on tiny data: None, or its one line."""
    import tools.reproduce as reproduce
    return run_in_process(monkeypatch, reproduce, *TINY, '--jobs', '2', '--out-dir', runs, '--results-dir', results,
                          *args)


def test_a_moved_reproduction_carries_on_and_replaces_only_its_own_results(moved, monkeypatch, capsys):
    """Its finished stages, whose records name the old --out-dir, are skipped where they now are. The results,
    the same reproduction's, are replaced whole: a stale log of another seed is not left beside the new ones."""
    runs, results = moved
    stale = results / 'logs' / 'scratch' / 'seed7'
    stale.mkdir()
    (stale / 'log.txt').write_text('another run')
    assert reproduce_in_process(monkeypatch, runs, results) is None
    assert capsys.readouterr().out.count('done, skipped') == 6
    record = json.loads((results / 'results.json').read_text())
    assert all(r['run_dir'].startswith(str(runs)) for r in record['stages']) and not stale.exists()
    assert record['teacher_sha256'] == sha256_of(runs / 'mae' / 'checkpoint.pt')


def test_a_replaced_teacher_is_refused_not_paired_with_the_old_ones_students(made_here, monkeypatch):
    """The teacher's file (here the mae stage's checkpoint) replaced after its students were made: the finished
    stages used to be skipped and the table paired them with the new teacher; now refused, nothing changed."""
    import torch
    runs, results = made_here
    teacher = runs / 'mae' / 'checkpoint.pt'
    ckpt = torch.load(teacher, weights_only=True)
    ckpt['model']['cls_token'] += 1.0                                   # another teacher, under the same path
    torch.save(ckpt, teacher)
    before = snapshot(runs, results)
    msg = reproduce_in_process(monkeypatch, runs, results)
    assert msg and f"{runs / 'distill' / 'seed0'} was made from another teacher" in msg, msg
    assert f'not from {teacher}' in msg and 'put that file back, or choose another --out-dir' in msg, msg
    assert snapshot(runs, results) == before


def test_a_stage_that_loaded_another_teacher_than_the_one_hashed_fails(made_here, monkeypatch):
    """The teacher's file changed between the reproduction's digest of it and a stage's load (a sync, a copy
    finishing): the stage records the digest of the bytes it loaded, and that stage fails, its done.json unwritten,
    rather than a table of students from two teachers."""
    import tools.reproduce as reproduce
    runs, results = made_here
    (runs / 'copy' / 'seed0' / 'done.json').unlink()                    # the one stage to run again
    digests = iter([reproduce.sha256_of(runs / 'mae' / 'checkpoint.pt')])
    monkeypatch.setattr(reproduce, 'sha256_of', lambda path: next(digests, 'f' * 64))   # then "another file"
    msg = reproduce_in_process(monkeypatch, runs, results)
    assert msg and 'copy seed 0 trained from a teacher file other than' in msg, msg
    assert not (runs / 'copy' / 'seed0' / 'done.json').exists()


def test_another_reproductions_results_are_refused_before_any_stage(tmp_path):
    """--results-dir holding the committed Fashion-MNIST results, --data fake: refused in one line (they used
    to be replaced by fake-data numbers); with --replace-results true they would be replaced."""
    res = tmp_path / 'results'
    res.mkdir()
    for f in ('results.json', 'RESULTS.md'):
        (res / f).write_bytes(open(os.path.join(ROOT, 'results', 'fashion-mnist', f), 'rb').read())
    before = snapshot(res)
    p = run_script('-m', 'tools.reproduce', *TINY, '--out-dir', tmp_path / 'runs', '--results-dir', res)
    assert p.returncode == 1 and p.stderr.count('\n') == 1, p.stderr[-2000:]
    assert "holds another reproduction's results, made with --data fashion-mnist (here fake)" in p.stderr
    assert 'pass --replace-results true to replace them' in p.stderr
    assert snapshot(res) == before and sorted(os.listdir(tmp_path)) == ['results']


def test_what_the_results_dir_holds(tmp_path):
    from tools.reproduce_report import check_results_dir
    cfg, res = parse([*TINY, '--results-dir', str(tmp_path / 'res')]), tmp_path / 'res'
    check_results_dir(str(res), cfg)                                    # not there yet: made at the end
    res.mkdir()
    check_results_dir(str(res), cfg)                                    # empty
    (res / 'RESULTS.md').write_text('# written by hand')                 # not a reproduction's: refused, whatever
    with pytest.raises(ConfigError, match='is not empty and holds no results.json: choose an empty or new '
                                          '--results-dir'):
        check_results_dir(str(res), cfg)
    assert os.listdir(res) == ['RESULTS.md']
    (res / 'results.json').write_text(json.dumps({'config': vars(cfg), 'teacher_sha256': 'a' * 64}))
    check_results_dir(str(res), cfg, 'a' * 64)                          # the same reproduction
    with pytest.raises(ConfigError, match='made with another teacher'):
        check_results_dir(str(res), cfg, 'b' * 64)
    with pytest.raises(ConfigError, match=r'made with --epochs 1 \(here 2\)'):
        check_results_dir(str(res), parse([*TINY, '--epochs', '2']))
    check_results_dir(str(res), parse([*TINY, '--epochs', '2', '--replace-results', 'true']))
    (res / 'results.json').write_text('{"config": {"da')                # cut short
    with pytest.raises(ConfigError, match=r'results.json is not JSON, cut short .*git checkout -- .*replace-results'):
        check_results_dir(str(res), cfg)
    with pytest.raises(ConfigError, match=r'RESULTS.md cannot be written into \(.*RESULTS.md: Not a directory\): '
                                          r'choose another --results-dir'):
        check_results_dir(str(res / 'RESULTS.md'), cfg)
    with pytest.raises(ConfigError, match=r'RESULTS.md/sub cannot be written into \(.*RESULTS.md: Not a directory\): '
                                          r'choose another'):
        check_results_dir(str(res / 'RESULTS.md' / 'sub'), cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into a read-only folder')
def test_a_read_only_results_dir_is_refused_before_any_stage(tmp_path):
    from tools.reproduce_report import check_results_dir
    (tmp_path / 'ro').mkdir()
    os.chmod(tmp_path / 'ro', 0o555)
    try:
        with pytest.raises(ConfigError, match='cannot be written'):
            check_results_dir(str(tmp_path / 'ro' / 'results'), parse(TINY))
    finally:
        os.chmod(tmp_path / 'ro', 0o755)


def cut_json(path):   # the file cut short, as by a kill or a full disk
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


@pytest.mark.parametrize('damage, named, fix', [
    (lambda r: cut_json(r / 'copy' / 'seed0' / 'done.json'), 'copy/seed0/done.json',
     'delete it and run the same command again: the stage is finished from its checkpoint'),
    (lambda r: (r / 'scratch' / 'seed0' / 'metrics.jsonl').open('a').write('{"step": 3, "top'),
     'scratch/seed0/metrics.jsonl',
     'line 2 is not a JSON record (cut short?): delete that line and run the same command again'),
    (lambda r: cut_json(r / 'ensemble' / 'seed0' / 'done.json'), 'ensemble/seed0/done.json',
     'delete it and run the same command again: the stage is finished from its checkpoint (an ensemble runs '
     'again)'),
], ids=['done.json', 'metrics.jsonl', 'ensemble done.json'])
def test_a_damaged_file_is_one_line_naming_it_and_a_fix_that_exists(made_here, monkeypatch, damage, named, fix):
    """Before any stage runs, nothing changed; the fix it names is one reproduce.py takes (it passes no
    --overwrite)."""
    runs, results = made_here
    damage(runs)
    before = snapshot(runs, results)
    msg = reproduce_in_process(monkeypatch, runs, results)
    assert msg and str(runs / named) in msg and fix in msg and '--overwrite' not in msg, msg
    assert snapshot(runs, results) == before


def test_a_damaged_ensemble_result_is_made_anew(made_here, monkeypatch, capsys):
    """The ensemble stage, cut short before its done.json: ensemble.json is its own, made again from the two models
    (ensemble.py alone would refuse to write over a file it cannot read)."""
    runs, results = made_here
    os.remove(runs / 'ensemble' / 'seed0' / 'done.json')
    cut_json(runs / 'ensemble' / 'seed0' / 'ensemble.json')
    assert reproduce_in_process(monkeypatch, runs, results) is None
    assert capsys.readouterr().out.count('done, skipped') == 5
    with open(runs / 'ensemble' / 'seed0' / 'ensemble.json') as f:
        assert json.load(f)['ensemble']['top1'] == json.loads((runs / 'ensemble' / 'seed0' / 'done.json').read_text())[
            'metrics']['top1']


def test_the_report_from_a_damaged_results_json_is_one_line(first_run, tmp_path):
    d, _ = first_run
    good = json.loads((d / 'results' / 'results.json').read_text())
    for text in ('{"config": {"data": "fa', json.dumps({**good, 'stages': [{'stage': 'copy'}]})):
        (tmp_path / 'results.json').write_text(text)
        p = run_script('-m', 'tools.reproduce_report', tmp_path, '--dirty', 'true')
        assert p.returncode == 1 and p.stderr.count('\n') == 1 and str(tmp_path / 'results.json') in p.stderr, p.stderr
        assert 'git checkout -- ' in p.stderr and sorted(os.listdir(tmp_path)) == ['results.json'], p.stderr


def test_one_learning_rate_for_every_training_stage(tmp_path):
    cfg = parse([*TINY, '--blr', '3e-3'])
    for stage in STAGES[:4]:
        cmd = command(cfg, stage, 0, str(tmp_path), 't.pt')
        assert cmd[cmd.index('--blr') + 1] == '0.003', stage
    assert '--blr' not in command(cfg, 'mae', 0, str(tmp_path), '') + \
        command(cfg, 'ensemble', 0, str(tmp_path), 't.pt') + command(parse(TINY), 'copy', 0, str(tmp_path), 't.pt')
    with pytest.raises(ConfigError):
        parse([*TINY, '--blr', '-1'])


# -----------------------------------------------------------------------------
# Inputs checked before the first stage; a kill stops the running stage too


def test_every_input_is_checked_before_the_first_stage(tmp_path, monkeypatch):
    import tools.reproduce as reproduce
    base = [*TINY, '--out-dir', tmp_path / 'runs', '--results-dir', tmp_path / 'results']
    msg = run_in_process(monkeypatch, reproduce, *base, '--teacher', tmp_path / 'missing.pt')
    assert msg and str(tmp_path / 'missing.pt') in msg, msg
    assert os.listdir(tmp_path) == []


def stage_pids(marker):
    """Processes whose command line holds `marker` (this test's own directory): once reproduce.py has ended, the
    stages it left running."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().decode(errors='replace')
            with open(f'/proc/{pid}/stat') as f:
                zombie = f.read().rsplit(')', 1)[1].split()[0] == 'Z'
        except OSError:
            continue
        if marker in cmd and not zombie:
            pids.append(int(pid))
    return pids


def wait_for(done, seconds):
    """Poll done() twice a second until it holds or `seconds` have passed."""
    deadline = time.time() + seconds
    while not done() and time.time() < deadline:
        time.sleep(0.5)


def test_amp_reaches_every_stage_and_names_its_results(tmp_path):
    """--amp off (fp32, as a CPU without bf16 runs) is passed to every stage, the ensemble included; --amp auto
    leaves the scripts' own default unsaid. Results made with another --amp are another reproduction's."""
    from tools.reproduce_report import check_results_dir
    root = str(tmp_path)
    off, auto = parse([*TINY, '--amp', 'off']), parse(TINY)
    for stage in ('mae', 'scratch', 'finetune', 'copy', 'distill', 'ensemble'):
        cmd = command(off, stage, 0, root, 't.pt')
        assert cmd[cmd.index('--amp') + 1] == 'off', (stage, cmd)
        assert '--amp' not in command(auto, stage, 0, root, 't.pt'), stage
    with pytest.raises(SystemExit, match="--amp: invalid choice: 'fp64'"):
        parse([*TINY, '--amp', 'fp64'])
    small = parse([*TINY, '--batch-size', '16'])     # a budget's batch: the four training stages, not the teacher's
    for stage in ('scratch', 'finetune', 'copy', 'distill'):
        cmd = command(small, stage, 0, root, 't.pt')
        assert cmd[cmd.index('--batch-size') + 1] == '16', (stage, cmd)
    assert '--batch-size' not in command(small, 'mae', 0, root, '')
    assert '--batch-size' not in command(auto, 'copy', 0, root, 't.pt')
    res = tmp_path / 'results'
    res.mkdir()
    old = json.load(open(os.path.join(ROOT, 'results', 'fashion-mnist', 'results.json')))
    (res / 'results.json').write_text(json.dumps(old))
    full = parse(['--data', 'fashion-mnist'])
    check_results_dir(str(res), full)          # the same reproduction: accepted
    with pytest.raises(ConfigError, match=r'--amp auto \(here off\)'):
        check_results_dir(str(res), parse(['--data', 'fashion-mnist', '--amp', 'off']))


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
def test_an_interrupted_reproduction_continues_with_the_same_command_to_the_same_results(first_run, tmp_path):
    """One reproduction, one stage at a time, stopped four times and started again with the same command each time:
    Ctrl-C in the teacher's stage (the terminal sends it to the whole process group), SIGTERM to reproduce.py alone
    (`kill PID`, a scheduler's) in a training stage after its first step, kill -9 to every process in another, and
    SIGTERM in an ensemble. Each time the running stage stops with it, keeping what it saved, and the line (where
    there is one) says how to continue; at the end every stage's metrics are the first run's (two stages at a time,
    never stopped), number for number (its seconds aside)."""
    runs = tmp_path / 'runs'
    argv = [sys.executable, '-m', 'tools.reproduce', *TINY, '--jobs', '1', '--out-dir', runs, '--results-dir',
            tmp_path / 'results']
    for stage, after, how in [('mae', 'step 1/', 'Ctrl-C'), ('distill seed 0', 'step 1/', 'SIGTERM'),
                              ('copy seed 0', 'step 1/', 'kill -9'), ('ensemble seed 0', '', 'SIGTERM')]:
        p = subprocess.Popen(argv, start_new_session=True, cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))   # as a terminal leaves it
        try:
            started = False
            for line in p.stdout:
                started = started or line.startswith(f'== {stage}: ')
                if started and after in line:
                    break
            assert started, f'{stage} never started'
            if how == 'Ctrl-C':
                os.killpg(p.pid, signal.SIGINT)                          # what the terminal does on Ctrl-C
            elif how == 'kill -9':
                os.killpg(p.pid, signal.SIGKILL)                         # every process of it, with no word said
            else:
                p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=120)
            said = {'Ctrl-C': 'error: stopped (Ctrl-C): run the same command again to continue',
                    'SIGTERM': 'error: stopped (SIGTERM)'}.get(how)
            if said:
                assert p.returncode == 1 and err.strip().splitlines()[-1].startswith(said), err[-2000:]
            else:
                assert p.returncode == -signal.SIGKILL, (p.returncode, err[-2000:])
            wait_for(lambda: not stage_pids(str(runs)), 30)
            assert not stage_pids(str(runs)), f'{stage} runs on after reproduce.py was stopped ({how})'
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            for pid in stage_pids(str(runs)):   # only the stages this test started
                os.kill(pid, signal.SIGKILL)
    done = subprocess.run(argv, cwd=ROOT, env=sub_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and (tmp_path / 'results' / 'results.json').exists(), done.stderr[-2000:]
    assert 'done, skipped' in done.stdout and '== 1 training stage(s) at a time (--jobs 1)' in done.stdout
    d, p = first_run
    assert '== 2 training stage(s) at a time (--jobs 2)' in p.stdout
    for stage in ['mae', *STAGES]:
        got = []
        for root in (d / 'runs', runs):
            with open(os.path.join(run_dir(str(root), stage, 0), 'done.json')) as f:
                got.append({k: v for k, v in json.load(f)['metrics'].items() if k not in ('time', 'models')})
        assert got[1] == got[0], stage


TEACHER = ['--teacher', 'teachers/fashion-mnist-mae.pt']


def test_a_reproduction_refuses_every_stage_input_before_the_first_stage(tmp_path):
    """A seed no generator takes, too few images for a batch, a teacher that does not fit a stage: refused
    before any stage ran (they started the first stage, which refused them and left its folder)."""
    for args, says in [(['--seeds', str(2 ** 64)], '--seed'), (['--fake-size', '1'], '--fake-size')]:
        p = run_script('-m', 'tools.reproduce', '--data', 'fake', '--out-dir', tmp_path / 'r', *args)
        assert p.returncode == 1 and says in p.stderr and '\n' not in p.stderr.strip(), p.stderr[-2000:]
        assert not (tmp_path / 'r').exists()
    p = run_script('-m', 'tools.reproduce', '--data', 'fake', '--out-dir', tmp_path / 'r', *TEACHER)
    assert p.returncode == 1 and 'stage' in p.stderr and '\n' not in p.stderr.strip(), p.stderr[-2000:]
    assert not (tmp_path / 'r').exists()
