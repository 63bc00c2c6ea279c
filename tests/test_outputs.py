"""Nothing lost: a run writes only into an empty folder or one of its own runs, never over another program's files;
never deletes or replaces a file it reads; takes what it evaluates on from what the checkpoints record; and a path
of the wrong kind (a directory where a file goes) is one line. Each refused command leaves every file as it was."""
import hashlib
import json
import os
import subprocess
import shutil
import sys

import numpy as np
import pytest
import torch

import attention_distill
import ensemble
import evaluate
import finetune
import mae_pretrain
from conftest import ROOT, TINY, run_in_process, run_script, sub_env
from test_rundir import AS_USER
from tools import curves
from data import build_dataset
from util.config import TrainConfig
from util.datafiles import DataError, read_classes


def digest(d):
    """{relative path: sha256 or 'dir'} of everything under d."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs:
            out[os.path.relpath(os.path.join(root, n), d)] = 'dir'
        for n in files:
            out[os.path.relpath(os.path.join(root, n), d)] = hashlib.sha256(open(os.path.join(root, n), 'rb')
                                                                            .read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A finished tiny run of finetune.py: its checkpoint is a teacher, an --init, a model to score."""
    out = tmp_path_factory.mktemp('outputs') / 'ft'
    p = run_script('finetune.py', *TINY, '--out-dir', out, '--max-steps', '2')
    assert p.returncode == 0, p.stderr[-2000:]
    return out

# -----------------------------------------------------------------------------
# 1. An output folder that holds someone else's files


def make(folder, files):
    for name, content in files.items():
        path = folder / name
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


@pytest.mark.parametrize('files', [
    {'config.json': '{"model_type": "vit", "hidden_size": 768}', 'log.txt': 'my notes\n'},
    {'notes.md': 'mine\n'},
    {'config.json': None},                                    # a directory where the file goes
    {'log.txt': 'a log of another program\n', 'model.safetensors': 'x'},
], ids=['another library\'s model folder', 'a user\'s notes', 'config.json a directory', 'another log'])
@pytest.mark.parametrize('overwrite', [[], ['--overwrite', 'true']], ids=['new', 'overwrite'])
def test_a_folder_of_other_files_is_refused(tmp_path, monkeypatch, files, overwrite):
    """It wrote over config.json and log.txt, exit 0; --overwrite true deletes only a run of these scripts."""
    out = tmp_path / 'out'
    make(out, files)
    before = digest(out)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', out, '--max-steps', '1', *overwrite)
    assert msg and f'--out-dir {out} is not empty and holds no run of these scripts' in msg, msg
    assert digest(out) == before


def test_a_run_of_these_scripts_is_still_overwritten_on_request(run_dir, tmp_path, monkeypatch):
    out = tmp_path / 'copy'
    shutil.copytree(run_dir, out)
    (out / 'notes.md').write_text('mine\n')                    # a user's file in a run folder stays untouched
    assert run_in_process(monkeypatch, finetune, *TINY, '--out-dir', out, '--max-steps', '1',
                          '--overwrite', 'true') is None
    assert (out / 'notes.md').read_text() == 'mine\n'

# -----------------------------------------------------------------------------
# 2. Inputs inside the output


@pytest.mark.parametrize('script, flag', [(attention_distill, '--teacher'), (finetune, '--init')])
@pytest.mark.parametrize('how', [['--overwrite', 'true'], ['--resume', 'true']])
def test_a_run_never_replaces_a_file_it_reads(run_dir, tmp_path, monkeypatch, script, flag, how):
    """--overwrite true deleted the teacher (or the --init weights) it had just read; the student recorded a
    teacher that no longer existed as it was."""
    out = tmp_path / 'run'
    shutil.copytree(run_dir, out)
    before = digest(out)
    msg = run_in_process(monkeypatch, script, *TINY, flag, out / 'checkpoint.pt', '--out-dir', out, *how)
    assert msg and f'{flag} {out / "checkpoint.pt"} is a file of --out-dir' in msg, msg
    assert digest(out) == before

# -----------------------------------------------------------------------------
# 3. Defaults that differ from the record


def test_ensemble_scores_models_on_the_data_they_record(run_dir, tmp_path, monkeypatch, capsys):
    """Without --data it scored them on its default data set (Fashion-MNIST) without a word."""
    assert run_in_process(monkeypatch, ensemble, '--models', run_dir / 'checkpoint.pt', '--fake-size', '256',
                          '--num-workers', '0') is None
    out = capsys.readouterr().out
    assert "--data fake --data-dir ./data: as the models' checkpoints record" in out and 'fake test split' in out


def test_ensemble_of_models_of_different_data_asks_which(run_dir, tmp_path, monkeypatch, capsys):
    other = tmp_path / 'other.pt'
    ck = torch.load(run_dir / 'checkpoint.pt', weights_only=True)
    ck['config']['data'], ck['classes'] = 'cifar10', read_classes('cifar10')   # as a CIFAR-10 run records them
    torch.save(ck, other)
    msg = run_in_process(monkeypatch, ensemble, '--models', run_dir / 'checkpoint.pt', other)
    assert msg and 'the models do not record one data set' in msg and 'cifar10' in msg, msg
    capsys.readouterr()
    msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', run_dir / 'checkpoint.pt', other)
    assert msg and "predicts other class names (its class 0 is 'airplane', the data's '0'" in msg, msg   # compared by name


def write_idx(path, array):
    a = np.asarray(array, dtype=np.uint8)
    path.write_bytes(bytes([0, 0, 8, a.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in a.shape) + a.tobytes())


def test_a_data_set_s_files_come_from_one_place(tmp_path):
    """A --data-dir with only the test files was paired with the training files of Debian's copy (or the labels
    of one folder with the images of another)."""
    write_idx(tmp_path / 't10k-images-idx3-ubyte', np.zeros((3, 28, 28)))
    write_idx(tmp_path / 't10k-labels-idx1-ubyte', np.zeros(3))
    cfg = TrainConfig(data='fashion-mnist', data_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path} holds only some of Fashion-MNIST's files: put all four"):
        build_dataset(cfg, train=False)

# -----------------------------------------------------------------------------
# 4. Paths of the wrong kind


@pytest.mark.parametrize('name', ['metrics.jsonl', 'log.txt'])
def test_a_directory_where_a_run_file_goes_is_one_line(run_dir, tmp_path, monkeypatch, name):
    """It ended in an IsADirectoryError traceback."""
    out = tmp_path / 'run'
    shutil.copytree(run_dir, out)
    os.remove(out / 'checkpoint.pt')
    os.remove(out / name)
    (out / name).mkdir()
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', out, '--max-steps', '1', '--overwrite', 'true')
    assert msg and f'cannot write {out / name} (Is a directory)' in msg and 'move what is there away' in msg, msg


def test_benchmark_results_are_written_whole_or_not_at_all(tmp_path):
    (tmp_path / 'benchmark.json').mkdir()
    # the least the benchmark measures (one case, its saved bytes): what fails is the write at its end
    p = run_script('-m', 'tools.benchmark', '--quick', 'true', '--methods', 'train', '--paths', 'eager', '--timing',
                   'false', '--out-dir', tmp_path, timeout=300)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith('error: cannot write'), p.stderr[-2000:]
    assert '(Is a directory): ' in p.stderr and 'move what is there away' in p.stderr and 'Traceback' not in p.stderr
    assert sorted(os.listdir(tmp_path)) == ['benchmark.json']      # no temporary file left, nor BENCHMARK.md


def test_provenance_names_the_commit_and_says_when_the_code_is_not_it(tmp_path, monkeypatch):
    """A copy of the tree whose .git lags behind its files (as a GPU machine's copy had) is not that commit."""
    import util.files
    from util.files import git_commit
    (tmp_path / 'util').mkdir()   # git_commit asks the repository util/files.py is in: here, this copy
    monkeypatch.setattr(util.files, '__file__', str(tmp_path / 'util' / 'files.py'))

    def git(*args):
        subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *args], cwd=tmp_path, check=True,
                       capture_output=True)
    (tmp_path / 'vit.py').write_text('x = 1\n')
    git('init', '-q')
    git('add', 'vit.py')
    git('commit', '-qm', 'one')
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert len(head) == 40 and git_commit() == head
    (tmp_path / 'notes.txt').write_text('not code\n')
    assert git_commit() == head
    (tmp_path / 'vit.py').write_text('x = 2\n')
    assert git_commit() == head + ' (with uncommitted changes to *.py)'

# -----------------------------------------------------------------------------
# 5. Outputs written once the work is done: checked when the command starts and again as each is written


def second_command_midway(monkeypatch, module, where, second):
    """Run `second` (a command line of `module`) while the first is at `where` (a function of the module that runs
    between its start and its write): two commands given one output at once. Returns the second's message."""
    said, first = [], getattr(module, where)

    def midway(*args, **kwargs):
        if not said:   # once: the second command passes here too
            said.append('running')
            said[0] = run_in_process(monkeypatch, module, *second)
        return first(*args, **kwargs)
    monkeypatch.setattr(module, where, midway)
    return said


@pytest.mark.parametrize('flag', ['--export', '--out'])
def test_two_commands_into_one_output_never_both_write_it(run_dir, tmp_path, monkeypatch, flag):
    """mae_pretrain.py --export and evaluate.py --out checked the path was free at the start and wrote at the end:
    two such runs both exited 0 and the second replaced the first's file (a teacher lost in a sweep). The one that
    writes first keeps its file, whole; the other is refused in one line as it writes (os.link: a name taken)."""
    if flag == '--export':
        module, where, target = mae_pretrain, 'save_reconstructions', tmp_path / 'shipped' / 'teacher.pt'
        args = [*TINY, '--max-steps', '1', '--export', target]
        first, second = [*args, '--out-dir', tmp_path / 'a'], [*args, '--out-dir', tmp_path / 'b']
    else:
        module, where, target = evaluate, 'predict_all', tmp_path / 'shared' / 'robustness.md'
        args = ['--data', 'fake', '--num-workers', '0', '--out', tmp_path / 'shared']
        first, second = [*args, '--models', run_dir / 'checkpoint.pt'], [*args, '--models', run_dir / 'checkpoint.pt',
                                                                          run_dir / 'checkpoint.pt']
    said = second_command_midway(monkeypatch, module, where, second)
    msg = run_in_process(monkeypatch, module, *first)
    assert said == [None] and msg and f'cannot write {target} (File exists)' in msg, (said, msg)
    if flag == '--export':   # the second's file, whole
        assert str(tmp_path / 'b') in torch.load(target, weights_only=True)['made']['command']
    else:
        assert len(json.loads(target.with_suffix('.json').read_text())['rows']) == 2
    assert sorted(os.listdir(target.parent)) == (['teacher.pt'] if flag == '--export' else
                                                 ['robustness.json', 'robustness.md'])


def test_an_ensemble_refused_leaves_no_folder(run_dir, tmp_path, monkeypatch):
    """--out a/b/r.json: the folders were made before a model was read, and stayed when it was refused."""
    out = tmp_path / 'a' / 'b' / 'r.json'
    msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', tmp_path / 'missing.pt', '--out', out)
    assert msg and 'missing.pt' in msg and not (tmp_path / 'a').exists(), msg
    assert run_in_process(monkeypatch, ensemble, *TINY, '--models', run_dir / 'checkpoint.pt', '--out', out) is None
    assert json.loads(out.read_text())['models'][0]['weight'] == 1.0 and os.listdir(out.parent) == ['r.json']


@pytest.mark.parametrize('command', ['mae_pretrain.py --export', 'ensemble.py --out', 'evaluate.py --out',
                                     'tools.curves --out'])
def test_a_users_file_at_an_outputs_old_temporary_name_is_kept(run_dir, tmp_path, monkeypatch, command):
    """The output was written through <output>.tmp, removed first: a user's own X.pt.tmp was deleted without a word
    and the command exited 0. A temporary file now has a name made for it, exclusively, and goes with its write."""
    folder = tmp_path / 'shipped'
    folder.mkdir()
    models = ['--models', run_dir / 'checkpoint.pt']
    if command == 'mae_pretrain.py --export':
        outputs = [folder / 'teacher.pt']
        args = [mae_pretrain, *TINY, '--max-steps', '1', '--out-dir', tmp_path / 'run', '--export', outputs[0]]
    elif command == 'ensemble.py --out':
        outputs = [folder / 'result.json']
        args = [ensemble, *TINY, *models, '--out', outputs[0]]
    elif command == 'evaluate.py --out':
        outputs = [folder / 'robustness.md', folder / 'robustness.json']
        args = [evaluate, '--data', 'fake', '--num-workers', '0', *models, '--out', folder]
    else:
        outputs = [folder / 'curves.png']
        args = [curves, run_dir, '--out', outputs[0]]
    for out in outputs:
        out.with_name(out.name + '.tmp').write_text('mine\n')
    assert run_in_process(monkeypatch, *args) is None
    for out in outputs:
        assert out.with_name(out.name + '.tmp').read_text() == 'mine\n' and out.stat().st_size > 0
    assert sorted(os.listdir(folder)) == sorted([o.name for o in outputs] + [o.name + '.tmp' for o in outputs])


@pytest.mark.skipif(AS_USER and not shutil.which('setpriv'), reason='root, and no setpriv to drop its rights')
def test_an_ensemble_out_that_cannot_be_written_is_refused_before_any_model_is_scored(run_dir, tmp_path):
    """Into a read-only folder holding an earlier result it scored every model first, then said "no checkpoint was
    saved yet ... run the command again": the work lost, and the advice false."""
    folder = tmp_path / 'ro'
    folder.mkdir()
    out = folder / 'r.json'
    args = [*TINY, '--models', run_dir / 'checkpoint.pt', '--out', out]
    assert run_script('ensemble.py', *args).returncode == 0
    before = digest(folder)
    os.chmod(folder, 0o555)
    try:
        p = subprocess.run([*AS_USER, sys.executable, 'ensemble.py', *map(str, args)], cwd=ROOT, env=sub_env(),
                           capture_output=True, text=True, timeout=240)
    finally:
        os.chmod(folder, 0o755)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
    assert f'--out {out}' in p.stderr and 'Permission denied' in p.stderr and 'no checkpoint' not in p.stderr
    assert '| ensemble' not in p.stdout and digest(folder) == before
