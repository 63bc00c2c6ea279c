"""On a cluster (util/stop.py, tools/slurm.sbatch): SIGUSR1 (SLURM's, ahead of a time limit) and SIGTERM (a
preemption's) save the step every process agrees on, not the last periodic checkpoint, and end the run with exit 75 and
one line; the run then goes on to the weights, optimizer state and metrics of an unbroken run, bit for bit. A tiny
distillation on fake data under python, under a two-process torchrun (gloo), and as a SLURM batch job on a one-node
cluster this file sets up and stops (root and slurm-wlm needed: skipped without them, saying why). A SIGTERM ends the
loader's workers with the run."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, free_port, read_metrics, run_script, sub_env

# 512 images, 32 steps an epoch, cut at step 20: every stop below is mid-epoch; a progress line every step (the
# metrics' training losses are then those of the same steps on both sides)
DISTILL = ['attention_distill.py', *TINY, '--fake-size', '512', '--teacher',
           os.path.join(ROOT, 'teachers', 'fashion-mnist-mae.pt'), '--img-size', '28', '--amp', 'off',
           '--log-every', '1', '--max-steps', '20']
ONE = ['--batch-size', '16']    # the global batch of
TWO = ['--batch-size', '8']     # two processes

# attention_distill.py with a signal sent by the process to itself after the N-th step it trains, on one rank, and
# SIGTERM again while its checkpoint is written
SIGNALLED = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
import attention_distill
from util import launch, stop
agreed = stop.Agreement.agreed
steps = []
def signalled(self):
    steps.append(1)
    if len(steps) == {at} and os.environ.get('RANK', '0') == '{rank}':
        os.kill(os.getpid(), signal.{name})
    return agreed(self)
stop.Agreement.agreed = signalled
saving = torch.save
def save(*args, **kwargs):
    if stop.asked:
        os.kill(os.getpid(), signal.SIGTERM)
    return saving(*args, **kwargs)
torch.save = save
try:
    launch.run_main(attention_distill.main)
except SystemExit as e:   # the status this process exits with, beside this file (RANK 0's, 1's)
    with open(f"{{__file__}}.exit-{{os.environ.get('RANK', '0')}}", 'w') as f:
        f.write(str(e.code))
    raise
"""


def signalled(tmp_path, name, at, rank=0):
    """A script that runs attention_distill.py and sends itself `name` after its `at`-th step (on process `rank`)."""
    path = tmp_path / f'{name}-{at}-{rank}.py'
    path.write_text(SIGNALLED.format(root=ROOT, name=name, at=at, rank=rank))
    return str(path)


def torchrun(*args):
    return [sys.executable, '-m', 'torch.distributed.run', '--nnodes', '1', '--nproc_per_node', '2', '--master_addr',
            '127.0.0.1', '--master_port', str(free_port()), *args]


def checked(p, code=0):
    assert p.returncode == code, f'exit {p.returncode}, not {code}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


@pytest.fixture(scope='module')
def unbroken(tmp_path_factory):
    """The unbroken run for one process (python) or two (torchrun), made once."""
    runs = {}

    def get(processes):
        if processes not in runs:
            out = tmp_path_factory.mktemp('unbroken') / str(processes)
            if processes == 1:
                checked(run_script(*DISTILL, *ONE, '--out-dir', out))
            else:
                checked(subprocess.run(torchrun(*DISTILL, *TWO, '--out-dir', str(out)), cwd=ROOT, env=sub_env(),
                                       capture_output=True, text=True, timeout=300))
            runs[processes] = out
        return runs[processes]
    return get


def step_of(out):
    return torch.load(out / 'checkpoint.pt', weights_only=True)['step']


def saved_line(out):
    """log.txt's last line, where a run that saved at a signal says so; (its step, the signal)."""
    last = (out / 'log.txt').read_text().strip().splitlines()[-1]
    m = re.match(r'saved at step (\d+) of 20 and stopped \((SIG\w+)\): .* holds the last checkpoint; continue with: ',
                 last)
    assert m, last
    return int(m.group(1)), m.group(2)


def tensors(state, prefix=''):
    """{dotted key: tensor} of every tensor in a nested checkpoint value."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in tensors(value, f'{prefix}{key}.').items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in tensors(value, f'{prefix}{i}.').items()}
    return {prefix: state} if torch.is_tensor(state) else {}


def assert_same_run(a, b):
    """The final checkpoints' weights, EMA and optimizer state (its steps too) equal bit for bit, and the last
    metrics record (training losses, evaluation) but for the seconds it took."""
    ca, cb = (torch.load(d / 'checkpoint.pt', weights_only=True) for d in (a, b))
    assert ca['step'] == cb['step'] == 20
    ta, tb = (tensors({k: ck[k] for k in ('model', 'ema', 'optimizer')}) for ck in (ca, cb))
    assert ta.keys() == tb.keys() and any(k.startswith('optimizer.state.') for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f'{len(differ)} tensors differ from the unbroken run, e.g. {differ[:3]}'
    ma, mb = ({k: v for k, v in read_metrics(d)[-1].items() if k != 'time'} for d in (a, b))
    assert ma == mb and ma['step'] == 20

# -----------------------------------------------------------------------------
# Without a scheduler


def test_a_signal_saves_the_step_reached_and_the_run_goes_on_bit_for_bit(unbroken, tmp_path):
    """python attention_distill.py: SIGUSR1 after step 3, then, resumed, SIGTERM after step 7 (checkpoints only at
    an epoch's end: neither step had one), each time SIGTERM again while the checkpoint is written: each saves its
    step, exits 75 with one line, and the run goes on to the unbroken run's end."""
    out = tmp_path / 'run'
    p = checked(run_script(signalled(tmp_path, 'SIGUSR1', 3), *DISTILL[1:], *ONE, '--out-dir', out),
                75)
    assert step_of(out) == 3 and saved_line(out) == (3, 'SIGUSR1')
    assert p.stdout.strip().splitlines()[-1] == (out / 'log.txt').read_text().strip().splitlines()[-1]
    assert '--resume true' in p.stdout.strip().splitlines()[-1] and not p.stderr.strip(), p.stderr[-2000:]
    checked(run_script(signalled(tmp_path, 'SIGTERM', 4), *DISTILL[1:], *ONE, '--out-dir', out, '--resume',
                       'true'), 75)
    assert step_of(out) == 7 and saved_line(out) == (7, 'SIGTERM')
    checked(run_script(*DISTILL, *ONE, '--out-dir', out, '--resume', 'true'))
    assert_same_run(out, unbroken(1))


def test_two_processes_stop_at_one_step_and_go_on_bit_for_bit(unbroken, tmp_path):
    """torchrun, two processes: SIGUSR1 to process 1 alone after its step 3 stops both after step 4 (the processes
    agree one step later, util/stop.py), each exiting 75; then SIGTERM to torchrun (which passes it to both) once
    step 8 is logged saves the step they reach; the run then goes on to the unbroken run's end."""
    out, script = tmp_path / 'run', signalled(tmp_path, 'SIGUSR1', 3, rank=1)
    p = subprocess.run(torchrun(script, *DISTILL[1:], *TWO, '--out-dir', str(out)), cwd=ROOT, env=sub_env(),
                       capture_output=True, text=True, timeout=300)
    assert step_of(out) == 4 and saved_line(out) == (4, 'SIGUSR1'), p.stderr[-3000:]
    # each process's own status (torchrun's report names every process's exit only from torch 2.10)
    ended = [Path(f'{script}.exit-{rank}').read_text() if Path(f'{script}.exit-{rank}').exists() else None
             for rank in (0, 1)]
    assert ended == ['75', '75'], (ended, p.stderr[-3000:])

    p = subprocess.Popen(torchrun(*DISTILL, *TWO, '--out-dir', str(out), '--resume', 'true'), cwd=ROOT,
                         env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if 'step 8/20' in line:
                p.send_signal(signal.SIGTERM)
                break
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    at, name = saved_line(out)
    assert name == 'SIGTERM' and 8 < at < 20 and step_of(out) == at
    checked(subprocess.run(torchrun(*DISTILL, *TWO, '--out-dir', str(out), '--resume', 'true'), cwd=ROOT,
                           env=sub_env(), capture_output=True, text=True, timeout=300))
    assert_same_run(out, unbroken(2))

def test_on_a_gpu_the_agreement_never_waits_for_the_step_it_follows(monkeypatch):
    """util/stop.Agreement's CUDA branch, on the stand-in device, as two processes would run it: each step's
    reduction is queued on the device and copied to pinned host memory without blocking, behind an event; the host
    reads the step before's, whose event it waits for, and never syncs with the device (a sync fails strict()). The
    numbers are the gloo runs' to check (above): the stand-in has none."""
    from types import SimpleNamespace
    import torch.distributed as dist
    from standin_cuda import Event, on_device, standin_cuda
    from util import stop
    reduced = []

    def all_reduce(t, op=None):
        reduced.append((t, op))
    monkeypatch.setattr(dist, 'all_reduce', all_reduce)
    with standin_cuda() as cuda:
        events = []
        cuda.patch(torch.cuda, 'Event', lambda: events.append(Event()) or events[-1])
        agreement = stop.Agreement(SimpleNamespace(world=2, device=torch.device('cuda')))
        with cuda.strict():
            said = [agreement.agreed() for _ in range(4)]
    assert said[0] == 0 and all(type(v) is int for v in said), said   # step 1: nothing to read yet
    assert len(reduced) == 4 and all(on_device(t) and t.dtype == torch.int32 and op == dist.ReduceOp.MAX
                                     for t, op in reduced)
    # each step waits for the step before's copy, never its own: the last one's is still unread
    assert [e.waited for e in events] == [True, True, True, False] and all(e.recorded for e in events)
    value, event = agreement.last
    assert value.device.type == 'cpu' and event is events[-1]


@pytest.mark.gpu
def test_on_a_gpu_each_step_reads_the_reduction_of_the_step_before(monkeypatch):
    """The same branch on a real GPU (tools/gpu_check.sh runs the gpu tests), the other process stood in for by the
    reduction (what it asked at each step): step k says what all asked at step k - 1, from pinned memory its event
    says is there, with no host sync that torch's sync debug mode sees."""
    from types import SimpleNamespace
    import torch.distributed as dist
    from util import stop
    asked = iter([0, 15, 0, 10])
    monkeypatch.setattr(dist, 'all_reduce', lambda t, op=None: t.fill_(next(asked)))
    agreement = stop.Agreement(SimpleNamespace(world=2, device=torch.device('cuda')))
    torch.cuda.set_sync_debug_mode('error')
    try:
        said = [agreement.agreed() for _ in range(4)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert said == [0, 0, 15, 0], said
    value, event = agreement.last
    event.synchronize()
    assert value.is_pinned() and int(value.item()) == 10


# -----------------------------------------------------------------------------
# The batch script's choice, with SLURM's commands stood in for: by what the run says as it ends (ended.json)


# srun runs the run: here it writes $ENDED as the run's ended.json (if set), signals the batch shell first where
# $SIGNAL says (a signal while the run starts), and exits $EXIT; scontrol names the job's nodes
STAND_INS = {
    'srun': 'echo "srun $*" >> "$CALLS"; echo "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" '
            '>> "$CALLS"; mkdir -p "$OUT"; if [ -n "$SIGNAL" ]; then kill -USR1 "$PPID"; sleep 1; fi; '
            'if [ -n "$ENDED" ]; then printf %s "$ENDED" > "$OUT/ended.json"; fi; exit "$EXIT"',
    'scontrol': 'echo "scontrol $*" >> "$CALLS"; if [ "$1" = show ]; then printf "node1\\nnode2\\n"; fi',
    'scancel': 'echo "scancel $*" >> "$CALLS"',
}
SAVED = '{"ended": "saved", "step": 5}'


@pytest.mark.parametrize('before, ended, exit, signal_, restart, requeued, says', [
    ('', SAVED, 1, '', '0', True, 'saved at step 5; requeued (1 of at most 20)'),
    ('', SAVED, 1, '', '20', False, 'not requeued: it was requeued 20 times (MAX_REQUEUES)'),
    ('', '{"ended": "failed", "step": null}', 1, '', '0', False, "the run failed (failed; srun's exit 1)"),
    (SAVED, '', 1, '', '1', False, "the run failed (it said nothing; srun's exit 1): not requeued"),
    (SAVED, '{"ended": "finished", "step": 20}', 0, '', '1', False, 'the run finished'),
    # a signal while the run starts, before it could say anything: exit 143, requeued
    ('', '', 143, 'yes', '0', True, 'signalled, and the run said nothing; requeued (1 of at most 20)'),
    ('', '{"ended": "stopped before training", "step": null}', 143, '', '0', True, 'stopped before training; requeued'),
    # its node marked DOWN: srun exited 0 though the run saved, and is not taken for finished
    ('', '{"ended": "saved", "step": 36}', 0, '', '0', True, 'saved at step 36; requeued'),
], ids=['saved', 'requeued-enough', 'failed', 'an-earlier-start-saved', 'finished', 'signalled-while-starting',
        'stopped-before-training', 'srun-exit-0-but-saved'])
def test_the_batch_script_decides_by_what_the_run_says_it_did(tmp_path, before, ended, exit, signal_, restart,
                                                              requeued, says):
    """tools/slurm.sbatch reads the run's ended.json, which it removes before each start (an earlier start's word is
    not this one's), whatever srun's exit: requeued where it saved or was stopped before training (or said nothing
    after this shell passed a signal on), ended where it finished, failed otherwise. torchrun is given the signal's
    margin, less a minute, to let its processes save."""
    bin_dir, out = tmp_path / 'bin', tmp_path / 'run'
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text(f'#!/bin/bash\n{body}\n')
        (bin_dir / name).chmod(0o755)
    if before:   # an earlier start of the job
        out.mkdir()
        (out / 'ended.json').write_text(before)
        (out / 'checkpoint.pt').write_bytes(b'')
    calls = tmp_path / 'calls'
    env = {**sub_env(), 'PATH': f"{bin_dir}:{os.environ['PATH']}", 'CALLS': str(calls), 'OUT': str(out),
           'ENDED': ended, 'EXIT': str(exit), 'SIGNAL': signal_, 'SLURM_JOB_ID': '7', 'SLURM_JOB_NODELIST': 'node[1-2]',
           'SLURM_JOB_NUM_NODES': '2', 'SLURM_RESTART_COUNT': restart}
    p = subprocess.run(['bash', os.path.join(ROOT, 'tools', 'slurm.sbatch'), str(out), 'attention_distill.py',
                        '--data', 'fake'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    ran = calls.read_text().splitlines()
    srun = next(c for c in ran if c.startswith('srun '))
    assert '--nnodes 2' in srun and '--rdzv_endpoint node1:29500' in srun and '--rdzv_id 7' in srun, srun
    assert srun.endswith(f'attention_distill.py --data fake --out-dir {out}' + ' --resume true' * bool(before))
    assert 'TORCH_ELASTIC_SHUTDOWN_TIMEOUT=240' in ran
    assert ('scontrol requeue 7' in ran) == requeued, ran
    assert ('scancel --signal=TERM 7' in ran) == bool(signal_), ran
    assert 'job 7: ' in p.stdout and says in p.stdout, p.stdout + p.stderr
    assert p.returncode == (0 if requeued or exit == 0 else exit), p.stdout + p.stderr


def test_a_run_says_how_it_ended(unbroken, tmp_path):
    """ended.json, the main process's word as the run ends: finished at its last step, saved at a signal (its step),
    failed; none where no run began (a refusal leaves no file)."""
    import json
    said = lambda d: json.loads((d / 'ended.json').read_text())   # noqa: E731
    assert said(unbroken(1)) == {'ended': 'finished', 'step': None}
    out = tmp_path / 'run'
    checked(run_script(signalled(tmp_path, 'SIGUSR1', 3), *DISTILL[1:], *ONE, '--out-dir', out), 75)
    assert said(out) == {'ended': 'saved', 'step': 3}
    refused = tmp_path / 'refused'
    p = run_script(*DISTILL, *ONE, '--out-dir', refused, '--teacher', tmp_path / 'no-such-teacher.pt')
    assert p.returncode == 1 and not refused.exists()


# -----------------------------------------------------------------------------
# A SLURM cluster of one node: this machine


SLURM_CONF = """ClusterName=tests
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={d}/munge/socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=tests Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def slurm_missing():
    """Why SLURM cannot be set up here, or ''."""
    if os.geteuid() != 0:
        return 'SLURM daemons are started as root: run as root (CI does)'
    missing = [b for b in ('munged', 'slurmctld', 'slurmd', 'sbatch', 'scontrol', 'scancel', 'squeue')
               if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} not found: apt-get install slurm-wlm (.ci/run does)"
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError:
        return f'this machine\'s name {socket.gethostname()} does not resolve (the rendezvous is on it)'
    return ''


@pytest.fixture(scope='module')
def slurm(tmp_path_factory):
    """munged, slurmctld and slurmd on this machine, configured in a temporary folder; the environment that talks
    to them (SLURM_CONF), with the test's Python first on PATH. Stopped after the module, by their pids."""
    why = slurm_missing()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp('slurm')
    for sub in ('munge', 'state', 'spool'):
        (d / sub).mkdir(mode=0o700)
    key = d / 'munge' / 'munge.key'
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split('.')[0]
    conf = d / 'slurm.conf'
    conf.write_text(SLURM_CONF.format(host=host, d=d, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count()))
    env = {**sub_env(), 'SLURM_CONF': str(conf), 'PATH': f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    pids = []
    try:
        for cmd, pid in [(['munged', '--force', f'--socket={d}/munge/socket', f'--key-file={key}',
                           f'--pid-file={d}/munge/pid', f'--log-file={d}/munge/log', f'--seed-file={d}/munge/seed'],
                          d / 'munge' / 'pid'),
                         (['slurmctld', '-i'], d / 'slurmctld.pid'), (['slurmd', '-N', host], d / 'slurmd.pid')]:
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=30)
            # a daemon writes its pid file once it has started; on a loaded machine (`-n 2`) that takes seconds
            if not wait_for(lambda: pid.exists() and pid.read_text().strip().isdigit(), 60):
                pytest.fail(f'{cmd[0]} wrote no pid:\n{logs(d)}')
            pids.append(int(pid.read_text()))
        up = lambda: 'idle' in output(['sinfo', '-h', '-o', '%t'], env)   # noqa: E731
        if not wait_for(up, 90):
            pytest.fail(f'the node never came up:\n{logs(d)}')
        yield env
    finally:
        subprocess.run(['scancel', '--user', 'root'], env=env, capture_output=True, timeout=30)
        for pid in reversed(pids):   # slurmd, slurmctld, munged
            os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not alive(pid), 30)


def logs(d):
    """The end of each daemon's log in d, for a set-up that failed."""
    paths = [d / 'munge' / 'log', d / 'slurmctld.log', d / 'slurmd.log']
    return '\n'.join(f'{p.name}: {p.read_text()[-1500:] if p.exists() else "(none)"}' for p in paths)


def alive(pid):
    """Whether process pid runs (a zombie, ended but not yet waited for, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f'/proc/{pid}/stat') as f:
        return f.read().split()[2] != 'Z'


def wait_for(condition, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def output(cmd, env):
    """What a SLURM command prints, run from the repository's root (a batch job starts where it was sent from)."""
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30).stdout.strip()


def job(env, job_id):
    """{field: value} of `scontrol show job` (JobState, Restarts, ...)."""
    shown = output(['scontrol', 'show', 'job', job_id], env)
    return dict(re.findall(r'(\w+)=(\S*)', shown))


def state(env, job_id):
    """(JobState, Restarts) of a job."""
    shown = job(env, job_id)
    return shown.get('JobState'), shown.get('Restarts')


def sbatch(env, out, *args, **more_env):
    return output(['sbatch', '--parsable', '-o', f'{out}.out', os.path.join('tools', 'slurm.sbatch'), str(out),
                        *map(str, args)], {**env, 'NPROC_PER_NODE': '2', 'RDZV_PORT': str(free_port()), **more_env})


def test_a_slurm_job_saves_at_its_signal_requeues_itself_and_goes_on_bit_for_bit(slurm, unbroken, tmp_path):
    """tools/slurm.sbatch on one node, two processes: SIGUSR1 to the batch shell once step 3 is logged (as SLURM's
    --signal=B:USR1 sends it) saves the step reached; the job requeues itself (SLURM holds a requeued job two
    minutes before it may start again: the test lets it start at once), resumes and finishes as the unbroken run
    did, bit for bit, its log telling the restart. A run that fails otherwise is not requeued."""
    out = tmp_path / 'run'
    job_id = sbatch(slurm, out, *DISTILL, *TWO)
    assert job_id.isdigit(), job_id
    log = out / 'log.txt'
    assert wait_for(lambda: log.exists() and 'step 3/20' in log.read_text(), 120), \
        f'the job never trained: {job(slurm, job_id)}'
    subprocess.run(['scancel', '--signal=USR1', '--batch', job_id], env=slurm, check=True, timeout=30)
    requeued = lambda: state(slurm, job_id) == ('PENDING', '1')   # noqa: E731
    assert wait_for(requeued, 120), state(slurm, job_id)
    at, name = saved_line(out)
    assert name == 'SIGTERM' and 3 < at < 20 and step_of(out) == at      # the shell passes SIGUSR1 on as SIGTERM
    # slurmd refuses a start within the second the requeue revoked the job's credential ('Job credential revoked'),
    # which SLURM's own hold of a requeued job never meets
    time.sleep(2)
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'StartTime=now'], env=slurm, check=True, timeout=30)
    assert wait_for(lambda: state(slurm, job_id) == ('COMPLETED', '1'), 180), state(slurm, job_id)
    said = (tmp_path / 'run.out').read_text()
    assert f'job {job_id}: saved at step {at}; requeued (1 of at most 20)' in said, said[-3000:]
    assert f'job {job_id}, restart 1 ' in said and f'job {job_id}: the run finished' in said, said[-3000:]
    assert f'resumed from {out / "checkpoint.pt"} at step {at} (SLURM job {job_id}, restart 1)' in log.read_text()
    assert_same_run(out, unbroken(2))

    failed = tmp_path / 'failed'
    job_id = sbatch(slurm, failed, *DISTILL, *TWO, '--teacher', tmp_path / 'no-such-teacher.pt')
    assert wait_for(lambda: state(slurm, job_id) == ('FAILED', '0'), 120), state(slurm, job_id)
    said = (tmp_path / 'failed.out').read_text()   # refused before it began: no ended.json
    assert f"job {job_id}: the run failed (it said nothing; srun's exit 1): not requeued" in said, said


# attention_distill.py as each start of one SLURM job meets it (SLURM_RESTART_COUNT): 0, signalled while it starts
# (before torch is imported); 1, killed as it saves at a signal (no checkpoint, no word: a node lost mid-save); 2, a
# save slower than torchrun's own 30-second wait; 3 and on, as it is
ATTEMPTS = """
import os, pathlib, signal, sys, time
restart = int(os.environ.get('SLURM_RESTART_COUNT', '0'))
pathlib.Path({marks!r}, f"started-{{restart}}-{{os.environ.get('RANK', '0')}}").touch()
if restart == 0:
    time.sleep(600)
sys.path.insert(0, {root!r})
import torch
import attention_distill
from util import launch, stop
saving = torch.save
def save(*args, **kwargs):
    if stop.asked and restart == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if stop.asked and restart == 2:
        time.sleep({save_s})
    return saving(*args, **kwargs)
torch.save = save
launch.run_main(attention_distill.main)
"""


def started(marks, restart):
    """Whether both processes of start `restart` of the job have begun (ATTEMPTS marks it)."""
    return all((marks / f'started-{restart}-{rank}').exists() for rank in (0, 1))


def let_start(env, job_id):
    """Start a requeued job at once: SLURM holds one two minutes. slurmd refuses a start within the second the requeue
    revoked the job's credential ('Job credential revoked'), which SLURM's own hold never meets."""
    time.sleep(2)
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'StartTime=now'], env=env, check=True, timeout=30)


def test_a_slurm_job_goes_on_whatever_each_start_met(slurm, unbroken, tmp_path):
    """One job, four starts. Signalled while the run starts (exit 143, no line, no word): requeued, not failed. Killed
    as it saves: nothing saved, no word after the signal: requeued. Started afresh, so its log.txt is written anew,
    shorter than the last one, then signalled at step 3 with a save of 45 s: saved (torchrun waits the margin, not
    30 s), requeued. Then resumed to the end: the unbroken run's weights and metrics, bit for bit. Before torch 2.12
    torchrun waits 30 s whatever it is told: there the save takes 5 s, and the job's output says so."""
    marks, out = tmp_path / 'marks', tmp_path / 'run'
    marks.mkdir()
    attempts = tmp_path / 'attempts.py'
    waits = torch.__version__ >= '2.12'   # torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT
    attempts.write_text(ATTEMPTS.format(root=ROOT, marks=str(marks), save_s=45 if waits else 5))
    job_id = sbatch(slurm, out, attempts, *DISTILL[1:], *TWO)
    assert job_id.isdigit(), job_id
    log, said = out / 'log.txt', tmp_path / 'run.out'

    def signal_at(restart, condition, what):
        assert wait_for(condition, 120), f'{what}: {job(slurm, job_id)}'
        subprocess.run(['scancel', '--signal=USR1', '--batch', job_id], env=slurm, check=True, timeout=30)
        assert wait_for(lambda: state(slurm, job_id) == ('PENDING', str(restart + 1)), 180), state(slurm, job_id)
        let_start(slurm, job_id)

    signal_at(0, lambda: started(marks, 0), 'the first start never began')
    assert not out.exists()                                            # it never claimed its directory
    signal_at(1, lambda: started(marks, 1) and log.exists() and 'step 8/20' in log.read_text(),
              'the second start never trained')
    assert not (out / 'checkpoint.pt').exists()                        # killed as it saved
    signal_at(2, lambda: started(marks, 2) and 'step 3/20' in log.read_text() and 'step 8/20' not in log.read_text(),
              'the third start never trained afresh')
    at, name = saved_line(out)
    assert name == 'SIGTERM' and 3 <= at < 20, (at, name)
    assert wait_for(lambda: state(slurm, job_id) == ('COMPLETED', '3'), 180), state(slurm, job_id)
    text = said.read_text()
    for line in (f'job {job_id}: signalled, and the run said nothing; requeued (1 of at most 20)',
                 f'job {job_id}: signalled, and the run said nothing; requeued (2 of at most 20)',
                 f'job {job_id}: saved at step {at}; requeued (3 of at most 20)',
                 f'job {job_id}: the run finished'):
        assert line in text, text[-4000:]
    assert waits != ('its torchrun kills the processes 30 s after passing a signal on' in text), text[-4000:]
    assert f'resumed from {out / "checkpoint.pt"} at step {at} (SLURM job {job_id}, restart 3)' in log.read_text()
    assert_same_run(out, unbroken(2))


def test_a_slurm_job_whose_node_goes_down_saves_and_goes_on(slurm, unbroken, tmp_path):
    """Its node marked DOWN mid-run: SLURM cancels the job (SIGTERM to every process, the batch shell's included) and
    requeues it by itself; the run saves the step it reached, and nothing takes it for finished. With the node back,
    the job resumes from that step and ends as the unbroken run, bit for bit."""
    out, host = tmp_path / 'run', socket.gethostname().split('.')[0]
    job_id = sbatch(slurm, out, *DISTILL, *TWO)
    log, ended = out / 'log.txt', out / 'ended.json'
    assert wait_for(lambda: log.exists() and 'step 3/20' in log.read_text(), 120), job(slurm, job_id)
    subprocess.run(['scontrol', 'update', f'NodeName={host}', 'State=DOWN', 'Reason=tests'], env=slurm, check=True,
                   timeout=30)
    assert wait_for(lambda: ended.exists() and state(slurm, job_id) == ('PENDING', '1'), 180), job(slurm, job_id)
    at, name = saved_line(out)
    assert name == 'SIGTERM' and 3 <= at < 20 and step_of(out) == at, (at, name)
    assert ended.read_text() == f'{{"ended": "saved", "step": {at}}}'
    if 'down' in output(['sinfo', '-h', '-o', '%t'], slurm):   # SLURM may have taken the node back already
        subprocess.run(['scontrol', 'update', f'NodeName={host}', 'State=RESUME'], env=slurm, check=True, timeout=30)
    assert wait_for(lambda: 'idle' in output(['sinfo', '-h', '-o', '%t'], slurm), 90)
    # the cancelled start's batch shell may still wait for the run's word (SLURM kills it KillWait after its
    # SIGTERM): a start before it ended would fail to launch (SLURM's own two-minute hold never meets it)
    gone = lambda: subprocess.run(['pgrep', '-f', str(out)], capture_output=True).returncode == 1   # noqa: E731
    assert wait_for(gone, 120), output(['pgrep', '-af', str(out)], slurm)
    let_start(slurm, job_id)
    assert wait_for(lambda: state(slurm, job_id)[0] == 'COMPLETED', 180), job(slurm, job_id)
    text = (tmp_path / 'run.out').read_text()
    first = text[:text.index(f'job {job_id}, restart 1 ')]   # the start the node went down under
    assert 'the run finished' not in first and 'failed' not in first, first[-3000:]
    assert text.count(f'job {job_id}: the run finished') == 1 and text.rstrip().endswith('the run finished'), \
        text[-4000:]
    assert f'resumed from {out / "checkpoint.pt"} at step {at} (SLURM job {job_id}, restart 1)' in log.read_text()
    assert_same_run(out, unbroken(2))


def children(pid):
    out = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


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
