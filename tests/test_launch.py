"""util/launch.py: what a script's start and end say (an unexpected error shows its traceback and no advice to
continue; a fork the machine refuses names --num-workers; Ctrl-C while torch is imported exits 130 quietly), and every
script as a user launches it on a GPU (`python -m pytest -m gpu tests`): under torchrun, whose one
process still starts NCCL and wraps the student in DDP (the multi-GPU path, on one GPU), and a checkpoint
written on CUDA resumed on CUDA and loaded on the CPU. The one-process torchrun on a CPU (gloo) too."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from attention_copy import load_copy_model
from conftest import ROOT, TINY, free_port, read_metrics, relative_distance, run_in_process, run_script, sub_env
import data
import finetune
from util import datafiles
from util.checkpoints import build_from_checkpoint

gpu = pytest.mark.gpu


def launch(script, out_dir, *args, torchrun=True, steps=3):
    """Run a script on fake data (python or 1-process torchrun); asserts success, returns stdout + stderr."""
    launcher = ['-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '1', '--master_addr',
                '127.0.0.1', '--master_port', str(free_port())] if torchrun else []
    env = {**sub_env(), 'TORCH_LOGS': 'recompiles'}      # dynamo says so on stderr if it ever recompiles
    p = subprocess.run([sys.executable, *launcher, script, *TINY, '--out-dir', str(out_dir), '--max-steps',
                        str(steps), '--log-every', '1', *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, f'{script} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}'
    return p.stdout + p.stderr


def test_one_process_torchrun_starts_the_process_group_on_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('on a GPU machine torchrun runs on NCCL (the tests below)')
    log = launch('finetune.py', tmp_path, steps=2)
    assert '1 process(es) on cpu (gloo)' in log and read_metrics(tmp_path)[-1]['step'] == 2


# process 1 stops before it trains (as under SIGSTOP, or a loader stuck on a dead mount); process 0 goes on alone
STOPPED_RANK = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import data, finetune
from util import launch
if os.environ['RANK'] == '1':
    data.build_loader = lambda *args, **kwargs: time.sleep(3600)
launch.run_main(finetune.main)
"""


def test_a_stopped_process_stops_every_process_after_the_timeout(tmp_path):
    """Two processes (gloo), one stuck: the other fails after --dist-timeout, its line naming the process and the
    timeout under its traceback, and torchrun ends them both, where torch's default would wait 30 minutes without a
    word."""
    script = tmp_path / 'stopped_rank.py'
    script.write_text(STOPPED_RANK)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2', '--master_addr',
           '127.0.0.1', '--master_port', str(free_port()), str(script), *TINY, '--out-dir', str(tmp_path / 'run'),
           '--max-steps', '2', '--dist-timeout', '5']
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)     # torchrun and both processes
        out, err = p.communicate()
        pytest.fail(f'still waiting after 150 s:\n{out[-2000:]}\n{err[-3000:]}')
    assert p.returncode != 0 and time.time() - t0 < 150
    said = [line for line in (out + err).splitlines() if line.startswith('error: process 0 of 2: ')]
    assert len(said) == 1 and 'Timed out' in said[0] and '--dist-timeout' in said[0], err[-4000:]
    assert 'Traceback (most recent call last)' in err and 'run the command again' not in said[0], err[-4000:]


def test_a_stop_signal_while_an_error_is_said_does_not_cut_its_line(monkeypatch):
    """Under torchrun, a process killed (kill -9, the OOM killer) makes the others fail on the lost peer, and torchrun
    sends them SIGTERM at once: one that came while the error's line was being made ended the process without it,
    leaving only torchrun's report. The line, with how to continue the run, is said whatever comes then."""
    from util import launch

    def main():
        raise RuntimeError('Connection reset by peer')
    said = launch.unexpected

    def signalled(e):   # torchrun's SIGTERM, as the line is made
        os.kill(os.getpid(), signal.SIGTERM)
        return said(e)
    monkeypatch.setattr(launch, 'unexpected', signalled)
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'a torchrun')
    with pytest.raises((SystemExit, KeyboardInterrupt)) as e:
        launch.run_main(main)
    assert e.type is SystemExit and 'RuntimeError: Connection reset by peer' in e.value.code, e.value


# an error of no kind the project raises, in set-up, before any run log: the lr schedule's check divides by 0
SETUP_FAULT = """
import os, sys
sys.path.insert(0, os.getcwd())
import finetune
from util import launch
def final_lr(cfg, peak):
    return peak / 0
launch.final_lr = final_lr
launch.run_main(finetune.main)
"""


def test_an_unexpected_error_in_set_up_shows_its_traceback(tmp_path):
    """With no run log yet to hold it, its traceback is on the screen, above one line naming the error; nothing about
    continuing (no checkpoint), nothing written."""
    script = tmp_path / 'setup_fault.py'
    script.write_text(SETUP_FAULT)
    out = tmp_path / 'run'
    p = run_script(script, *TINY, '--out-dir', out)
    *traceback, said = p.stderr.splitlines()
    assert p.returncode == 1 and traceback[0] == 'Traceback (most recent call last):', p.stderr[-3000:]
    assert f'File "{script}", line 7, in final_lr' in p.stderr
    assert said == 'error: ZeroDivisionError: float division by zero (its traceback above)', said
    assert not out.exists()


def auto_dtype():
    return 'torch.bfloat16' if torch.cuda.get_device_capability()[0] >= 8 else 'torch.float16'


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp('finetune')
    log = launch('finetune.py', out)
    assert '1 process(es) on cuda:0 (nccl)' in log and f'autocast {auto_dtype()}' in log
    return out / 'checkpoint.pt'


@gpu
@pytest.mark.parametrize('script, args', [
    ('mae_pretrain.py', []),
    ('attention_copy.py', ['--teacher']),
    ('attention_distill.py', ['--teacher', '--layers', '0']),
    ('attention_distill.py', ['--teacher', '--amp', 'fp16', '--accum-steps', '2']),   # GradScaler, DDP no_sync
    ('attention_distill.py', ['--teacher', '--compile', 'true', '--accum-steps', '2', '--drop-path', '0.1']),
    ('attention_copy.py', ['--teacher', '--compile', 'true', '--amp', 'fp16']),
    ('attention_distill.py', ['--teacher', '--attn-implementation', 'eager', '--amp', 'fp16']),   # explicit maps
    ('attention_copy.py', ['--teacher', '--attn-implementation', 'eager'])],
    ids=['mae', 'copy', 'distill', 'distill-fp16-accum', 'distill-compile-ddp', 'copy-compile-fp16', 'distill-eager',
         'copy-eager'])
def test_script_under_torchrun_on_nccl(teacher, tmp_path, script, args):
    args = list(args)
    if '--teacher' in args:
        args.insert(args.index('--teacher') + 1, str(teacher))
    log = launch(script, tmp_path, *args)
    assert '1 process(es) on cuda:0 (nccl)' in log
    assert f"autocast {'torch.float16' if 'fp16' in args else auto_dtype()}" in log
    assert f"attention: {'eager' if 'eager' in args else 'sdpa'} (" in log        # auto: sdpa on CUDA
    assert 'Recompiling function' not in log
    assert read_metrics(tmp_path)[-1]['step'] == 3
    ck = torch.load(tmp_path / 'checkpoint.pt', map_location='cpu', weights_only=True)
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ck['model'])    # the raw student is saved
    assert all(v.isfinite().all() for v in ck['model'].values())
    if 'fp16' in args:
        assert 0 < ck['scaler']['scale'] < float('inf')


@gpu
def test_checkpoint_written_on_cuda_resumes_on_cuda_and_loads_on_cpu(tmp_path, exact_fp32):
    out = tmp_path / 'run'
    launch('finetune.py', out, '--amp', 'fp16', '--ema', '0.9', torchrun=False)
    log = launch('finetune.py', out, '--amp', 'fp16', '--ema', '0.9', '--resume', 'true', torchrun=False, steps=6)
    assert 'resumed from' in log and 'at step 3' in log
    ck = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=True)
    assert ck['step'] == 6 and [m['step'] for m in read_metrics(out)] == [3, 6]
    assert all(t.device.type == 'cpu' for t in ck['model'].values())
    on_cpu = build_from_checkpoint(str(out / 'checkpoint.pt')).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = on_cpu(x)
        # fp32 both, but SDPA on CUDA against explicit attention on the CPU: test_cuda_paths' SDPA tolerance
        assert relative_distance(on_cpu.cuda()(x.cuda()).cpu(), ref) < 1e-4


@gpu
def test_transfer_checkpoints_from_cuda_load_on_cpu(teacher, tmp_path):
    launch('attention_copy.py', tmp_path / 'copy', '--teacher', teacher)
    launch('attention_distill.py', tmp_path / 'distill', '--teacher', teacher)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert load_copy_model(str(tmp_path / 'copy' / 'checkpoint.pt'))(x).shape == (2, 10)
        assert build_from_checkpoint(str(tmp_path / 'distill' / 'checkpoint.pt')).eval()(x).isfinite().all()


def test_a_loader_that_cannot_start_its_workers_stops_before_anything_is_written(tmp_path, monkeypatch, capfd):
    """--num-workers 100 under a container's process limit (here fork is made to fail as the kernel makes it: EAGAIN):
    no check of ours foresees it, so its traceback is shown, with no advice to run the same command again. The
    start-up check takes the run's first evaluation batch, so the loader's workers start before the run directory
    is written: nothing written."""
    def refused():
        raise BlockingIOError(errno.EAGAIN, 'Resource temporarily unavailable')
    monkeypatch.setattr(os, 'fork', refused)
    monkeypatch.setattr(datafiles, 'FAKE_HELD', 0)   # read per image by loader workers, as a folder is
    out = tmp_path / 'r'
    msg = run_in_process(monkeypatch, finetune, *TINY[:-2], '--num-workers', '100', '--out-dir', out)
    assert msg == (f'error: BlockingIOError: [Errno {errno.EAGAIN}] Resource temporarily unavailable (its '
                   f'traceback above); more processes than this machine allows: lower --num-workers'), msg
    err = capfd.readouterr().err
    assert 'Traceback (most recent call last)' in err and 'in refused' in err, err[-3000:]
    assert not out.exists()


# an error of no kind the project raises, planted where a learner's own bug would be: in data.py, or in the step
def planted(*args, **kwargs):
    raise KeyError('oops')


@pytest.mark.parametrize('where', ['data.py', 'the step'])
def test_an_unexpected_error_shows_its_traceback_and_no_advice_to_continue(tmp_path, monkeypatch, capfd, where):
    """A KeyError put into data.py printed one line, `error: KeyError: 'oops' (raised at data.py:228); no checkpoint
    was saved yet: there is nothing to continue; run the command again`: a learner's own bug hidden, with advice that
    would meet it again. Its traceback is on stderr (and in the run's log once there is one); the line after it says
    where, and how to continue only where a checkpoint was saved."""
    out = tmp_path / 'r'
    if where == 'data.py':
        monkeypatch.setattr(data, 'build_splits', planted)
        args = TINY
    else:   # the third step, after the checkpoint of step 2
        steps = []

        def loss(cfg):
            def loss_fn(net, x, y):
                steps.append(1)
                if len(steps) == 3:
                    planted()
                return real(cfg)(net, x, y)
            return loss_fn
        real = finetune.classification_loss
        monkeypatch.setattr(finetune, 'classification_loss', loss)
        args = [*TINY, '--max-steps', '4', '--save-every', '2']
    msg = run_in_process(monkeypatch, finetune, *args, '--out-dir', out)
    err = capfd.readouterr().err
    assert msg.startswith("error: KeyError: 'oops' (its traceback above"), msg
    assert 'Traceback (most recent call last)' in err and 'in planted' in err and "KeyError: 'oops'" in err, err
    assert 'run the command again' not in msg and 'nothing to continue' not in msg, msg
    if where == 'data.py':
        assert 'continue' not in msg and not out.exists(), msg
    else:
        log = (out / 'log.txt').read_text()
        assert f'in {out / "log.txt"} too)' in msg and 'in planted' in log, msg
        assert msg.endswith(f'{out / "checkpoint.pt"} holds the last checkpoint; continue with: python finetune.py '
                            f'{" ".join(map(str, args))} --out-dir {out} --resume true'), msg


@pytest.mark.parametrize('script', ['finetune.py', 'mae_pretrain.py', 'attention_copy.py', 'attention_distill.py',
                                    'ensemble.py', 'evaluate.py'])
def test_ctrl_c_while_torch_is_imported_exits_130_quietly(script, tmp_path):
    """Ctrl-C in a script's first second, while it imports torch, printed a KeyboardInterrupt traceback. A fresh
    interpreter (no fork server), the SIGINT sent once -X importtime says a module of torch has been imported."""
    p = subprocess.Popen([sys.executable, '-X', 'importtime', script, '--out-dir', str(tmp_path / 'r')], cwd=ROOT,
                         env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith('import time:') and line.split('|')[-1].strip().split('.')[0] == 'torch':
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    said = [line for line in lines + err.splitlines(True) if not line.startswith('import time:')]
    assert any('torch' in line for line in lines), 'torch was never imported'
    assert p.returncode == 130 and not ''.join(said).strip(), (p.returncode, ''.join(said)[-2000:])
