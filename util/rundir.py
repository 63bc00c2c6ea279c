"""
The run directory, one object (RunDir): claimed before anything is built, the run's lines held until the run has
written its config.json, its files written whole, let go at the end.

    config.json     every field, what made the run (script, git commit, torch, command; a transfer run's teacher by
                    SHA-256); a resume updates the fields and appends what it changed under 'resumes'
    log.txt         what the run printed (RunDir.log: printed, held until config.json is written, then added
                    to log.txt, never through a link)
    metrics.jsonl   one record per evaluation ('time': seconds of training, summed over resumes)
    checkpoint.pt   model, optimiser, scaler, EMA, step, RNG states, time, classes, the script that saved it
    .lock           while a process writes the directory: the lock, and its pid and command inside

One process writes a run directory at a time: it holds a POSIX lock (lockf) on .lock, which the kernel lets go when
the process dies (kill -9 included) and which its loader workers do not inherit (an flock would live on in them),
so a second process is refused at once, naming the first. Every file is written whole (util/files.replacing). A run
starts only in an empty folder or one holding a run of these scripts; it never writes over a checkpoint (--resume
true continues it) or a finished run unless --overwrite true deletes it, nor deletes a file it reads.
"""
import contextlib
import errno
import fcntl
import json
import os
import shlex
import socket
import sys

import torch

from util.checkpoints import read_checkpoint
from util.config import flag
from util.errors import CheckpointError, ConfigError, DamagedFile, WriteError, first_few
from util.files import (RUN_FILES, cannot_write, git_commit, read_bytes, read_json, read_lines, replacing,
                        set_aside, write_json, write_text)
from util.outputs import make_folders, remove_empty, writable
from util.resume import SAVED, resume_command, under_torchrun


class RunDir:
    """The directory of one run: claim() refuses what cannot be used and locks it; log() holds the run's lines until
    begin() writes config.json; add_metrics() and save() write its files whole; `with` lets it go at the end."""

    def __init__(self, cfg, main):
        self.cfg = cfg
        self.main = main                # the process that writes (rank 0)
        self.path = cfg.out_dir
        self.checkpoint = self.file('checkpoint.pt')
        self.pending = []               # the log's lines until begin() has written config.json
        self.begun = False
        self.made = []                  # the folders this command made, innermost first
        self.lock = None                # .lock's file descriptor while this process holds it

    def file(self, name):
        """The path of the run's file `name`."""
        return os.path.join(self.path, name)

    @classmethod
    def claim(cls, cfg, main):
        """Refuse a directory that cannot be written, one that holds another program's files, one that another process
        is writing (main: take the lock, held until release), a run this one may not write over, and a run that
        would replace its own inputs."""
        self = cls(cfg, main)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f'--out-dir {self.path} is a file, not a directory: choose another '
                              f'--out-dir')
        if cfg.resume and not os.path.exists(self.checkpoint):
            raise ConfigError(f'--resume: no checkpoint at {self.checkpoint}')
        try:
            make_folders(self.path, self.made)
        except OSError as e:
            raise ConfigError(f'--out-dir {self.path}: cannot make it ({e.strerror}); choose '
                              f'another') from None
        with self.released_on_error():
            self.refuse_unusable()
            if main:
                self.take_lock()
            self.refuse_overwrite()
        return self

    def refuse_unusable(self):
        writable('--out-dir', self.path, os.path.abspath(self.path))
        theirs = [] if self.cfg.resume else self.foreign()
        if theirs:   # another program's model, a user's notes: a run would write over them
            hit = [n for n in RUN_FILES if n in theirs]
            if hit:
                what = f'would write over {hit[0]}'
            else:
                what = f'holds {first_few(theirs)}'
            fix = 'choose an empty or new --out-dir'
            if self.cfg.overwrite:
                fix += ' (--overwrite true deletes only a run of these scripts)'
            raise ConfigError(f'--out-dir {self.path} holds files that no run of these scripts '
                              f'wrote: a run {what}; {fix}')
        for name in RUN_FILES[:-1]:   # a directory where a run's file goes (.lock: take_lock's)
            path = self.file(name)
            if os.path.islink(path):   # log.txt, appended to, would write the file it names
                target = os.path.realpath(path)
                where = ''
                if os.path.dirname(target) != os.path.realpath(self.path):
                    where = ', outside the run directory'
                raise ConfigError(f'{path} is a link to {target}{where}, and a run writes only files '
                                  f'of its own: put a copy of that file in its place, or remove the '
                                  f'link')
            if os.path.lexists(path) and not os.path.isfile(path):
                raise ConfigError(f'{path} is a directory, not a file: a run writes its {name} '
                                  f'there; move it away')

    def foreign(self):
        """The sorted names in the directory that no run of these scripts wrote ([] where it holds such a run: its
        config.json has begin's fields, or its checkpoint a training run's, SAVED). Its .lock and temporary files
        aside."""
        aside = {'.lock', *(n + '.tmp' for n in RUN_FILES)}
        names = sorted(set(os.listdir(self.path)) - aside)
        try:
            if {'out_dir', 'argv'} <= read_json(self.file('config.json'), '').keys():
                return []
        except DamagedFile:   # missing, unreadable, or no JSON object
            if 'config.json' not in names and os.path.exists(self.checkpoint):
                try:
                    ck = read_checkpoint(self.checkpoint)
                except CheckpointError:
                    return names
                ours = isinstance(ck, dict) and all(isinstance(ck.get(k), t) for k, t in SAVED.items())
                if ours:
                    return []
        return names

    def refuse_overwrite(self):
        """A new run starts only in an empty folder, or one that holds a run of these scripts where none was saved,
        finished or not (an earlier attempt's files are started afresh); --overwrite true deletes a run of these
        scripts, never another program's files. No run deletes or replaces a file it reads (cfg.INPUTS)."""
        cfg = self.cfg
        ours = {os.path.realpath(self.file(n)) for n in RUN_FILES}
        for field in cfg.INPUTS:
            path = getattr(cfg, field)
            if path and os.path.realpath(path) in ours:
                raise ConfigError(f'{flag(field)} {path} is a file of --out-dir {self.path}, which '
                                  f'this run deletes or replaces: copy it elsewhere and name the copy, '
                                  f'or choose another --out-dir')
        if cfg.resume or cfg.overwrite:
            return
        if os.path.exists(self.checkpoint):
            raise ConfigError(f'{self.path} already holds a run; pass --resume true to continue it '
                              f'or choose another --out-dir (--overwrite true deletes it)')
        done = os.path.exists(self.file('done.json'))
        evaluated = len(read_lines(self.file('metrics.jsonl')))
        if done or evaluated:   # results kept without their checkpoint
            if done:
                what = 'done.json'
            else:
                what = f'{evaluated} evaluation(s) in metrics.jsonl, no checkpoint'
            raise ConfigError(f'{self.path} holds a finished run ({what}): choose another --out-dir, '
                              f'or pass --overwrite true to delete it and start afresh')

    # -------------------------------------------------------------------------
    # One writer at a time

    def take_lock(self):
        """Lock <out_dir>/.lock while this process runs, or refuse naming the process that holds it. A POSIX lock
        is this process's alone, so .lock is never opened a second time (closing any copy would let go of it)."""
        path = self.file('.lock')
        while True:
            # never through a link (ELOOP): the holder's line would be written into the file it names
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise linked(path) from None
                raise cannot_write(path, e) from None
            if os.fstat(fd).st_nlink > 1:   # a hard link: another name of a file, maybe elsewhere
                os.close(fd)
                raise linked(path)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise cannot_write(path, e) from None
                holder = os.pread(fd, 2000, 0).decode(errors='replace').strip() or 'another process'
                os.close(fd)
                raise ConfigError(f'--out-dir {self.path} is being written by {holder}: wait for '
                                  f'it to end, or choose another --out-dir') from None
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)   # the file was removed by the process that let go of it: lock the new one
        holder = f'process {os.getpid()} on {socket.gethostname()} ({shlex.join(sys.argv)})'
        with contextlib.suppress(OSError):   # who holds it, for the next one (a full disk: the lock
            os.ftruncate(fd, 0)              # holds anyway)
            os.pwrite(fd, holder.encode(), 0)
        self.lock = fd

    def release(self):
        """Let go: remove .lock while holding it, then close it (a process that opened it meanwhile finds it gone and
        locks a new one); remove a folder this command made and left empty: a refused command leaves no trace."""
        if self.lock is not None:
            with contextlib.suppress(OSError):
                os.remove(self.file('.lock'))
            os.close(self.lock)
            self.lock = None
        remove_empty(self.made)   # not empty: the run wrote there, and keeps it
        self.made = []

    @contextlib.contextmanager
    def released_on_error(self):
        try:
            yield
        except BaseException:
            self.release()
            raise

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        """Let the directory go; an error that ends the run is told how to continue it (run_main says
        so)."""
        self.release()
        if error is not None:
            error.how_to_continue = self.how_to_continue()

    # -------------------------------------------------------------------------
    # What the run writes

    def log(self, msg):
        """Print msg (the main process) and add it to log.txt; until begin() has written config.json the lines wait
        in self.pending, so that a command refused before then changes no file of its --out-dir."""
        if not self.main:
            return
        lost = say(msg)
        if lost:
            msg += f'\n(stdout cannot be written ({lost}): the rest is in log.txt only)'
        if self.begun:
            add_to_log(self.file('log.txt'), msg + '\n')
        else:
            self.pending.append(msg)

    def begin(self, record, resumed_step, last):
        """config.json: `record` (every field, what made the run) with the git commit, torch version and command. A new
        run starts afresh (deleting what --overwrite true allowed); a resume updates the fields and appends what it
        changed (config.json rebuilt from the checkpoint if damaged), keeping the metrics up to the checkpoint's step.
        Then log.txt gets the lines held so far."""
        if not self.main:
            return
        launch = {'git_commit': git_commit(), 'world_size': record['world_size'],
                  'torch': torch.__version__, 'argv': sys.argv}
        lines = ''.join(f'{line}\n' for line in self.pending)
        if resumed_step is not None:
            saved = record.pop('saved')
            old = self.config_record()
            if old is None and os.path.lexists(self.file('config.json')):
                set_aside(self.file('config.json'))   # damaged: kept beside it
            if old is None:
                old = {**saved, 'rebuilt': f'config.json was missing or unreadable at step '
                                           f'{resumed_step}: rebuilt from the checkpoint'}
            # a lower lr was allowed once, after it: recorded with this resume
            diverged = old.pop('diverged', None)
            # the checkpoint's config is what ran: config.json may have been edited
            saved = {**old, **saved}
            changed = {k: [saved.get(k), v] for k, v in record.items()
                       if saved.get(k) != v and k not in ('attention_check', 'world_size')}
            resume = {'step': resumed_step, **launch, 'changed': changed}
            if diverged:
                resume['after_divergence'] = diverged
            record = {**old, **record, 'resumes': old.get('resumes', []) + [resume]}
            self.keep_metrics(resumed_step, last)
            write_json(self.file('config.json'), record)
            add_to_log(self.file('log.txt'), lines)
        else:
            # an earlier attempt's files, or the run --overwrite true deletes
            for name in ('metrics.jsonl', 'checkpoint.pt', 'done.json', 'reconstruction.png'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.file(name))
            write_json(self.file('config.json'), {**record, **launch})
            write_text(self.file('log.txt'), lines)
        self.pending = []
        self.begun = True

    def config_record(self):
        """config.json's record; None if it is missing or damaged (read only: a run that starts keeps a damaged one
        beside it, begin(); a refused command renames nothing)."""
        path = self.file('config.json')
        if not os.path.exists(path):
            return None
        try:
            # a directory, no permission: refused
            value = json.loads(read_bytes(path, 'move it away'))
        except ValueError:   # not JSON, or not UTF-8
            return None
        return value if isinstance(value, dict) else None

    def keep_metrics(self, step, last):
        """Keep metrics.jsonl's records up to `step` (the checkpoint a resume starts from): a record written after
        it, by a run stopped before its next checkpoint, is made again; a line that is not a record is dropped.
        last: the evaluation the checkpoint holds, added where a run stopped between the two writes (Run.save)."""
        def step_of(line):
            try:
                return json.loads(line).get('step', 0)
            except (ValueError, AttributeError):
                return None
        path = self.file('metrics.jsonl')
        lines = read_lines(path)
        kept = [line for line in lines if step_of(line) is not None and step_of(line) <= step]
        if last and all(step_of(line) != step for line in kept):
            kept.append(json.dumps(last))
        if kept != lines:
            write_text(path, ''.join(f'{line}\n' for line in kept))

    def add_metrics(self, record):
        """One line of metrics.jsonl, the whole file written anew (it has one line per
        evaluation)."""
        if self.main:
            path = self.file('metrics.jsonl')
            lines = read_lines(path) + [json.dumps(record)]
            write_text(path, ''.join(f'{line}\n' for line in lines))

    def save(self, state):
        """checkpoint.pt, to a temporary file, then renamed: a crash never leaves half a checkpoint.
        Written through a file object: a failed write raises OSError, which replacing makes one line."""
        if self.main:
            with replacing(self.checkpoint) as tmp, open(tmp, 'wb') as f:
                torch.save(state, f)

    def record_divergence(self, what):
        """Add to config.json where the run diverged (its step, what was not finite, the checkpoint
        kept)."""
        record = self.config_record() if self.main else None
        if record is not None:
            write_json(self.file('config.json'), {**record, 'diverged': what})

    def how_to_continue(self):
        """Where the run's last checkpoint is and the command that continues it (or that there is none
        yet)."""
        if not os.path.exists(self.checkpoint):
            evaluated = read_lines(self.file('metrics.jsonl'))
            if evaluated:   # kept without a checkpoint, they would refuse the same command again
                return f'{NOTHING_SAVED} with --overwrite true (it deletes the {len(evaluated)} ' \
                       f'evaluation(s) made)'
            return NOTHING_SAVED
        if under_torchrun():
            return f'{self.checkpoint} holds the last checkpoint; continue with {resume_command()}'
        return f'{self.checkpoint} holds the last checkpoint; continue with: {resume_command()}'


def add_to_log(path, text):
    """Add text at the end of log.txt, in place, never through a link; one with other names too (a hard link: a
    snapshot made with cp -al) is replaced by a copy with the text added, renamed over it as every other file is,
    so that the other names keep what they held. What it held stays whole if this fails, which is one WriteError
    line (a file that may not be written is named)."""
    try:
        with open(path, 'a', opener=not_through_links) as f:
            if os.fstat(f.fileno()).st_nlink == 1:
                f.write(text)
                return
        data = read_bytes(path, 'move it away')
        with replacing(path) as tmp, open(tmp, 'wb') as f:
            f.write(data + text.encode())
    except OSError as e:
        # the file's own permission: appending needs no other
        if isinstance(e, PermissionError) and os.path.isfile(path):
            raise WriteError(f'cannot write {path} ({e.strerror}): make that file writable (chmod '
                             f'u+w)') from None
        raise cannot_write(path, e) from None


def not_through_links(path, flags):
    """open()'s opener that never follows a link (O_NOFOLLOW: ELOOP)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o644)


def say(msg):
    """print(msg); where stdout cannot be written (`| head` has gone: a broken pipe; a full device) the command goes
    on, its files whole, and stdout goes to /dev/null from then on. Returns why it could not, or ''."""
    try:
        print(msg, flush=True)
        return ''
    except OSError as e:
        # what is buffered, and the rest, go there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return e.strerror or type(e).__name__


def linked(path):
    return ConfigError(f'{path} is a link to another file (or another name of one), which the run '
                       f'would write: remove it (the run makes its own)')


NOTHING_SAVED = 'no checkpoint was saved yet: there is nothing to continue; run the command again'
