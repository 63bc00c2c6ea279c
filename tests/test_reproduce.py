"""reproduce.py: the whole pipeline on fake data, run again (nothing is trained twice) and after an
interruption (the stage resumes); the commands each stage gets; the report's arithmetic."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, read_metrics, run_in_process, run_script, sub_env
from ensemble import EnsembleConfig
from finetune import FinetuneConfig
from mae_pretrain import MAEConfig
from tools.reproduce import ORDER, PRESETS, QUICK, STAGES, needs, parse, plan_stage, run_dir, stage_command, stage_env
from tools.reproduce_report import (AIMS, LABELS, PAPER, against_paper, aim, budget, format_gap, gap_closed, mean_std,
                                     ordering, plot)
from util.launch import parse_config
from util.config import ConfigError

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


def test_against_the_papers_pattern():
    """The report's comparison with the paper: gap shares and the ensemble's margin, from the means."""
    means = {'scratch': 80.0, 'finetune': 90.0, 'copy': 82.0, 'distill': 89.0, 'ensemble': 90.5}
    s = {'methods': {k: {'mean': v} for k, v in means.items()},
         'gap_closed': {k: gap_closed(means[k], 80.0, 90.0) for k in ('copy', 'distill')}}
    assert against_paper(s).splitlines()[2:] == [
        '- attention copy closes 20.0% of the gap (the aim: ≥ 50%, missed by 30.0 points of gap); '
        'the paper\'s, 77.8%',
        '- attention distillation closes 90.0% of the gap (the aim: ≥ 78%, met); the paper\'s, 100.0%',
        '- the ensemble is +0.50 points against fine-tuning alone (the aim: above it, met); the paper\'s, +0.6']


def test_each_result_against_its_aim():
    """Met or missed, and by how much: a share of the gap at the aim meets it; the ensemble must beat fine-tuning."""
    assert AIMS == {'copy': 0.50, 'distill': 0.78, 'ensemble': 0.0}
    assert aim('copy', 0.5) == 'the aim: ≥ 50%, met'
    assert aim('copy', 0.199) == 'the aim: ≥ 50%, missed by 30.1 points of gap'
    assert aim('distill', 0.682) == 'the aim: ≥ 78%, missed by 9.8 points of gap'
    assert aim('distill', -0.1) == 'the aim: ≥ 78%, missed by 88.0 points of gap'   # below scratch
    assert aim('copy', None) == 'the aim: ≥ 50%, not measurable'                      # fine-tune ≤ scratch
    assert aim('ensemble', -0.02) == 'the aim: above it, missed by 0.02 points'
    assert aim('ensemble', 0.0) == 'the aim: above it, missed by 0.00 points'          # a tie is not above
    assert aim('ensemble', 0.21) == 'the aim: above it, met'


def test_the_order_of_the_means():
    means = {'scratch': 80.0, 'finetune': 90.0, 'copy': 82.0, 'distill': 89.996, 'ensemble': 90.5}
    assert ordering(means) == 'ensemble 90.50 > fine-tune 90.00 = distillation 90.00 > copy 82.00 > scratch 80.00'
    assert ordering(PAPER, 1) == 'ensemble 86.3 > fine-tune 85.7 = distillation 85.7 > copy 85.1 > scratch 83.0'


def test_the_budget_in_words_from_the_stages_commands():
    """What a stage ran, from the command it was started with: its schedule, and where --max-steps cut it (the lr
    there from the warm-up + cosine maths, as a share of the peak)."""
    def runs(epochs, max_steps, step, steps_per_epoch, blr=()):
        cmd = ['python', 'attention_distill.py', '--epochs', str(epochs), '--warmup-epochs', str(epochs / 10),
               '--max-steps', str(max_steps), *blr]
        return [{'stage': 'mae', 'command': []},
                {'stage': 'distill', 'command': cmd, 'metrics': {'step': step, 'epoch': step / steps_per_epoch}}]
    lr = 0.5 * (1 + math.cos(math.pi * (200 / 468 - 0.1) / 0.9))       # 0.708: warm-up over, 36% of the cosine
    assert budget(runs(1, 200, 200, 468)) == (
        "a 1-epoch schedule (warm-up 0.1 epoch, each script's preset blr), cut after 200 steps by --max-steps: 43% "
        f"of the way through it, its lr still {lr:.0%} of the peak (--max-steps only stops a run; its schedule "
        "stays the whole one)")
    assert budget(runs(3, 0, 1404, 468, ['--blr', '0.004'])) == \
        'a 3-epoch schedule (warm-up 0.3 epoch, blr 0.004), run to its end'
    assert budget(runs(1, 9999, 468, 468)).endswith('run to its end')      # a limit past the schedule cuts nothing


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
    for bad in (['--data', 'imagenet'], ['--seeds', '1', '1']):
        with pytest.raises(ConfigError):
            parse(bad)


def test_stage_commands(tmp_path):
    cfg, root = parse(TINY), str(tmp_path)
    cmd = stage_command(cfg, 'copy', 1, root, 'teacher.pt')
    assert cmd[1].endswith('attention_copy.py')
    assert dict(zip(cmd[2::2], cmd[3::2])) == {
        '--data': 'fake', '--data-dir': './data', '--seed': '1', '--fake-size': '256', '--num-workers': '0',
        '--out-dir': os.path.join(root, 'copy', 'seed1'), '--epochs': '1', '--warmup-epochs': '0.1',
        '--max-steps': '2', '--teacher': 'teacher.pt'}
    assert stage_command(cfg, 'distill', 0, root, 't.pt')[1].endswith('attention_distill.py')
    assert stage_command(cfg, 'finetune', 0, root, 't.pt')[-2:] == ['--init', 't.pt']
    scratch = stage_command(cfg, 'scratch', 0, root, 't.pt')
    assert scratch[1].endswith('finetune.py') and '--init' not in scratch and 't.pt' not in scratch
    mae = stage_command(cfg, 'mae', 0, root, '')
    assert mae[1].endswith('mae_pretrain.py') and mae[-2:] == ['--global-pool', 'false']
    assert mae[mae.index('--out-dir') + 1] == os.path.join(root, 'mae')
    ens = stage_command(cfg, 'ensemble', 2, root, 't.pt')
    assert ens[1].endswith('ensemble.py') and '--out-dir' not in ens
    i = ens.index('--models')
    assert ens[i + 1:i + 3] == [os.path.join(root, s, 'seed2', 'checkpoint.pt') for s in ('finetune', 'distill')]
    assert ens[ens.index('--out') + 1] == os.path.join(root, 'ensemble', 'seed2', 'ensemble.json')
    # --val-size: every stage, the ensemble included, evaluates on the same held-out training images
    val = parse([*TINY, '--val-size', '64'])
    for stage in ['mae', *STAGES]:
        c = stage_command(val, stage, 0, root, 't.pt')
        assert c[c.index('--val-size') + 1] == '64', stage
    for cls, args in ((EnsembleConfig, ['--models', 'a.pt']), (MAEConfig, []), (FinetuneConfig, [])):
        assert parse_config(cls, {}, ['--val-size', '64', *args]).val_size == 64


def done_record(stage, command, seed=0):
    """A done.json as finish_stage writes it, with what the report reads."""
    return {'stage': stage, 'seed': seed, 'command': command, 'wall_s': 1.0,
            'metrics': {'mse' if stage == 'mae' else 'top1': 50.0}}


def test_a_checkpoint_without_done_marker_is_resumed_and_other_flags_are_refused(tmp_path):
    cfg, root = parse(TINY), str(tmp_path)
    d = run_dir(root, 'distill', 0)
    assert plan_stage(cfg, 'distill', 0, root, 't.pt') == ('new', stage_command(cfg, 'distill', 0, root, 't.pt'))
    os.makedirs(d)
    open(os.path.join(d, 'checkpoint.pt'), 'wb').close()
    state, cmd = plan_stage(cfg, 'distill', 0, root, 't.pt')
    assert state == 'partial' and cmd == stage_command(cfg, 'distill', 0, root, 't.pt') + ['--resume', 'true']
    # the script's config.json records its first launch: other flags there are refused
    other = stage_command(parse([*TINY, '--epochs', '3']), 'distill', 0, root, 't.pt')
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump({'argv': other[1:]}, f)
    with pytest.raises(ConfigError, match='holds a run made with'):
        plan_stage(cfg, 'distill', 0, root, 't.pt')
    with open(os.path.join(d, 'config.json'), 'w') as f:
        json.dump({'argv': cmd[1:-2]}, f)
    assert plan_stage(cfg, 'distill', 0, root, 't.pt')[0] == 'partial'
    # a finished run is skipped only if it was made with the same flags, and its metrics are there to report
    for command, ok in ((other, False), (cmd, True)):
        with open(os.path.join(d, 'done.json'), 'w') as f:
            json.dump(done_record('distill', command), f)
        if ok:
            with pytest.raises(ConfigError, match='metrics.jsonl is missing or holds no evaluation'):
                plan_stage(cfg, 'distill', 0, root, 't.pt')
            with open(os.path.join(d, 'metrics.jsonl'), 'w') as f:
                f.write(json.dumps({'step': 2, 'top1': 50.0}) + '\n')
            assert plan_stage(cfg, 'distill', 0, root, 't.pt')[0] == 'done'
        else:
            with pytest.raises(ConfigError, match='holds a run made with'):
                plan_stage(cfg, 'distill', 0, root, 't.pt')

# -----------------------------------------------------------------------------
# The whole pipeline, tiny


def reproduce(d):   # two stages at a time
    p = run_script('-m', 'tools.reproduce', *TINY, '--jobs', '2', '--out-dir', d / 'runs', '--results-dir', d / 'results',
                   timeout=300)
    assert p.returncode == 0, f'reproduce.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


@pytest.fixture(scope='module')
def first_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('reproduce')
    return d, reproduce(d)


def test_first_run_makes_every_stage_and_the_report(first_run):
    d, p = first_run
    root = str(d / 'runs')
    assert p.stdout.count(': running ') == 6 and 'scratch seed 0 | ' in p.stdout    # scripts' output shown
    assert '\nevery stage: a 1-epoch schedule (warm-up 0.1 epoch, each script\'s preset blr), cut after 2 steps' \
        in p.stdout and '\norder of the means: ' in p.stdout     # the budget, where the table is printed
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
    md = (d / 'results' / 'RESULTS.md').read_text()
    for label in LABELS.values():
        assert f'| {label} |' in md and f'| {label} |' in p.stdout    # the table, also printed at the end
    assert 'git commit: ' in md and 'machine: ' in md and '--data fake' in md
    png = (d / 'results' / 'results.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 10_000


def test_the_report_is_rewritten_from_results_json_alone(first_run, tmp_path):
    """`python reproduce_report.py DIR`: the same report from results.json, with no run directory left; it
    links VALIDATION.md when one is beside it and says when and how it was re-written."""
    d, _ = first_run
    (tmp_path / 'results.json').write_bytes((d / 'results' / 'results.json').read_bytes())
    (tmp_path / 'VALIDATION.md').write_text('choices\n')
    p = run_script('-m', 'tools.reproduce_report', tmp_path)
    assert p.returncode == 0, p.stderr
    old, new = (d / 'results' / 'RESULTS.md').read_text(), (tmp_path / 'RESULTS.md').read_text()
    assert 'VALIDATION.md' not in old and new.count('[VALIDATION.md](VALIDATION.md)') == 1
    strip = lambda md: [line for line in md.splitlines() if 'VALIDATION.md' not in line and line]
    assert strip(old)[:-1] == strip(new)[:-1]                        # all but the line that says when
    assert strip(old)[-1].startswith('- written ') and 're-written from its results.json' in strip(new)[-1]
    assert (tmp_path / 'results.png').read_bytes().startswith(b'\x89PNG')
    p = run_script('-m', 'tools.reproduce_report', tmp_path / 'nowhere')
    assert p.returncode != 0 and 'results.json not found' in p.stderr and not (tmp_path / 'nowhere').exists()


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
    assert started == ['mae', *[f'{s} seed 0' for s in ORDER]]            # the longest first


def test_needs_and_threads(monkeypatch):
    stages = [('mae', 0)] + [(s, k) for s in ORDER for k in (0, 1)]
    assert needs('scratch', 1, stages) == [('mae', 0)] and needs('mae', 0, stages) == []
    assert needs('ensemble', 1, stages) == [('mae', 0), ('finetune', 1), ('distill', 1)]
    assert needs('copy', 0, stages[1:]) == [] and sorted(ORDER) == sorted(STAGES)
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
            f'reproduce.SCRIPTS["copy"] = {str(fail)!r}\nrun_main(reproduce.main)\n')
    runs = tmp_path / 'runs'
    p = run_script('-c', code, *TINY, '--jobs', '2', '--out-dir', runs, '--results-dir', tmp_path / 'results')
    assert p.returncode != 0 and 'copy seed 0 failed (exit 1): no such thing' in p.stderr, p.stderr[-2000:]
    assert 'waiting for 1 running stage(s)' in p.stdout
    assert os.path.exists(os.path.join(run_dir(str(runs), 'distill', 0), 'done.json'))   # it ran on to the end
    assert not os.path.exists(run_dir(str(runs), 'scratch', 0)) and not (tmp_path / 'results').exists()


def test_second_run_trains_nothing(first_run):
    d, _ = first_run
    ckpts = sorted((d / 'runs').rglob('checkpoint.pt'))
    assert len(ckpts) == 5                                       # mae, scratch, finetune, copy, distill
    before = [c.stat().st_mtime_ns for c in ckpts]
    p = reproduce(d)
    assert p.stdout.count('done, skipped') == 6
    assert ': running ' not in p.stdout and ': resuming ' not in p.stdout and ' | epoch ' not in p.stdout
    assert [c.stat().st_mtime_ns for c in ckpts] == before
    assert '| attention distillation |' in p.stdout


def test_interrupted_stage_is_resumed(first_run):
    d, _ = first_run
    scratch = run_dir(str(d / 'runs'), 'scratch', 0)
    os.remove(os.path.join(scratch, 'done.json'))               # as if stopped after its last checkpoint
    p = reproduce(d)
    assert 'scratch seed 0: resuming' in p.stdout and '--resume true' in p.stdout
    assert p.stdout.count('done, skipped') == 5
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
    """reproduce.py's main() in this process on tiny data (its signal handlers left out): None, or its one line."""
    import signal
    import tools.reproduce as reproduce
    monkeypatch.setattr(signal, 'signal', lambda *a: None)
    return run_in_process(monkeypatch, reproduce, *TINY, '--jobs', '2', '--out-dir', runs, '--results-dir', results,
                          *args)


def test_a_moved_reproduction_carries_on_and_replaces_only_its_own_results(moved, monkeypatch, capsys):
    """Its stages' commands name the old --out-dir: compared relative to their root, they are the same ones
    (the run used to be refused, naming the old path). The results, the same reproduction's, are replaced
    whole: a stale log of another seed is not left beside the new ones."""
    runs, results = moved
    stale = results / 'logs' / 'scratch' / 'seed7'
    stale.mkdir()
    (stale / 'log.txt').write_text('another run')
    assert reproduce_in_process(monkeypatch, runs, results) is None
    assert capsys.readouterr().out.count('done, skipped') == 6
    record = json.loads((results / 'results.json').read_text())
    assert all(r['run_dir'].startswith(str(runs)) for r in record['stages']) and not stale.exists()
    assert record['teacher_sha256'] == json.loads((runs / 'teacher.json').read_text())['sha256']


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
    assert msg and f'{teacher} is not the teacher the stages in {runs} were made from' in msg, msg
    assert 'put that file back, or choose another --out-dir' in msg and snapshot(runs, results) == before
    os.remove(runs / 'teacher.json')                                    # stages with no record of their teacher
    msg = reproduce_in_process(monkeypatch, runs, results)
    assert msg and 'holds stages made from a teacher it has no record of' in msg, msg


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
    (res / 'RESULTS.md').write_text('# whose?')
    with pytest.raises(ConfigError, match='holds RESULTS.md but no results.json saying what made them'):
        check_results_dir(str(res), cfg)
    (res / 'results.json').write_text(json.dumps({'config': vars(cfg), 'teacher_sha256': 'a' * 64}))
    check_results_dir(str(res), cfg, 'a' * 64)                          # the same reproduction
    with pytest.raises(ConfigError, match=r'made with a teacher with sha256 a{16}\.\.\. \(here b{16}'):
        check_results_dir(str(res), cfg, 'b' * 64)
    with pytest.raises(ConfigError, match=r'made with --epochs 1 \(here 2\)'):
        check_results_dir(str(res), parse([*TINY, '--epochs', '2']))
    check_results_dir(str(res), parse([*TINY, '--epochs', '2', '--replace-results', 'true']))
    (res / 'results.json').write_text('{"config": {"da')                # cut short
    with pytest.raises(ConfigError, match=r'results.json is not JSON, cut short .*git checkout -- .*replace-results'):
        check_results_dir(str(res), cfg)
    with pytest.raises(ConfigError, match='is a file, not a folder: choose another --results-dir'):
        check_results_dir(str(res / 'RESULTS.md'), cfg)
    with pytest.raises(ConfigError, match='is a file, so no folder can be made there'):
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
    (lambda r: cut_json(r / 'teacher.json'), 'teacher.json', 'choose another --out-dir'),
    (lambda r: (os.remove(r / 'ensemble' / 'seed0' / 'done.json'),
                cut_json(r / 'ensemble' / 'seed0' / 'ensemble.json')),
     'ensemble/seed0/ensemble.json', 'delete it and run the same command again (the ensemble stage makes it anew)'),
    (lambda r: (os.remove(r / 'distill' / 'seed0' / 'done.json'), cut_json(r / 'distill' / 'seed0' / 'config.json')),
     'distill/seed0/config.json', f"{os.path.join('distill', 'seed0')} to run that stage afresh"),
], ids=['done.json', 'metrics.jsonl', 'teacher.json', 'ensemble.json', 'config.json'])
def test_a_damaged_file_is_one_line_naming_it_and_a_fix_that_exists(made_here, monkeypatch, damage, named, fix):
    """Before any stage runs, nothing changed. A damaged ensemble.json used to end the ensemble stage with
    ensemble.py's advice to pass --overwrite true, which reproduce.py does not take."""
    runs, results = made_here
    damage(runs)
    before = snapshot(runs, results)
    msg = reproduce_in_process(monkeypatch, runs, results)
    assert msg and str(runs / named) in msg and fix in msg and '--overwrite' not in msg, msg
    assert snapshot(runs, results) == before


def test_the_report_from_a_damaged_results_json_is_one_line(first_run, tmp_path):
    d, _ = first_run
    good = json.loads((d / 'results' / 'results.json').read_text())
    for text in ('{"config": {"data": "fa', json.dumps({**good, 'stages': [{'stage': 'copy'}]})):
        (tmp_path / 'results.json').write_text(text)
        p = run_script('-m', 'tools.reproduce_report', tmp_path)
        assert p.returncode == 1 and p.stderr.count('\n') == 1 and str(tmp_path / 'results.json') in p.stderr, p.stderr
        assert 'git checkout -- ' in p.stderr and sorted(os.listdir(tmp_path)) == ['results.json'], p.stderr


def test_one_learning_rate_for_every_training_stage(tmp_path):
    cfg = parse([*TINY, '--blr', '3e-3'])
    for stage in STAGES[:4]:
        cmd = stage_command(cfg, stage, 0, str(tmp_path), 't.pt')
        assert cmd[cmd.index('--blr') + 1] == '0.003', stage
    assert '--blr' not in stage_command(cfg, 'mae', 0, str(tmp_path), '') + \
        stage_command(cfg, 'ensemble', 0, str(tmp_path), 't.pt') + stage_command(parse(TINY), 'copy', 0, str(tmp_path), 't.pt')
    with pytest.raises(ConfigError):
        parse([*TINY, '--blr', '-1'])


# -----------------------------------------------------------------------------
# Inputs checked before the first stage; a kill stops the running stage too


def test_every_input_is_checked_before_the_first_stage(tmp_path, monkeypatch):
    import tools.reproduce as reproduce
    base = [*TINY, '--out-dir', tmp_path / 'runs', '--results-dir', tmp_path / 'results']
    msg = run_in_process(monkeypatch, reproduce, *base, '--teacher', tmp_path / 'missing.pt')
    assert msg and str(tmp_path / 'missing.pt') in msg, msg
    # a later stage's directory holding another run: found before any stage trains
    other = stage_command(parse([*TINY, '--epochs', '3']), 'distill', 0, str(tmp_path / 'runs'), 't.pt')
    os.makedirs(run_dir(str(tmp_path / 'runs'), 'distill', 0))
    with open(os.path.join(run_dir(str(tmp_path / 'runs'), 'distill', 0), 'config.json'), 'w') as f:
        json.dump({'argv': other[1:]}, f)
    msg = run_in_process(monkeypatch, reproduce, *base)
    assert msg and 'holds a run made with' in msg, msg
    assert sorted(os.listdir(tmp_path)) == ['runs'] and os.listdir(tmp_path / 'runs') == ['distill']


def stage_pids(marker):
    """Processes whose command line holds `marker` (this test's own directory): the stage it started."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                cmd = f.read().decode(errors='replace')
        except OSError:
            continue
        if marker in cmd and 'mae_pretrain.py' in cmd:
            pids.append(int(pid))
    return pids


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
def test_a_killed_reproduction_stops_its_stage(tmp_path):
    runs = str(tmp_path / 'runs')
    p = subprocess.Popen([sys.executable, '-m', 'tools.reproduce', *TINY, '--max-steps', '0', '--mae-epochs', '100',
                          '--out-dir', runs, '--results-dir', str(tmp_path / 'results')],
                         cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage = []
    try:
        deadline = time.time() + 240
        while not stage and time.time() < deadline and p.poll() is None:
            stage = stage_pids(runs)
            time.sleep(0.5)
        assert stage, f'the mae stage never started:\n{p.communicate(timeout=60)}'
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        assert p.returncode != 0 and 'mae stopped by SIGTERM' in err, (out[-2000:], err[-2000:])
        wait_for(lambda: not stage_pids(runs), 30)
        assert not stage_pids(runs), 'the stage trains on after reproduce.py was killed'
    finally:
        if p.poll() is None:
            p.kill()
        for pid in stage_pids(runs):   # only the stage this test started
            os.kill(pid, signal.SIGKILL)


def wait_for(done, seconds):
    """Poll done() twice a second until it holds or `seconds` have passed."""
    deadline = time.time() + seconds
    while not done() and time.time() < deadline:
        time.sleep(0.5)


def alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl(PR_SET_PDEATHSIG) is Linux only')
def test_a_stage_dies_with_reproduce_py_even_killed_by_sigkill():
    """SIGKILL reaches no handler: the stage is started asking the kernel for SIGTERM when its parent dies
    (before, it trained on as an orphan until its next line of output hit the closed pipe)."""
    parent = subprocess.Popen([sys.executable, '-c', (
        'import os, subprocess, sys, time\n'
        'from tools.reproduce import die_with\n'
        'stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], '
        'preexec_fn=die_with(os.getpid()))\n'
        'print(stage.pid, flush=True)\n'
        'time.sleep(300)')], cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, text=True)
    stage = None
    try:
        stage = int(parent.stdout.readline())
        assert alive(stage)
        parent.kill()
        parent.wait(timeout=30)
        wait_for(lambda: not alive(stage), 20)
        assert not alive(stage), 'the stage lives on after reproduce.py was killed with SIGKILL'
    finally:
        if parent.poll() is None:
            parent.kill()
        if stage and alive(stage):   # only the process this test started
            os.kill(stage, signal.SIGKILL)


def test_amp_reaches_every_stage_and_names_its_results(tmp_path):
    """--amp off (fp32, as a CPU without bf16 runs) is passed to every stage, the ensemble included; --amp auto
    leaves the scripts' own default unsaid, so stages made before the flag existed are the same stages. Results
    made with another --amp are another reproduction's; an older results.json, made before the flag, counts as
    auto."""
    from tools.reproduce_report import check_results_dir
    root = str(tmp_path)
    off, auto = parse([*TINY, '--amp', 'off']), parse(TINY)
    for stage in ('mae', 'scratch', 'finetune', 'copy', 'distill', 'ensemble'):
        cmd = stage_command(off, stage, 0, root, 't.pt')
        assert cmd[cmd.index('--amp') + 1] == 'off', (stage, cmd)
        assert '--amp' not in stage_command(auto, stage, 0, root, 't.pt'), stage
    with pytest.raises(ConfigError):
        parse([*TINY, '--amp', 'fp64'])
    small = parse([*TINY, '--batch-size', '16'])     # a budget's batch: the four training stages, not the teacher's
    for stage in ('scratch', 'finetune', 'copy', 'distill'):
        cmd = stage_command(small, stage, 0, root, 't.pt')
        assert cmd[cmd.index('--batch-size') + 1] == '16', (stage, cmd)
    assert '--batch-size' not in stage_command(small, 'mae', 0, root, '')
    assert '--batch-size' not in stage_command(auto, 'copy', 0, root, 't.pt')
    res = tmp_path / 'results'
    res.mkdir()
    old = json.load(open(os.path.join(ROOT, 'results', 'fashion-mnist', 'results.json')))
    assert 'amp' not in old['config']          # made before --amp existed
    (res / 'results.json').write_text(json.dumps(old))
    full = parse(['--data', 'fashion-mnist'])
    check_results_dir(str(res), full)          # the same reproduction: accepted
    with pytest.raises(ConfigError, match=r'--amp auto \(here off\)'):
        check_results_dir(str(res), parse(['--data', 'fashion-mnist', '--amp', 'off']))
