"""
The run directory, one object (RunDir): claimed before anything is built, the run's lines held until the run has
written its config.json, its files written whole, let go at the end.

    config.json     every field, what made the run (script, git commit, torch, command; a transfer run's teacher by
                    SHA-256); a resume updates the fields and appends what it changed under 'resumes'
    log.txt         what the run printed (RunDir.log: printed, held until config.json is written, then added
                    to log.txt, never through a link)
    metrics.jsonl   one record per evaluation ('time': seconds of training, summed over resumes)
    checkpoint.pt   model, optimiser, scaler, EMA, step, RNG states, time, classes, the script that saved it
    .lock           while a process writes the directory: the lock, and its pid inside

One process writes a run directory at a time: it holds a POSIX lock (lockf) on .lock, which the kernel lets go when
the process dies (kill -9 included) and which its loader workers do not inherit (an flock would live on in them),
so a second process is refused at once, naming the first. Every file is written whole (util/files.replacing). A run
starts only in an empty folder or one holding a run of these scripts; it never writes over a checkpoint (--resume
true continues it) or a finished run unless --overwrite true deletes it, nor deletes a file it reads.

How `--resume true` is checked, in the resolve phase, before anything is built: the checkpoint against the command
line.

A resume continues only the run that was saved, with the script that saved it: its config must be the saved one
except for the fields in the config's RESUMABLE (where and how the run goes, never what it computes), with the same
global batch (batch size x accumulation steps x processes), the same class names (checked once the data is built,
util/run.py), and for a transfer run the same teacher file (teacher.TransferConfig). From the checkpoint kept when
the run diverged, the learning rate may change once (AFTER_DIVERGENCE): config.json records the divergence, and
the resume that used it.
"""
import contextlib
import fcntl
import json
import os
import re
import shlex
import sys

import torch

from util import stop
from util.checkpoints import read_checkpoint
from util.errors import AGAIN, CheckpointError, ConfigError, DamagedFile, flag, say
from util.files import (RUN_FILES, cannot_write, git_commit, make_folders, no_follow, read_bytes,
                        read_json, read_jsonl, remove_empty, replacing, set_aside, write_json,
                        write_text)


class RunDir:
    """The directory of one run, claimed when it is made (RunDir(cfg, main)): what cannot be used is refused and it
    is locked; log() holds the run's lines until begin() writes config.json; keep_metrics() and save() write its
    files whole; `with` lets it go at the end."""

    def __init__(self, cfg, main):
        """The main process refuses a directory that cannot be made, one that another process is writing (it takes
        the lock, held until release: a folder that cannot be written is refused there, by open()), one that holds
        another program's files, a run this one may not write over, and a run that would replace its own inputs."""
        self.main = main                # the process that writes (rank 0)
        self.path = cfg.out_dir
        self.checkpoint = self.file('checkpoint.pt')
        self.pending = []               # the log's lines until begin() has written config.json
        self.begun = False
        self.made = []                  # the folders this command made, innermost first
        self.lock = None                # .lock's file descriptor while this process holds it
        self.lock_ours = False          # .lock made by this command, or signed by it: removed when it lets go
        if not main:   # the main process claims the folder, the others are told what it found (launch.claimed)
            return
        if cfg.resume and not os.path.exists(self.checkpoint):
            raise ConfigError(f'--resume: no checkpoint at {self.checkpoint}')
        try:
            make_folders(self.path, self.made)
        except OSError as e:   # a file there (File exists), no permission
            raise ConfigError(f'--out-dir {self.path}: cannot make it ({e.strerror}); choose '
                              f'another') from None
        with self.released_on_error():
            self.take_lock()
            self.refuse_overwrite(cfg)
            self.sign_lock()   # the folder is a run's: its .lock is the run's, and says who holds it

    def file(self, name):
        """The path of the run's file `name`."""
        return os.path.join(self.path, name)

    def refuse_overwrite(self, cfg):
        """A new run starts only in an empty folder, or one that holds a run of these scripts (its config.json with
        begin's fields, or a damaged one beside its checkpoint) where none was saved, finished or not (an earlier
        attempt's files are started afresh);
        --overwrite true deletes a run of these scripts, never another program's files (a model, a user's notes).
        No run deletes or replaces a file it reads, or writes one of them once done (cfg.INPUTS)."""
        record = self.config_record()
        damaged = record is None and os.path.lexists(self.file('config.json'))
        a_run = {'out_dir', 'argv'} <= (record or {}).keys() or \
            damaged and os.path.exists(self.checkpoint)
        others = set(os.listdir(self.path))
        if self.a_runs_lock():   # else another program's file of that name
            others.discard('.lock')
        if not (cfg.resume or a_run) and others:
            raise ConfigError(f'--out-dir {self.path} is not empty and holds no run of these scripts: '
                              f'choose an empty or new --out-dir')
        ours = {os.path.realpath(self.file(n)) for n in RUN_FILES}
        for field in cfg.INPUTS:
            path = getattr(cfg, field)
            if path and os.path.realpath(path) in ours:
                raise ConfigError(f'{flag(field)} {path} is a file of --out-dir {self.path}, which '
                                  f'this run deletes or replaces: name a path outside it (for a '
                                  f'file it reads, a copy) or choose another --out-dir')
        if cfg.resume or cfg.overwrite:
            return
        if os.path.exists(self.checkpoint):
            raise ConfigError(f'{self.path} already holds a run; pass --resume true to continue it '
                              f'or choose another --out-dir (--overwrite true deletes it)')
        # results kept without their checkpoint
        evaluated = read_jsonl(self.file('metrics.jsonl'), 'move it away', {'step': int})
        if os.path.exists(self.file('done.json')) or evaluated:
            raise ConfigError(f'{self.path} holds a finished run (done.json, or evaluations in '
                              f'metrics.jsonl without a checkpoint): choose another --out-dir, or '
                              f'pass --overwrite true to delete it and start afresh')

    # -------------------------------------------------------------------------
    # One writer at a time

    def take_lock(self):
        """Lock <out_dir>/.lock while this process runs, or refuse naming the process that holds it. A POSIX lock
        is this process's alone, so .lock is never opened a second time (closing any copy would let go of it).
        A .lock it makes is signed at once (sign_lock); one it found is written into only once the folder is known to
        be a run's: a refused command leaves a .lock it did not make as it was."""
        path = self.file('.lock')
        while True:
            try:   # a symbolic link: ELOOP
                made = True
                try:
                    fd = no_follow(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
                except FileExistsError:
                    made = False
                    fd = no_follow(path, os.O_RDWR)
            except FileNotFoundError:   # removed between the two opens by the process that let go of it
                continue
            except OSError as e:
                raise cannot_write(path, e) from None
            if os.fstat(fd).st_nlink > 1:   # a hard link: its other names would hold the pid
                os.close(fd)
                raise ConfigError(f'{path} has other names (a hard link): move it away')
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):   # EAGAIN, EACCES: held
                holder = os.pread(fd, 2000, 0).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                raise ConfigError(f'--out-dir {self.path} is being written by {holder}: wait for '
                                  f'it to end, or choose another --out-dir') from None
            except OSError as e:
                os.close(fd)
                raise cannot_write(path, e) from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)   # the file was removed by the process that let go of it: lock the new one
        self.lock = fd
        self.lock_ours = made
        if made:   # signed at once: an empty .lock is never a run's (another program's lock file, flock(1)'s say)
            self.sign_lock()

    def a_runs_lock(self):
        """Whether .lock is a run's (this command made it, or it holds what sign_lock writes), not another program's
        file of that name (an empty one: `flock DIR/.lock python finetune.py --out-dir DIR` makes one). Read through
        the descriptor held (closing a second one would let go of the lock)."""
        if self.lock_ours:
            return True
        return re.fullmatch(rb'process \d+', os.pread(self.lock, 100, 0).strip()) is not None

    def sign_lock(self):
        """Write who holds .lock into it, for the next command (a full disk: the lock holds anyway)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.lock, 0)
            os.pwrite(self.lock, f'process {os.getpid()}'.encode(), 0)
        self.lock_ours = True

    def release(self):
        """Let go: remove .lock while holding it, where it is the command's (lock_ours), then close it (a process
        that opened it meanwhile finds it gone and locks a new one); remove a folder this command made and left
        empty: a refused command leaves no trace."""
        if self.lock is not None:
            if self.lock_ours:   # never another program's file, nor a run's a refused command did not sign
                with contextlib.suppress(OSError):
                    os.remove(self.file('.lock'))
            os.close(self.lock)
            self.lock = None
        remove_empty(self.made)   # not empty: the run wrote there, and keeps it
        self.made = []

    @contextlib.contextmanager
    def released_on_error(self):
        """Let go of the directory where the command is refused, the refusal told where its checkpoint is, if it has
        one (a read-only run folder: never "no checkpoint was saved yet")."""
        try:
            yield
        except BaseException as e:
            self.release()
            e.how_to_continue = self.how_to_continue()
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """Let the directory go; an error that ends the run is told how to continue it and where the run's
        log is, once written (run_main says so)."""
        self.release()
        if error is not None:
            error.how_to_continue = self.how_to_continue()
            error.log = self.file('log.txt') if self.begun else None

    # -------------------------------------------------------------------------
    # What the run writes

    def log(self, msg):
        """Print msg (the main process) and add it to log.txt; until begin() has written config.json the lines wait
        in self.pending, so that a command refused before then changes no file of its --out-dir."""
        if not self.main:
            return
        say(msg)
        if self.begun:
            add_to_log(self.file('log.txt'), msg + '\n')
        else:
            self.pending.append(msg + '\n')

    def begin(self, record, resumed):
        """config.json: `record` (every field, what made the run) with the git commit, torch version and command. A new
        run starts afresh (deleting what --overwrite true allowed); a resume (resumed: the checkpoint it continues)
        updates the fields and appends what it changed (config.json rebuilt from the checkpoint if damaged), keeping
        the metrics up to the checkpoint's step. Then log.txt gets the lines held so far."""
        if not self.main:
            return
        launch = {'git_commit': git_commit(), 'torch': torch.__version__, 'argv': sys.argv}
        lines = ''.join(self.pending)
        config = self.file('config.json')
        if resumed:
            # first: a log.txt that cannot be written (a link, a directory) changes no other file
            add_to_log(self.file('log.txt'), lines)
            step = resumed['step']
            old = self.config_record()
            if old is None:
                if os.path.lexists(config):
                    set_aside(config)   # damaged: kept beside it
                old = {**resumed['config'], 'rebuilt': f'config.json was missing or unreadable at '
                                                       f'step {step}: rebuilt from the checkpoint'}
            # another lr was allowed once, after it: recorded with this resume
            diverged = old.pop('diverged', None)
            # the checkpoint's config is what ran: config.json may have been edited
            saved = {**old, **resumed['config']}
            changed = {k: [saved.get(k), v] for k, v in record.items()
                       if saved.get(k) != v and k != 'attention_check'}
            resume = {'step': step, **launch, 'changed': changed}
            if diverged:
                resume['after_divergence'] = diverged
            record = {**old, **record, 'resumes': old.get('resumes', []) + [resume]}
            self.keep_metrics(step, resumed.get('evaluation'))
            write_json(config, record)
        else:
            # an earlier attempt's files, or the run --overwrite true deletes
            for name in ('metrics.jsonl', 'checkpoint.pt', 'done.json', 'reconstruction.png', stop.ENDED):
                try:
                    os.remove(self.file(name))
                except FileNotFoundError:
                    pass
                except OSError as e:   # a directory
                    raise cannot_write(self.file(name), e) from None
            write_json(config, {**record, **launch})
            write_text(self.file('log.txt'), lines)
        self.pending = []
        self.begun = True
        stop.ended_file = self.file(stop.ENDED)   # how the run ends is said there (util/launch.run_main)

    def config_record(self):
        """config.json's record; None if it is missing or damaged (read only: a run that starts keeps a damaged one
        beside it, begin(); a refused command renames nothing)."""
        with contextlib.suppress(DamagedFile):   # missing, unreadable, not JSON, no object
            return read_json(self.file('config.json'), '')
        return None

    def keep_metrics(self, step, last):
        """metrics.jsonl's records up to `step` (the checkpoint just written, or the one a resume starts from: a
        record written after it, by a run stopped before its next checkpoint, is made again), and `last`, the
        evaluation of that step its checkpoint holds, where it is missing (Run.save adds it so; a resume, where a
        run stopped between the two writes). The whole file is written anew (it has one line per evaluation)."""
        if not self.main:
            return
        path = self.file('metrics.jsonl')
        records = read_jsonl(path, 'move it away', {'step': int})
        kept = [r for r in records if r.get('step', 0) <= step]
        if last and all(r.get('step') != step for r in kept):
            kept.append(last)
        if kept != records:
            write_text(path, ''.join(f'{json.dumps(r)}\n' for r in kept))

    def save(self, state):
        """checkpoint.pt, to a temporary file, then renamed: a crash never leaves half a checkpoint.
        Written through a file object: a failed write raises OSError, which replacing makes one line."""
        if self.main:
            with replacing(self.checkpoint) as f:
                torch.save(state, f)

    def record_divergence(self, what):
        """Add to config.json where the run diverged (its step, what was not finite, the checkpoint
        kept)."""
        record = self.config_record() if self.main else None
        if record is not None:
            write_json(self.file('config.json'), {**record, 'diverged': what})

    def how_to_continue(self):
        """Where the run's last checkpoint is and the command that continues it (or that there is none yet: run
        again, the command is told what to do with evaluations kept without it, refuse_overwrite)."""
        if not os.path.exists(self.checkpoint):
            return NOTHING_SAVED
        command = 'your torchrun command and --resume true'
        if 'TORCHELASTIC_RUN_ID' not in os.environ:   # its own, with --resume true
            argv = [a for before, a in zip([None, *sys.argv], sys.argv)
                    if a != '--resume' and before != '--resume']
            command = f"{shlex.join(['python', *argv])} --resume true"
        return f'{self.checkpoint} holds the last checkpoint; continue with: {command}'


def add_to_log(path, text):
    """Add text at the end of log.txt, in place, never through a link; one with other names too (a hard link: a
    snapshot made with cp -al) is replaced by a copy with the text added, renamed over it as every other file is,
    so that the other names keep what they held. What it held stays whole if this fails, which is one WriteError
    line."""
    try:
        with open(path, 'a', opener=no_follow) as f:
            if os.fstat(f.fileno()).st_nlink == 1:
                f.write(text)
                return
        data = read_bytes(path, 'move it away')
        with replacing(path) as f:
            f.write(data + text.encode())
    except OSError as e:
        raise cannot_write(path, e) from None


NOTHING_SAVED = f'no checkpoint was saved yet: there is nothing to continue; {AGAIN}'

# -----------------------------------------------------------------------------
# A resume, checked

# what a training run saves (run.Run.save), and of which type: a file without these is no run of ours
SAVED = {'model': dict, 'arch': dict, 'config': dict, 'step': int, 'optimizer': dict, 'rng': list,
         'metrics': dict, 'script': str}

# what a resume from the checkpoint kept when its run diverged may change besides RESUMABLE: the lr
AFTER_DIVERGENCE = ('blr', 'min_lr', 'min_lr_ratio', 'clip_grad', 'amp')


def open_resumed(cfg, run_dir, world, method=None):
    """The checkpoint to continue, read safely (no pickled code) and checked against the command line (method: what
    the config's own resolve step settled, a teacher as it was read): ConfigError names every field that differs
    (old -> new) and may not. Returns it, kept by the Plan: the file is read once
    (Run.restore loads its tensors, then drops them)."""
    path = run_dir.checkpoint
    ck = read_checkpoint(path)
    if not isinstance(ck, dict):   # a tensor, a list: none of what a run saves
        ck = {}
    bad = [k for k, kind in SAVED.items() if not isinstance(ck.get(k), kind)]
    if bad:
        raise CheckpointError(f"{path} is not a training checkpoint of these scripts "
                              f"({', '.join(bad)}: missing or of another kind): nothing to resume")
    # the counts no run saves: a step of -4 trains with a negative lr. (Another epoch length is refused with the
    # data, run.check_data; a nan, which Run.save never saves, stops the run at its first step.) A step that is not
    # an int is refused by SAVED
    counts = [('step', ck['step']), ('time', ck.get('time', 0))]
    bad = [(k, v) for k, v in counts if type(v) not in (int, float) or not 0 <= v <= MOST]
    if bad:
        k, v = bad[0]
        raise CheckpointError(f'--resume: {path} holds {k} {v!r}, which no run of these scripts '
                              f'saves: it was edited or is damaged (kept as it is): put back a copy '
                              f'of it, or start a new run in another --out-dir')
    script = ck['script']
    if script != cfg.SCRIPT:
        raise ConfigError(f'--resume: {path} was saved by {script}, not {cfg.SCRIPT}: continue it '
                          f'with {script} (its flags and --resume true), or start a new run in '
                          f'another --out-dir')
    # a run that diverged after this checkpoint (config.json says so) may go on from it with another lr
    diverged = (run_dir.config_record() or {}).get('diverged')
    after = isinstance(diverged, dict) and diverged.get('checkpoint') == ck['step']
    # what may change besides RESUMABLE
    conflicts = cfg.resume_conflicts(ck, world, AFTER_DIVERGENCE if after else (), method)
    if conflicts:
        raise ConfigError(f"--resume: {path} was saved with other settings: "
                          f"{'; '.join(conflicts)}. Resume with the saved ones or start a new run in "
                          f"another --out-dir")
    return ck


# the most steps (or seconds) a run counts: a float holds it exactly
MOST = 2 ** 53

