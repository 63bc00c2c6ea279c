"""tools/followup.py: the records of tools/followup.sh collected into followup.json, and the page written from that json
alone. The page's numbers are recomputed here from the runs the test wrote (statistics, not the tool's code)."""
import json
import os
import random
import re
from statistics import mean, stdev

import shutil

import pytest

from conftest import ROOT, run_in_process
from tools import followup
from tools.intervals import paired, side

ARMS = [f'{m}-{s}' for m in ('scratch', 'copy', 'distill') for s in ('plain', 'matched')]


def write_run(folder, record, config, wall_s=60):
    """A run's records as tools/followup.sh copies them: metrics.jsonl, config.json, wall_s.txt."""
    os.makedirs(folder)
    with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps({'step': 1, **record}) + '\n')
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'git_commit': 'abc1234', 'max_steps': 0, 'val_size': 0, 'epochs': 3, **config}, f)
    with open(os.path.join(folder, 'wall_s.txt'), 'w') as f:
        f.write(f'{wall_s}\n')


def teacher(out, mse, val_size=5000):
    """A teacher's records, as tools/followup.sh copies them to its OUT."""
    write_run(os.path.join(out, 'logs', 'teacher', 'seed0'), {'mse': mse}, {'epochs': 24, 'val_size': val_size},
              wall_s=1800)


def layout(out, top1, max_steps=0, mse=0.41234):
    """tools/followup.sh's OUT with these runs ({arm: {seed: top-1}}) and a teacher of this masked MSE."""
    for arm, by_seed in top1.items():
        taught = {} if arm.startswith('scratch') else {'teacher_sha256': 'f0110' * 12}
        for k, value in by_seed.items():
            write_run(os.path.join(out, 'logs', arm, f'seed{k}'), {'top1': value}, {'max_steps': max_steps, **taught})
    teacher(out, mse)
    with open(os.path.join(out, 'machine.txt'), 'w') as f:
        f.write('a test machine, 2 cores (one a run), torch 0\n')


def made_up(failing, seeds=3):
    """Runs with the follow-up's failure (the plain students below their scratch, the matched above theirs) or
    without it; random otherwise."""
    rng = random.Random(failing)
    base = {'scratch-plain': 80.0, 'scratch-matched': 80.5, 'copy-plain': 77.0 if failing else 83.0,
            'copy-matched': 83.5, 'distill-plain': 77.5 if failing else 84.0, 'distill-matched': 84.5}
    return {arm: {k: round(base[arm] + rng.uniform(-0.4, 0.4), 2) for k in range(seeds)} for arm in ARMS}


def diff(a, b):
    """(mean, std) over the seeds of a[k] - b[k]."""
    d = [a[k] - b[k] for k in a]
    return mean(d), stdev(d)


def interaction(runs, method):
    """'+m.mm ± s.ss': the matched student's gain over its scratch run less the plain one's, over the seeds."""
    gain = {s: {k: runs[f'{method}-{s}'][k] - runs[f'scratch-{s}'][k] for k in runs[f'scratch-{s}']}
            for s in ('plain', 'matched')}
    m, sd = diff(gain['matched'], gain['plain'])
    return f'{m:+.2f} ± {sd:.2f}'


@pytest.mark.parametrize('failing', [True, False])
def test_the_page_states_the_runs_numbers(monkeypatch, tmp_path, failing):
    runs = made_up(failing)
    layout(tmp_path, runs)
    theirs = made_up(not failing)
    if failing:   # the family chosen against: its teacher alone
        teacher(tmp_path / 'rival', 0.40017)
    else:         # and its runs, collected first: its interaction is stated on this page too
        layout(tmp_path / 'rival', theirs, mse=0.5)
        assert run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / 'rival', '--family',
                              'dinov2') is None
    assert run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path, '--command',
                          'bash tools/followup.sh', '--rival', tmp_path / 'rival') is None
    saved = json.loads((tmp_path / 'followup.json').read_text())
    assert saved['runs'] == {arm: {str(k): v for k, v in r.items()} for arm, r in runs.items()}
    assert not saved['cut_short']
    assert saved['teacher'] == {'held_out_mse': 0.41234, 'epochs': 24, 'sha256': ['f0110' * 12]}
    assert saved['wall_s'] == 18 * 60 + 1800
    text = (tmp_path / 'README.md').read_text()
    assert (tmp_path / 'followup.png').stat().st_size > 0
    rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:-1]]
            for line in text.splitlines() if line.startswith('| ') and '---' not in line}
    for student in ('plain', 'matched'):
        values = list(runs[f'scratch-{student}'].values())
        assert rows[student][0] == f'{mean(values):.2f} ± {stdev(values):.2f}'
        for col, method in ((1, 'copy'), (2, 'distill')):
            values = list(runs[f'{method}-{student}'].values())
            m, s = diff(runs[f'{method}-{student}'], runs[f'scratch-{student}'])
            assert rows[student][col] == f'{mean(values):.2f} ± {stdev(values):.2f} ({m:+.2f} ± {s:.2f})'
    for col, method in enumerate(('scratch', 'copy', 'distill')):
        m, s = diff(runs[f'{method}-matched'], runs[f'{method}-plain'])
        assert rows['matched − plain'][col] == f'{m:+.2f} ± {s:.2f}'
    flat = ' '.join(text.split())   # the page's paragraphs are wrapped
    verdicts = re.findall(r'failure \(.*?\) (shows here|does not show here|is not decided by these seeds)', flat)
    expected = []
    for method in ('copy', 'distill'):   # by the gains' intervals over seeds (tools/intervals.py)
        plain, like = (side(paired(runs[f'{method}-{s}'], runs[f'scratch-{s}'])) for s in ('plain', 'matched'))
        expected.append('shows here' if (plain, like) == ('below', 'above') else
                        'does not show here' if 'above' in (plain,) or like == 'below' else
                        'is not decided by these seeds')
    assert verdicts == expected and len(set(expected)) == 1 and (expected[0] == 'shows here') == failing
    # the interaction, the follow-up's claim: the matched student's gain less the plain one's, seed by seed
    interactions = re.findall(r'The interaction is ([+-]\d+\.\d+ ± \d+\.\d+) points', flat)
    assert interactions == [interaction(runs, m) for m in ('copy', 'distill')], interactions
    # the other teacher's, from its own runs, where they were collected
    other = re.search(r'The other teacher\*\* \(\[its page\]\(rival/README.md\)\)\. With DINOv2\'s layer scale '
                      r'\(from 1e-5\), the interaction is ([+-]\d+\.\d+ ± \d+\.\d+) points after copy \(.*?\)\. After '
                      r'distillation it is ([+-]\d+\.\d+ ± \d+\.\d+) points', flat)
    assert (other is None) == failing, flat
    if other:
        assert list(other.groups()) == [interaction(theirs, m) for m in ('copy', 'distill')], other.groups()
    assert '0.4123' in flat and 'f0110' * 12 in flat and 'bash tools/followup.sh' in text and 'a test machine' in text
    said = re.search(r"This teacher's masked MSE there is ([\d.]+) \((.*?)\); "
                     r"the teacher with DINOv2's .*?, ([\d.]+)\.", flat)
    assert said.groups() == (('0.4123', 'not the lower', '0.4002') if failing else ('0.4123', 'the lower, the better '
                                                                                     'teacher', '0.5000')), flat
    assert ('So the other teacher was the first' in flat) == failing and \
        ('So this teacher was the first.' in flat) != failing
    assert 'not a result' not in text
    # the page alone, again from the json: the same text
    (tmp_path / 'README.md').unlink()
    assert run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path, '--page-only', 'true') is None
    assert (tmp_path / 'README.md').read_text() == text


def test_runs_cut_short_are_said_not_a_result_and_a_missing_arm_or_a_second_teacher_is_one_line(monkeypatch, tmp_path):
    runs = made_up(True)
    layout(tmp_path / 'short', runs, max_steps=2)
    assert run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / 'short') is None
    assert 'not a result' in (tmp_path / 'short' / 'README.md').read_text()
    del runs['copy-matched']
    layout(tmp_path / 'missing', runs)
    msg = run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / 'missing')
    assert 'copy-matched' in msg and 'tools/followup.sh' in msg
    # a teacher re-made while the runs went on: its runs and the old one's are not one experiment
    layout(tmp_path / 'two', made_up(True))
    config = tmp_path / 'two' / 'logs' / 'distill-plain' / 'seed2' / 'config.json'
    config.write_text(json.dumps({**json.loads(config.read_text()), 'teacher_sha256': 'e' * 64}))
    msg = run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / 'two')
    assert '2 teacher files' in msg and 'eeeeeeeeeeee' in msg
    # the family chosen against: its teacher missing, or one that held out other images, is no comparison
    msg = run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / 'short', '--rival', tmp_path / 'none')
    assert 'holds no teacher' in msg and 'STOP=teacher FAMILY=dinov2' in msg, msg
    teacher(tmp_path / 'other', 0.3, val_size=1000)
    msg = run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / 'short', '--rival', tmp_path / 'other')
    assert 'held out 1000 training images, this one 5000' in msg, msg


@pytest.mark.parametrize('family, name, rival, command', [
    ('clip', 'followup', 'followup-dinov2', 'bash tools/followup.sh'),
    ('dinov2', 'followup-dinov2', 'followup', 'FAMILY=dinov2 bash tools/followup.sh')])
def test_the_committed_page_is_what_its_runs_give(monkeypatch, tmp_path, family, name, rival, command):
    """results/fashion-mnist/followup and followup-dinov2, one teacher each: followup.json collected again from the
    committed runs' records, and README.md written again from it, are the committed ones (README.md to the byte;
    followup.json but for the commit it was made at), with the command the page gives, as tools/followup.sh passes
    it. Each page states the other teacher's interaction from the other's followup.json."""
    committed = os.path.join(ROOT, 'results', 'fashion-mnist')
    for folder in (name, rival):
        shutil.copytree(os.path.join(committed, folder), tmp_path / folder)
    for file in ('followup.json', 'README.md'):
        (tmp_path / name / file).unlink()
    assert run_in_process(monkeypatch, followup, '--dirty', 'true', '--out', tmp_path / name, '--family', family,
                          '--command', command, '--rival', tmp_path / rival) is None
    with open(os.path.join(committed, name, 'README.md')) as f:
        assert (tmp_path / name / 'README.md').read_text() == f.read()
    with open(os.path.join(committed, name, 'followup.json')) as f:
        record = json.load(f)
    made = json.loads((tmp_path / name / 'followup.json').read_text())
    # all but the commit it was made at (this one's, a later one's): made from committed code
    assert record.pop('page')['clean'] and {**made, 'page': None} == {**record, 'page': None}
