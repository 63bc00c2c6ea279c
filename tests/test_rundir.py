"""The run directory under faults (util/rundir.py): which script made it, one process writing it at a time, files
written whole (a full disk leaves the old ones as they were), a finished run never written over unless asked,
a resume that keeps the metrics it continues, and Ctrl-C ending in one line that says how to continue.
Most scripts run in this process (run_in_process); a fault that needs a process of its own gets one."""
import contextlib
import errno
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import attention_copy
import attention_distill
from conftest import ROOT, TINY, assert_one_line_error, digest, read_metrics, run_in_process, run_script, sub_env
from conftest import finetune as finetune_tiny
import finetune
from test_resume import train
from util.errors import WriteError
from util.launch import run_main
import util.rundir



def step_of(d):
    return torch.load(d / 'checkpoint.pt', weights_only=True)['step']


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A tiny run stopped after 2 of its 8 steps (one evaluation), and a fresh copy of it per test."""
    d = tmp_path_factory.mktemp('rundir') / 'run'
    with pytest.MonkeyPatch.context() as mp:
        train(mp, finetune, d, '--max-steps', '2')

    def copy(tmp_path):
        shutil.copytree(d, tmp_path / 'run')
        return tmp_path / 'run'
    return copy


def start(out, *args, **popen):
    """finetune.py in a process of its own, tiny and long (20 epochs of 32 steps), a checkpoint every step."""
    return subprocess.Popen([sys.executable, 'finetune.py', *TINY, '--out-dir', str(out), '--fake-size', '1024',
                             '--epochs', '20', '--save-every', '1', '--log-every', '1', *map(str, args)],
                            cwd=ROOT, env=sub_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            **popen)


def wait_for_checkpoint(p, out, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if (out / 'checkpoint.pt').exists():
            return
        time.sleep(0.05)
    p.kill()
    pytest.fail(f'no checkpoint appeared: {p.communicate()[1][-3000:]}')

# -----------------------------------------------------------------------------
# Which script made the run


def test_a_run_is_resumed_only_by_the_script_that_made_it(monkeypatch, tmp_path):
    """distill on a fine-tuning run would add an attention loss; fine-tuning a distillation run would drop its
    teacher record: both refused in one line, nothing written. A checkpoint that does not name its script (as
    saved before checkpoints named it) is refused."""
    ft, distill = tmp_path / 'ft', tmp_path / 'distill'
    train(monkeypatch, finetune, ft, '--max-steps', '1')
    teacher = shutil.copy(ft / 'checkpoint.pt', tmp_path / 'teacher.pt')   # a file of its own: ft's changes below
    train(monkeypatch, attention_distill, distill, '--teacher', teacher, '--max-steps', '1')
    made = json.loads((distill / 'config.json').read_text())
    assert made['script'] == 'attention_distill.py'
    assert made['teacher_sha256'] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert json.loads((ft / 'config.json').read_text())['script'] == 'finetune.py'
    tries = [(attention_distill, ft, ['--teacher', teacher], 'finetune.py'),
             (attention_copy, distill, ['--teacher', teacher], 'attention_distill.py'),
             (finetune, distill, [], 'attention_distill.py')]
    for old_format in (False, True):
        for module, d, args, maker in tries:
            if old_format:   # as saved before checkpoints named their script
                ck = torch.load(d / 'checkpoint.pt', weights_only=True)
                ck.pop('script', None)
                torch.save(ck, d / 'checkpoint.pt')
            before = digest(d)
            msg = run_in_process(monkeypatch, module, *TINY, '--out-dir', d, '--resume', 'true', '--max-steps', '2',
                                 *args)
            said = 'script: missing' if old_format else f'was saved by {maker}, not {module.__name__}.py'
            assert msg and said in msg, msg
            assert digest(d) == before

# -----------------------------------------------------------------------------
# One process at a time


def test_a_second_process_is_refused_and_a_killed_one_never_blocks(monkeypatch, tmp_path):
    out = tmp_path / 'run'
    big = ('--fake-size', '2048', '--img-size', '128')   # too large to hold in memory: read by loader workers
    p = start(out, *big, '--num-workers', '2')
    workers = []
    try:
        wait_for_checkpoint(p, out)
        before = (out / 'config.json').read_bytes()
        msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', out, '--max-steps', '1', '--overwrite', 'true')
        assert msg and f'--out-dir {out} is being written by process {p.pid}' in msg, msg
        msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', out, *big, '--epochs', '20',
                             '--resume', 'true')
        assert msg and f'being written by process {p.pid}' in msg, msg
        assert p.poll() is None and (out / 'config.json').read_bytes() == before
        # its data-loading workers outlive a kill -9 by seconds: stopped, they outlive it for as long as we like
        workers = [int(c) for c in Path(f'/proc/{p.pid}/task/{p.pid}/children').read_text().split()]
        assert workers, 'no loader worker to keep alive'
        for w in workers:
            os.kill(w, signal.SIGSTOP)
    finally:
        p.kill()
        p.wait()
    try:
        assert all(Path(f'/proc/{w}').exists() for w in workers)
        assert (out / '.lock').exists()       # left by the killed process, its lock gone with it (not its workers')
        at = step_of(out)
        train(monkeypatch, finetune, out, *big, '--epochs', '20', '--resume', 'true', '--max-steps', at + 1)
        assert step_of(out) == at + 1 and not (out / '.lock').exists()   # removed by the process that held it
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)



def claim_under_torchrun(rank, port, folders, said):
    """One of two gloo processes claiming each of `folders` (util.launch.claimed), as torchrun's processes do at the
    same moment: rank 0 signs each .lock it makes only 2 s after making it, rank 1 claims 0.5 s after the group is up.
    Writes what this rank ended with (claimed, or its refusal's line) to said/<folder>-<rank>."""
    import datetime
    import torch.distributed as dist
    from util.errors import ConfigError
    from util.launch import claimed
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    sign = util.rundir.RunDir.sign_lock
    if rank == 0:
        util.rundir.RunDir.sign_lock = lambda self: (time.sleep(2), sign(self))
    for folder in folders:
        dist.barrier()
        if rank == 1:
            time.sleep(0.5)
        cfg = SimpleNamespace(out_dir=folder, resume=False, overwrite=False, INPUTS=())
        try:
            claimed(cfg, rank).release()
            ended = 'claimed'
        except ConfigError as e:
            ended = str(e)
        Path(said, f'{Path(folder).name}-{rank}').write_text(ended)
    dist.destroy_process_group()


def test_under_torchrun_the_main_process_claims_the_folder_and_the_others_take_its_verdict(tmp_path):
    """Under torchrun every process checked the folder by itself: one that looked while rank 0 had made .lock but
    not yet signed it took the empty .lock for another program's and refused a new run ("not empty and holds no
    run"), under load now and then. Rank 0 alone claims it; the others end as it does: claimed, or its line."""
    import torch.multiprocessing as mp
    from conftest import free_port
    new, theirs, said = tmp_path / 'new', tmp_path / 'theirs', tmp_path / 'said'
    theirs.mkdir()
    (theirs / 'notes.txt').write_text('mine\n')
    said.mkdir()
    mp.spawn(claim_under_torchrun, (free_port(), [str(new), str(theirs)], str(said)), nprocs=2, join=True)
    assert [(said / f'new-{rank}').read_text() for rank in (0, 1)] == ['claimed', 'claimed']
    refusal = f'--out-dir {theirs} is not empty and holds no run of these scripts'
    ended = [(said / f'theirs-{rank}').read_text() for rank in (0, 1)]
    assert ended[0] == ended[1] and ended[0].startswith(refusal), ended
    assert os.listdir(theirs) == ['notes.txt'] and not new.exists()


def test_a_live_run_s_files_are_refused_as_an_output_whatever_overwrite_says(monkeypatch, tmp_path):
    """ensemble.py --out <a run>/config.json --overwrite true replaced the file while the run trained (exit 0): a run
    folder's files are its own, never another command's output, whatever --overwrite says (no lock probed)."""
    import ensemble
    out = tmp_path / 'run'
    p = start(out)
    try:
        wait_for_checkpoint(p, out)
        model = shutil.copy(out / 'checkpoint.pt', tmp_path / 'model.pt')
        config = (out / 'config.json').read_bytes()
        msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', model, '--out', out / 'config.json',
                             '--overwrite', 'true')
        assert msg and f'--out {out / "config.json"} is a file of the run in {out}' in msg, msg
        assert p.poll() is None and (out / 'config.json').read_bytes() == config
    finally:
        p.kill()
        p.wait()


def test_a_refused_command_leaves_another_programs_lock_as_it_was(monkeypatch, tmp_path):
    """finetune.py pointed at another program's folder holding its own .lock was refused ("not empty and holds no
    run") and on its way out deleted that .lock: it took the lock before it refused, and removed .lock when it let
    go. A lone .lock of another program's is its file too, never written over; a run's own .lock still goes."""
    theirs = tmp_path / 'theirs'
    theirs.mkdir()
    (theirs / '.lock').write_text('pid 4242 of my sync tool\n')
    (theirs / 'data.bin').write_text('mine\n')
    for files in (['.lock', 'data.bin'], ['.lock']):
        for name in set(os.listdir(theirs)) - set(files):
            os.remove(theirs / name)
        before = digest(theirs)
        msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', theirs, '--max-steps', '1')
        assert msg and f'--out-dir {theirs} is not empty and holds no run of these scripts' in msg, msg
        assert digest(theirs) == before
    ours = tmp_path / 'ours'
    train(monkeypatch, finetune, ours, '--max-steps', '1')
    assert sorted(os.listdir(ours)) == ['checkpoint.pt', 'config.json', 'ended.json', 'log.txt', 'metrics.jsonl']


@pytest.mark.skipif(shutil.which('flock') is None, reason='no flock(1) here')
def test_flocks_empty_lock_file_is_not_taken_for_a_runs(tmp_path):
    """`flock DIR/.lock python finetune.py --out-dir DIR`: flock(1) makes an empty .lock and holds it (a BSD lock,
    which a POSIX lock does not see). An empty .lock was taken as a run's: the run wrote its pid into flock's file and
    deleted it at the end. Only a .lock this project wrote (its content says so) is a run's: refused, flock's file
    kept as it was."""
    out = tmp_path / 'run'
    out.mkdir()
    p = subprocess.run(['flock', str(out / '.lock'), sys.executable, 'finetune.py', *TINY, '--out-dir', str(out),
                        '--max-steps', '1'], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 1 and f'--out-dir {out} is not empty and holds no run of these scripts' in p.stderr, \
        p.stderr[-2000:]
    assert os.listdir(out) == ['.lock'] and (out / '.lock').read_bytes() == b''


def test_a_lock_the_file_system_cannot_take_is_one_line_naming_the_lock(monkeypatch, tmp_path):
    """A lockf that fails for another reason than a holder (NFS without locks: ENOLCK) is the write error's one line,
    naming .lock, not a holder; the folder the command made is left with its .lock alone."""
    def no_locks(fd, how):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(util.rundir.fcntl, 'lockf', no_locks)
    out = tmp_path / 'run'
    cfg = SimpleNamespace(out_dir=str(out), resume=False, overwrite=False, INPUTS=())
    with pytest.raises(WriteError) as e:
        util.rundir.RunDir(cfg, True)
    assert str(e.value).startswith(f'cannot write {out}/.lock (No locks available): '), e.value
    assert os.listdir(out) == ['.lock']

# -----------------------------------------------------------------------------
# Files written whole: a full disk (here a file size limit, which fails a write the same way)


def run_limited(limit, *args):
    """finetune.py with writes beyond `limit` bytes a file failing (EFBIG; SIGXFSZ is ignored by Python)."""
    return run_script('finetune.py', *TINY, *args, limits=[(resource.RLIMIT_FSIZE, limit)])


@pytest.mark.parametrize('link', ['symbolic', 'hard'])
def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(monkeypatch, saved, tmp_path, link):
    """.lock a link to a user's file: locking it wrote who holds it into that file, truncated."""
    d = saved(tmp_path)
    (tmp_path / 'notes.txt').write_text('mine\n')
    (os.symlink if link == 'symbolic' else os.link)(tmp_path / 'notes.txt', d / '.lock')
    before = digest(d)
    for args in (['--resume', 'true', '--max-steps', '3'], ['--max-steps', '1', '--overwrite', 'true']):
        msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, *args)
        says = 'Too many levels of symbolic links' if link == 'symbolic' else 'has other names (a hard link)'
        assert msg and f'{d}/.lock' in msg and says in msg and 'move' in msg, msg
        assert (tmp_path / 'notes.txt').read_text() == 'mine\n' and digest(d) == before and step_of(d) == 2


def one_error_line(p):
    assert p.returncode not in (0, None) and 'Traceback' not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), p.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize('limit, fails', [(600, 'log.txt'), (2 ** 20, 'checkpoint.pt')])
def test_a_full_disk_leaves_every_file_as_it_was(saved, tmp_path, limit, fails):
    """log.txt (over 600 bytes, written first by a resume) cannot grow within 600 bytes: it and config.json stay.
    The checkpoint (11 MB) cannot be within 1 MB: the old one stays, no .tmp beside it; one line each."""
    d = saved(tmp_path)
    before = digest(d)
    line = one_error_line(run_limited(limit, '--out-dir', d, '--resume', 'true', '--max-steps', '3'))
    assert f'cannot write {d / fails}' in line and 'File too large' in line and '--resume true' in line, line
    assert not [n for n in os.listdir(d) if n.endswith('.tmp')]
    assert (d / fails).read_bytes() == (saved(tmp_path / 'again') / fails).read_bytes()
    assert json.loads((d / 'config.json').read_text())['max_steps'] == (2 if fails == 'log.txt' else 3)
    assert step_of(d) == 2
    if fails == 'log.txt':
        assert digest(d) == before
    msg = run_script('finetune.py', *TINY, '--out-dir', d, '--resume', 'true', '--max-steps', '3')
    assert msg.returncode == 0, msg.stderr[-3000:]
    assert [r['step'] for r in read_metrics(d)] == [2, 3]   # step 3's record of the failed save is made once


def test_a_full_disk_at_the_first_checkpoint_says_the_command_that_works(tmp_path):
    """The advised 'run the command again' was refused as 'a finished run' (its evaluation kept, no checkpoint):
    an evaluation is now written after its checkpoint, so the same command starts the run again in place."""
    d = tmp_path / 'run'
    line = one_error_line(run_limited(2 ** 20, '--out-dir', d, '--max-steps', '2'))
    assert f'cannot write {d}/checkpoint.pt (File too large): free some space' in line, line
    assert '; no checkpoint was saved yet' in line
    assert line.endswith('there is nothing to continue; run the command again'), line
    assert run_script('finetune.py', *TINY, '--out-dir', d, '--max-steps', '2').returncode == 0


def test_a_write_error_advises_resume_only_where_there_is_one(monkeypatch, tmp_path):
    """Every write error said 'free some space ... --resume true': for a permission error too, and in evaluate.py,
    which has no --resume: there, as every error outside a run, it ends in 'run the command again'."""
    import errno
    from util.files import cannot_write

    def fails(e):
        def main():
            raise cannot_write(str(tmp_path / 'out.md'), e)
        with pytest.raises(SystemExit) as exit_:
            run_main(main)
        return exit_.value.code
    full = fails(OSError(errno.ENOSPC, 'No space left on device'))
    assert full.startswith(f'error: cannot write {tmp_path}/out.md (No space left on device): free some space'), full
    denied = fails(PermissionError(errno.EACCES, 'Permission denied'))
    assert denied.startswith(f'error: cannot write {tmp_path}/out.md (Permission denied): '), denied
    assert [m.endswith('; run the command again') and 'resume' not in m and 'checkpoint' not in m
            for m in (full, denied)] == [True, True]


# -----------------------------------------------------------------------------
# What a resume keeps, and what a new run may not write over


@pytest.mark.parametrize('damage', ['missing', 'cut in two'])
def test_resume_without_a_readable_config_json_keeps_the_metrics(monkeypatch, saved, tmp_path, damage):
    d = saved(tmp_path)
    text = (d / 'config.json').read_text()
    if damage == 'missing':
        (d / 'config.json').unlink()
    else:
        (d / 'config.json').write_text(text[:len(text) // 2])
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '4')
    assert [r['step'] for r in read_metrics(d)] == [2, 4]         # the earlier evaluation kept
    config = json.loads((d / 'config.json').read_text())
    assert 'rebuilt from the checkpoint' in config['rebuilt'] and config['max_steps'] == 4
    assert config['resumes'][-1]['step'] == 2 and config['script'] == 'finetune.py'
    if damage == 'cut in two':
        assert (d / 'config.json.damaged').read_text() == text[:len(text) // 2]


def test_a_refused_resume_renames_nothing_and_damaged_copies_are_numbered(monkeypatch, saved, tmp_path):
    """A refused resume renamed a damaged config.json over the config.json.damaged kept from before (lost); each
    resume that goes on keeps its damaged copy beside the older ones."""
    d = saved(tmp_path)
    (d / 'config.json.damaged').write_text('kept from before\n')
    (d / 'config.json').write_text('{"cut in')
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--resume', 'true', '--epochs', '3')
    assert msg and '--epochs 1 -> 3' in msg and digest(d) == before, msg
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '3')
    (d / 'config.json').write_text('{"cut again')
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '4')
    assert [(d / f'config.json.damaged{n}').read_text() for n in ('', '.1', '.2')] == \
        ['kept from before\n', '{"cut in', '{"cut again']
    assert json.loads((d / 'config.json').read_text())['max_steps'] == 4
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path / 'new' / 'run', '--resume', 'true')
    assert msg and 'no checkpoint' in msg and not (tmp_path / 'new').exists(), msg


@pytest.mark.parametrize('kept', ['done.json', 'metrics only'])
def test_a_finished_run_is_not_written_over_unless_asked(monkeypatch, saved, tmp_path, kept):
    """Results kept without their checkpoint (reproduce.py's done.json, results/): refused in one line naming
    --overwrite; with --overwrite true the new run starts afresh (the old metrics and done.json deleted)."""
    d = saved(tmp_path)
    (d / 'checkpoint.pt').unlink()
    if kept == 'done.json':
        (d / 'done.json').write_text('{"stage": "finetune", "metrics": {"top1": 10.0}}')
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--max-steps', '1')
    assert msg and f'{d} holds a finished run' in msg and '--overwrite true' in msg, msg
    assert digest(d) == before
    train(monkeypatch, finetune, d, '--max-steps', '1', '--overwrite', 'true')
    assert [r['step'] for r in read_metrics(d)] == [1] and not (d / 'done.json').exists() and step_of(d) == 1
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--max-steps', '1')   # a run again now
    assert msg and 'already holds a run' in msg and '--overwrite true' in msg, msg


def test_resume_drops_an_evaluation_made_after_its_checkpoint(monkeypatch, saved, tmp_path):
    """Stopped between an evaluation and its checkpoint: the resumed run makes that evaluation again, once."""
    d = saved(tmp_path)
    with open(d / 'metrics.jsonl', 'a') as f:
        f.write(json.dumps({'epoch': 0.5, 'step': 4, 'top1': 99.0}) + '\n')
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '4')
    assert [(r['step'], r['top1'] == 99.0) for r in read_metrics(d)] == [(2, False), (4, False)]


def test_resume_adds_the_evaluation_its_checkpoint_holds(monkeypatch, saved, tmp_path):
    """Stopped between a checkpoint and its evaluation's line (Run.save writes the checkpoint first): the resumed run
    adds that line as it was, also where the evaluation was mid-epoch (--max-steps 2 of an 8-step epoch: it was
    lost, as only an epoch's end was looked for)."""
    d = saved(tmp_path)
    evaluated = read_metrics(d)
    assert [r['step'] for r in evaluated] == [2]
    (d / 'metrics.jsonl').write_text('')
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '4')
    records = read_metrics(d)
    assert [r['step'] for r in records] == [2, 4] and records[0] == evaluated[0]


def test_a_run_file_linked_outside_the_run_is_refused(monkeypatch, saved, tmp_path):
    """log.txt a link to a user's file elsewhere: a resume appended its log to that file."""
    d = saved(tmp_path)
    (tmp_path / 'notes.txt').write_text('mine\n')
    (d / 'log.txt').unlink()
    os.symlink(tmp_path / 'notes.txt', d / 'log.txt')
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--resume', 'true', '--max-steps', '3')
    assert msg and f'cannot write {d}/log.txt (Too many levels of symbolic links)' in msg and 'move' in msg, msg
    assert (tmp_path / 'notes.txt').read_text() == 'mine\n' and digest(d) == before and step_of(d) == 2


def test_a_run_file_linked_inside_the_run_is_refused(monkeypatch, saved, tmp_path):
    """log.txt a link to checkpoint.pt: the resumed run's log lines went into the checkpoint's tail."""
    d = saved(tmp_path)
    (d / 'log.txt').unlink()
    os.symlink('checkpoint.pt', d / 'log.txt')
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--resume', 'true', '--max-steps', '3')
    assert msg and f'cannot write {d}/log.txt (Too many levels of symbolic links)' in msg and 'move' in msg, msg
    assert digest(d) == before and step_of(d) == 2


def test_a_hard_linked_snapshot_keeps_what_it_held(monkeypatch, saved, tmp_path):
    """cp -al, a cheap backup: the resumed run's log lines were appended to the snapshot's log.txt too (appended in
    place, where every other file is replaced by rename)."""
    d = saved(tmp_path)
    snapshot = tmp_path / 'snapshot'
    snapshot.mkdir()
    for name in os.listdir(d):
        os.link(d / name, snapshot / name)
    before = digest(snapshot)
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '3')
    assert digest(snapshot) == before and step_of(d) == 3
    assert f'resumed from {d}/checkpoint.pt at step 2' in (d / 'log.txt').read_text()


def test_a_snapshot_made_while_the_run_is_live_keeps_what_it_held(monkeypatch, saved, tmp_path):
    """cp -al while a resumed run trains: each line is added by looking at log.txt's names again, so the lines after
    the snapshot go to the run's log alone (a check made once, at the start, would append them to both)."""
    d = saved(tmp_path)
    snapshot = tmp_path / 'snapshot'
    held = []
    before = (d / 'log.txt').read_text().count('\n')   # the lines of the run that saved it
    add_to_log = util.rundir.add_to_log

    def snapshot_at_the_third_line(path, text):
        if len(held) == 0 and (d / 'log.txt').read_text().count('\n') > 2 + before:
            snapshot.mkdir()
            os.link(d / 'log.txt', snapshot / 'log.txt')
            held.append((snapshot / 'log.txt').read_text())
        add_to_log(path, text)
    monkeypatch.setattr(util.rundir, 'add_to_log', snapshot_at_the_third_line)
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '3')
    assert held and (snapshot / 'log.txt').read_text() == held[0]
    assert (d / 'log.txt').read_text().startswith(held[0]) and len((d / 'log.txt').read_text()) > len(held[0])
    assert step_of(d) == 3


def test_a_temporary_file_left_as_a_link_is_not_written_through(monkeypatch, saved, tmp_path):
    """checkpoint.pt.tmp a link to a user's file: the checkpoint was written into that file. A temporary file now has
    a name made for it, exclusively: a link at the old name is no file of the run's, and is left as it is."""
    d = saved(tmp_path)
    (tmp_path / 'notes.txt').write_text('mine\n')
    os.symlink(tmp_path / 'notes.txt', d / 'checkpoint.pt.tmp')
    train(monkeypatch, finetune, d, '--resume', 'true', '--max-steps', '3')
    assert (tmp_path / 'notes.txt').read_text() == 'mine\n' and step_of(d) == 3
    assert os.readlink(d / 'checkpoint.pt.tmp') == str(tmp_path / 'notes.txt')
    assert not (d / 'checkpoint.pt').is_symlink()


# root writes into read-only folders: as root, the scripts run without that capability (util-linux's setpriv)
AS_USER = ['setpriv', '--bounding-set', '-dac_override,-dac_read_search'] if os.geteuid() == 0 else []


@pytest.mark.skipif(AS_USER and not shutil.which('setpriv'), reason='root, and no setpriv to drop its rights')
def test_a_read_only_out_dir_is_one_line(saved, tmp_path):
    d = saved(tmp_path)
    before = digest(d)
    os.chmod(d, 0o555)
    try:
        for args in (['--resume', 'true', '--max-steps', '3'], ['--max-steps', '1', '--overwrite', 'true']):
            p = subprocess.run([*AS_USER, sys.executable, 'finetune.py', *TINY, '--out-dir', str(d), *args], cwd=ROOT,
                               env=sub_env(), capture_output=True, text=True, timeout=240)
            assert f'cannot write {d}/.lock (Permission denied): ' in one_error_line(p)
    finally:
        os.chmod(d, 0o755)
    assert digest(d) == before

@pytest.mark.skipif(AS_USER and not shutil.which('setpriv'), reason='root, and no setpriv to drop its rights')
def test_a_read_only_run_is_not_said_to_have_no_checkpoint(saved, tmp_path):
    """A run folder (or mount) made read-only: the line said "no checkpoint was saved yet: there is nothing to continue"
    of a run that has one. It says where the checkpoint is and how to continue once the folder is writable."""
    d = saved(tmp_path)
    os.chmod(d, 0o555)
    try:
        p = subprocess.run([*AS_USER, sys.executable, 'finetune.py', *TINY, '--out-dir', str(d), '--resume', 'true',
                            '--max-steps', '3'], cwd=ROOT, env=sub_env(), capture_output=True, text=True, timeout=240)
    finally:
        os.chmod(d, 0o755)
    line = one_error_line(p)
    assert f'cannot write {d}/.lock (Permission denied)' in line and 'no checkpoint' not in line, line
    assert f'{d}/checkpoint.pt holds the last checkpoint' in line and '--resume true' in line, line
    assert step_of(d) == 2


@pytest.mark.parametrize('damage', ['nested too deep', 'not JSON'])
def test_a_run_whose_config_json_is_damaged_is_still_a_run(monkeypatch, saved, tmp_path, damage):
    """config.json nested deeper than json reads (a RecursionError) said "no checkpoint was saved yet" of a run that
    has one; one that is not JSON was "no run of these scripts", which --overwrite true could not pass. A damaged
    config.json beside a checkpoint is a run: --resume true continues it, --overwrite true deletes it."""
    d = saved(tmp_path)
    (d / 'config.json').write_text('[' * 100000 + ']' * 100000 if damage == 'nested too deep' else 'garbage')
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--max-steps', '3')
    assert msg and f'{d} already holds a run' in msg and '--resume true' in msg, msg
    assert run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--max-steps', '1', '--overwrite', 'true') \
        is None
    assert step_of(d) == 1 and json.loads((d / 'config.json').read_text())['max_steps'] == 1


@pytest.mark.parametrize('record', ['{"step": "x"}', '[' * 100000 + ']' * 100000])
def test_a_damaged_metrics_record_is_one_line_naming_it(monkeypatch, saved, tmp_path, record):
    """A record whose step is no number ended in a TypeError, one nested too deep in a RecursionError, each with a
    resume command that failed again: the file and its line are named, with the fix."""
    d = saved(tmp_path)
    with open(d / 'metrics.jsonl', 'a') as f:
        f.write(record + '\n')
    before = digest(d)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', d, '--resume', 'true', '--max-steps', '3')
    assert msg and msg.startswith(f'error: {d}/metrics.jsonl: line 2 ') and 'move it away' in msg, msg
    after = digest(d)
    assert 'Error' not in msg and 'continue with' not in msg
    assert [after[n] == before[n] for n in ('checkpoint.pt', 'metrics.jsonl', 'config.json')] == [True] * 3


@pytest.mark.skipif(AS_USER and not shutil.which('setpriv'), reason='root, and no setpriv to drop its rights')
def test_a_read_only_log_is_named(saved, tmp_path):
    """It said to make the folder writable, which it is: the file is named."""
    d = saved(tmp_path)
    os.chmod(d / 'log.txt', 0o444)
    p = subprocess.run([*AS_USER, sys.executable, 'finetune.py', *TINY, '--out-dir', str(d), '--resume', 'true',
                        '--max-steps', '3'], cwd=ROOT, env=sub_env(), capture_output=True, text=True, timeout=240)
    line = one_error_line(p)
    assert f'cannot write {d}/log.txt (Permission denied): ' in line and 'make it writable' in line, line
    assert step_of(d) == 2

# -----------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_ends_in_one_line_that_continues_the_run(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it (the loader's worker too): exit 130, one line
    with the command that continues the run, a checkpoint that loads; that command then resumes it."""
    out = tmp_path / 'run'
    # SIGINT as a terminal's shell leaves it: a shell's background job (`pytest &`) would pass it on ignored
    p = start(out, '--num-workers', '1', start_new_session=True,
              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_checkpoint(p, out)
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and 'Traceback' not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: stopped (Ctrl-C): ') and \
        f'{out / "checkpoint.pt"} holds the last checkpoint' in lines[0], err[-3000:]
    command = shlex.split(lines[0].split('continue with: ', 1)[1])
    assert command[:2] == ['python', 'finetune.py'] and command[-2:] == ['--resume', 'true']
    at = step_of(out)
    p = run_script(*command[1:], '--max-steps', at + 1)
    assert p.returncode == 0 and f'resumed from {out / "checkpoint.pt"} at step {at}' in p.stdout, p.stderr[-3000:]
    assert step_of(out) == at + 1


@pytest.mark.parametrize('stdout', ['closed pipe', '/dev/full'])
def test_a_stdout_that_cannot_be_written_ends_in_no_traceback(tmp_path, stdout):
    """`python finetune.py ... | head`, and stdout on a full device, ended the run with a traceback: it goes on,
    its log.txt whole."""
    args = [sys.executable, 'finetune.py', *TINY, '--out-dir', str(tmp_path / 'run'), '--max-steps', '2']
    if stdout == 'closed pipe':
        p = subprocess.Popen(args, cwd=ROOT, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        p.stdout.close()   # as `| head` does once it has its lines
        err = p.communicate(timeout=240)[1]
    else:
        with open('/dev/full', 'w') as full:
            p = subprocess.run(args, cwd=ROOT, env=sub_env(), stdout=full, stderr=subprocess.PIPE, text=True,
                               timeout=240)
        err = p.stderr
    assert p.returncode == 0 and not err.strip(), err[-3000:]
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'final | top-1' in log


@pytest.mark.parametrize('command', [['attention_distill.py', '--teacher', 'no-such-teacher.pt'],
                                     ['finetune.py', '--init', 'no-such-weights.pt']], ids=['teacher', 'init'])
def test_a_refused_command_leaves_no_folder_it_made(tmp_path, command):
    """Refused after the run directory was made (the teacher or weights are read later): the folders it made,
    nested ones included, are gone again, and a folder that was there stays."""
    out = tmp_path / 'new' / 'run'
    p = run_script(*command, *TINY, '--out-dir', out)
    assert p.returncode != 0 and p.stderr.strip().startswith('error:'), p.stderr[-2000:]
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'kept').mkdir()
    assert run_script(*command, *TINY, '--out-dir', tmp_path / 'kept').returncode != 0
    assert (tmp_path / 'kept').is_dir() and not any((tmp_path / 'kept').iterdir())


def test_a_newline_in_out_dir_is_refused_in_one_line(tmp_path, monkeypatch):
    """--out-dir 'run<newline>b' cut every line that names the run in two (the log, the error lines)."""
    monkeypatch.chdir(tmp_path)
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', 'run\nb', '--max-steps', '1')
    assert msg and msg.startswith('error: --out-dir ') and os.listdir(tmp_path) == [], msg


def test_existing_run_is_not_overwritten(depth2_run, tmp_path):
    out, _ = depth2_run
    before = digest(out)
    assert {'checkpoint.pt', 'metrics.jsonl', 'config.json', 'log.txt'} <= set(before)
    assert_one_line_error(finetune_tiny(out, '--max-steps', '2', '--amp', 'off', check=False), '--resume')
    assert digest(out) == before
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'\x00not a checkpoint')
    assert_one_line_error(finetune_tiny(out, '--init', bad, '--max-steps', '2', check=False))
    assert digest(out) == before


def test_failed_resume_start_leaves_run_untouched(depth2_run, tmp_path):
    """--resume true with a bad --init fails before training; the run's files (config.json included)
    must stay as they were."""
    out, _ = depth2_run
    before = digest(out)
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'\x00not a checkpoint')
    assert_one_line_error(finetune_tiny(out, '--init', bad, '--resume', 'true', check=False), str(bad))
    changed = sorted(k for k in set(before) | set(digest(out)) if before.get(k) != digest(out).get(k))
    assert not changed, f'a failed --resume start changed {changed} in the run dir'


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='needs Linux /proc')
def test_unusable_out_dir(tmp_path, monkeypatch):
    (tmp_path / 'a_file').write_text('mine\n')
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path / 'a_file', '--max-steps', '1')
    assert msg and f"{tmp_path / 'a_file'}: cannot make it (File exists)" in msg, msg
    assert (tmp_path / 'a_file').read_text() == 'mine\n'
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', '/proc/no/such/run', '--max-steps', '1')
    assert msg and '/proc/no/such/run: cannot make it' in msg, msg


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
