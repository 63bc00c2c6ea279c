"""What a run meets at its edges: large ensemble weights, a divergence named by what moved it, a kill while the first
checkpoint is written, a finished MAE run, SIGTERM with loader workers, an interpreter's end with them alive, a
reproduction's stage inputs. (Bad values of every option: tests/test_checks.py.)"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ensemble
import finetune
import mae_pretrain
from conftest import ROOT, TINY, run_in_process, run_script, sub_env
from util.config import ConfigError
from util.launch import run_main

TEACHER = ['--teacher', 'teachers/fashion-mnist-mae.pt']


def test_ensemble_weights_too_large_to_sum_are_weights_still():
    assert ensemble.normalise_weights([1e308, 1e308], 2) == [0.5, 0.5]
    assert ensemble.normalise_weights([3e307, 1e308], 2) == pytest.approx([3 / 13, 10 / 13])
    with pytest.raises(ConfigError, match=r'--weights 0.0 0.0: must be'):
        ensemble.normalise_weights([0.0, 0.0], 2)


# -----------------------------------------------------------------------------
# A run at its edges


def test_a_divergence_before_any_checkpoint_says_there_is_none(monkeypatch, tmp_path):
    """--weight-decay 1e308 diverges at once: the line advised a resume, with no checkpoint to resume."""
    msg = run_in_process(monkeypatch, finetune, *TINY, '--weight-decay', '1e308', '--out-dir', tmp_path / 'r')
    assert msg and 'the run diverged and stopped; no checkpoint was written yet' in msg, msg
    assert not (tmp_path / 'r' / 'checkpoint.pt').exists() and '--resume' not in msg, msg


def test_a_finished_mae_run_resumes_and_exports(monkeypatch, tmp_path):
    """Its evaluations record mse, not top-1: a finished run was refused as 'not evaluated there'."""
    d = tmp_path / 'mae'
    assert run_in_process(monkeypatch, mae_pretrain, *TINY, '--out-dir', d) is None
    assert run_in_process(monkeypatch, mae_pretrain, *TINY, '--out-dir', d, '--resume', 'true', '--export',
                          tmp_path / 'teacher.pt') is None
    assert torch.load(tmp_path / 'teacher.pt', weights_only=True)['made']['held_out_mse'] > 0


@pytest.mark.parametrize('how', ['Ctrl-C', 'kill -9'])
def test_a_run_stopped_while_writing_its_first_checkpoint_goes_on_with_the_same_command(monkeypatch, tmp_path, how):
    """Its evaluation was in metrics.jsonl and no checkpoint was: the same command was refused as a finished run.
    Now the evaluation is written after its checkpoint, and a temporary file left by a kill is no one's."""
    d = tmp_path / 'run'
    plain = torch.save

    def cut(obj, f, *args, **kw):
        f.write(b'PK\x03\x04 half a checkpoint')
        if how == 'kill -9':   # what a kill leaves: the temporary file (nothing ran to remove it)
            monkeypatch.setattr(os, 'remove', lambda path: None)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', cut)
    monkeypatch.setattr(sys, 'argv', ['finetune.py', *TINY, '--out-dir', str(d)])
    with pytest.raises(SystemExit) as e:
        run_main(finetune.main)
    assert e.value.code == 130
    monkeypatch.undo()
    assert torch.save is plain
    assert not (d / 'checkpoint.pt').exists() and not (d / 'metrics.jsonl').exists()
    assert run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d) is None
    assert len((d / 'metrics.jsonl').read_text().splitlines()) == 1


def children(pid):
    out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as f:
        return f.read().split()[2] != 'Z'


@pytest.mark.parametrize('to_group', [False, True])
def test_sigterm_ends_the_loader_workers_with_the_run_in_one_line(tmp_path, to_group):
    """A worker printed a ConnectionResetError traceback and outlived the run by ~5 s; a SIGTERM to every process
    of the run (a scheduler's) made torch report its workers as failed, in a traceback. The workers go on making
    batches until the run has saved the step it reached (util/stop.py), then end with it."""
    # 4096 fake images of 128 px: too many to hold in memory (util.datafiles.FAKE_HELD), so read per image by the workers
    p = subprocess.Popen([sys.executable, 'finetune.py', *TINY, '--fake-size', '4096', '--img-size', '128',
                          '--num-workers', '2', '--log-every', '1', '--out-dir', str(tmp_path / 'r')], cwd=ROOT, env=sub_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=to_group)
    for line in p.stdout:
        if 'step 2/' in line:
            break
    workers = children(p.pid)   # the training loader's two, and the evaluation loader's (the start-up check's batch)
    assert len(workers) >= 2, workers
    os.killpg(p.pid, signal.SIGTERM) if to_group else p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    last = out.strip().splitlines()[-1]
    assert p.returncode == 75 and last.startswith('saved at step ') and '(SIGTERM)' in last, out[-2000:] + err
    assert 'Traceback' not in err, err
    time.sleep(0.5)
    assert not any(alive(w) for w in workers), 'a loader worker outlived the run'
    assert 'Traceback' not in err


def test_an_interpreter_whose_loader_workers_are_still_alive_ends(tmp_path):
    """The workers ignore SIGTERM (a scheduler's, while the run saves), and SIGTERM is how multiprocessing ends them at
    the interpreter's exit, before it waits for them: a loader kept in a reference cycle until then (as an error's
    traceback keeps one) left the interpreter waiting forever, the test process's own included."""
    code = ('import types, torch\nfrom util.datafiles import build_loader\n'
            'data = torch.utils.data.TensorDataset(torch.zeros(64, 1), torch.zeros(64, dtype=torch.long))\n'
            'cfg = types.SimpleNamespace(batch_size=8, num_workers=1, seed=0)\n'
            'cycle = [iter(build_loader(cfg, data, train=True))]\n'
            'next(cycle[0])\ncycle.append(cycle)\n')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=sub_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and not p.stderr, p.stderr[-2000:]


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
