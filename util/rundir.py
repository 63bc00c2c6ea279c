"""
A run directory: what it holds, who may write it, and how it is written.

    <out_dir>/config.json     every field, the script that made the run (and a transfer run's teacher by SHA-256),
                              git commit, world size, torch version, command; a resume updates the fields and
                              appends what it changed under 'resumes'
    <out_dir>/log.txt         what the run printed
    <out_dir>/metrics.jsonl   one record per evaluation ('time': seconds of training, summed over resumes)
    <out_dir>/checkpoint.pt   model, optimiser, scaler, EMA, step, RNG states, time, classes, the script that saved it
    <out_dir>/.lock           while a process writes the directory: it holds the lock, its pid and command inside

One process writes a run directory at a time: it holds a POSIX lock (lockf) on .lock, which the kernel lets go
when the process dies (kill -9 included) and which its data-loading workers do not inherit (an flock would
live on in them for seconds after a kill -9), so a second process is refused at once, naming the first, and
a stale file never blocks. Every file is written whole to a temporary file, then renamed over the old one:
a full disk, a kill -9 or a Ctrl-C never leaves half a file, nor the temporary one.

A run starts only in an empty folder or one that holds a run of these scripts, never writing over another
program's files. A new run never writes over a directory that holds a checkpoint (that needs --resume true) or a
finished run (reproduce.py's done.json, or evaluations kept without their checkpoint), unless --overwrite true
deletes it; the log of an earlier attempt that saved nothing is started afresh. No run deletes or replaces a file
it reads. What a run writes here: util/run.py; how a resume continues it: util/resume.py.
"""
import contextlib
import errno
import fcntl
import json
import os
import platform
import shlex
import socket
import subprocess
import sys


from util.checkpoints import CheckpointError, read_checkpoint
from util.config import ConfigError, flag
from util.files import cannot_write

# what the scripts write in a run directory (reproduce.py its done.json, mae_pretrain.py its figure)
RUN_FILES = ('config.json', 'log.txt', 'metrics.jsonl', 'checkpoint.pt', 'done.json', 'reconstruction.png', '.lock')
_RUN = {}    # the run directory this process works in, and the lock it holds on it (main process)


class RunDirError(ConfigError):
    """A run directory that cannot be used or written: one line naming the file and what to do."""

# -----------------------------------------------------------------------------
# Starting: a new run, or the saved one checked against the command line


def prepare_run_dir(cfg, main=True):
    """Refuse a directory that cannot be written, one that holds another program's files, one that another process
    is writing (main: take the lock, held until the process ends), a run this one may not write over, and a run that
    would replace its own inputs. Returns the checkpoint path."""
    ckpt = os.path.join(cfg.out_dir, 'checkpoint.pt')
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise RunDirError(f'--out-dir {cfg.out_dir} is a file, not a directory: choose another --out-dir')
    if cfg.resume and not os.path.exists(ckpt):
        raise RunDirError(f'--resume: no checkpoint at {ckpt}')
    made, d = [], os.path.abspath(cfg.out_dir)     # the folders this command makes, innermost first
    while not os.path.exists(d) and d != os.path.dirname(d):
        made, d = made + [d], os.path.dirname(d)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        _RUN['made'] = made                      # unlock removes them again if the command wrote nothing there
    except OSError as e:
        raise RunDirError(f'--out-dir {cfg.out_dir}: cannot make it ({e.strerror}); choose another') from None
    if not os.access(cfg.out_dir, os.W_OK):
        raise RunDirError(f'--out-dir {cfg.out_dir} cannot be written (read-only): choose another --out-dir')
    refuse_foreign(cfg)
    for name in RUN_FILES[:-1]:   # a directory where a file of the run goes (.lock: lock() says so)
        path = os.path.join(cfg.out_dir, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            raise RunDirError(f'{path} is a directory, not a file: a run writes its {name} there; move it away')
        # a link to a file elsewhere: the log is appended through it, so the run would write a file not its own
        if os.path.islink(path) and os.path.dirname(os.path.realpath(path)) != os.path.realpath(cfg.out_dir):
            raise RunDirError(f'{path} is a link to {os.path.realpath(path)}, outside the run directory, which a run '
                              f'writes only inside: put a copy of that file in its place, or remove the link')
    _RUN['out_dir'] = cfg.out_dir
    if main:
        lock(cfg.out_dir)
    try:
        refuse_overwrite(cfg, ckpt)
    except ConfigError:
        unlock()
        raise
    return ckpt


def refuse_overwrite(cfg, ckpt):
    """A new run starts only in an empty folder, or one that holds a run of these scripts where none was saved,
    finished or not (an earlier attempt's files are started afresh); --overwrite true deletes a run of these
    scripts, never another program's files. No run deletes or replaces a file it reads (cfg.INPUTS)."""
    refuse_inputs_inside(cfg)
    if cfg.resume or cfg.overwrite:
        return
    if os.path.exists(ckpt):
        raise RunDirError(f'{cfg.out_dir} already holds a run; pass --resume true to continue it or choose another '
                          f'--out-dir (--overwrite true deletes it)')
    done = os.path.join(cfg.out_dir, 'done.json')
    evaluated = len(read_lines(os.path.join(cfg.out_dir, 'metrics.jsonl')))
    if os.path.exists(done) or evaluated:   # results kept without their checkpoint (results/, reproduce.py)
        what = 'done.json' if os.path.exists(done) else f'{evaluated} evaluation(s) in metrics.jsonl, no checkpoint'
        raise RunDirError(f'{cfg.out_dir} holds a finished run ({what}): choose another --out-dir, or pass '
                          f'--overwrite true to delete it and start afresh')


def refuse_foreign(cfg):
    """Refuse to start a run in a folder that holds files no run of these scripts wrote (another program's model,
    a user's notes), --overwrite true or not: it would write over them. Checked before the lock is taken."""
    theirs = [] if cfg.resume else foreign(cfg.out_dir)
    if theirs:
        hit = [n for n in RUN_FILES if n in theirs]
        what = f'would write over {hit[0]}' if hit else f"holds {', '.join(theirs[:3])}{' ...' * (len(theirs) > 3)}"
        raise RunDirError(f'--out-dir {cfg.out_dir} holds files that no run of these scripts wrote: a run {what}; '
                          f'choose an empty or new --out-dir' + (' (--overwrite true deletes only a run of these '
                                                                 'scripts)' if cfg.overwrite else ''))


def foreign(out_dir):
    """The sorted names in out_dir that no run of these scripts wrote ([] where it holds such a run: its
    config.json, or failing that its checkpoint, is one of ours). A run's own .lock and temporary files aside."""
    names = sorted(set(os.listdir(out_dir)) - {'.lock', *(n + '.tmp' for n in RUN_FILES)})
    config, ckpt = os.path.join(out_dir, 'config.json'), os.path.join(out_dir, 'checkpoint.pt')
    if not names or is_our_config(config) or 'config.json' not in names and is_training_checkpoint(ckpt):
        return []
    return names


def is_our_config(path):
    """Whether path is a config.json that write_provenance wrote (a JSON object with its fields)."""
    try:
        with open(path, 'rb') as f:
            record = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {'out_dir', 'argv'} <= record.keys()


def is_training_checkpoint(path):
    """Whether path is a checkpoint a training run saved (run.Run.save) (read safely: no pickled code runs)."""
    try:
        ck = read_checkpoint(path)
    except CheckpointError:
        return False
    return isinstance(ck, dict) and all(isinstance(ck.get(k), kind) for k, kind in SAVED.items())


def refuse_inputs_inside(cfg):
    """Refuse a run whose inputs (cfg.INPUTS: its teacher, its --init weights) include a file it would delete or
    replace in its run directory: trained, it would record a teacher that no longer exists as it was."""
    ours = {os.path.realpath(os.path.join(cfg.out_dir, n)) for n in RUN_FILES}
    for field in getattr(cfg, 'INPUTS', ()):
        path = getattr(cfg, field)
        if path and os.path.realpath(path) in ours:
            raise RunDirError(f'{flag(field)} {path} is a file of --out-dir {cfg.out_dir}, which this run deletes or '
                              f'replaces: copy it elsewhere and name the copy, or choose another --out-dir')


def current_run_dir():
    """The run directory this process works in (None before prepare_run_dir)."""
    return _RUN.get('out_dir')


def lock(out_dir):
    """Lock <out_dir>/.lock for as long as this process runs, or refuse naming the process that holds it.
    A POSIX lock belongs to this process alone: it goes when the process dies, even while forked loader
    workers still hold the file open; so this process never opens .lock a second time (closing any copy
    would let go of the lock)."""
    unlock(folders=False)   # a run that ended in this process without run_main (tests call main() directly)
    path = os.path.join(out_dir, '.lock')
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise cannot_write(path, e) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise cannot_write(path, e) from None
            holder = os.pread(fd, 2000, 0).decode(errors='replace').strip() or 'another process'
            os.close(fd)
            raise RunDirError(f'--out-dir {out_dir} is being written by {holder}: wait for it to end, or choose '
                              f'another --out-dir') from None
        if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
            break
        os.close(fd)   # the file was removed by the process that let go of it: lock the new one
    with contextlib.suppress(OSError):   # who holds it, for the next one (a full disk: the lock holds anyway)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({shlex.join(sys.argv)})".encode(), 0)
    _RUN['lock'] = (fd, path)


def unlock(folders=True):
    """Let go of the run directory: remove .lock while holding it, then close it (a process that opened the old
    file meanwhile finds it gone and locks a new one). A folder this command made and left empty (it was refused
    before writing anything) is removed: a refused command leaves --out-dir as it was."""
    fd, path = _RUN.pop('lock', (None, None))
    if fd is not None:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
    for folder in _RUN.pop('made', []) if folders else ():
        with contextlib.suppress(OSError):       # not empty: the run wrote there, and keeps it
            os.rmdir(folder)


def check_output(flag, path, out_dir=None, folder=False):
    """Refuse, before any work, an output written only once the work is done: a file of the run directory
    out_dir (its checkpoint, its figure), one that exists already, or one whose folder cannot be written.
    folder: path is a directory to write files into (it may exist)."""
    parent = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    if out_dir and os.path.basename(path) in RUN_FILES + ('checkpoint.pt.tmp',) and \
            os.path.realpath(parent) == os.path.realpath(out_dir):
        raise RunDirError(f'{flag} {path} is a file of the run directory --out-dir {out_dir}: choose a path '
                          f'outside it, or another name')
    if os.path.exists(path) and (not folder or not os.path.isdir(path)):
        raise RunDirError(f'{flag} {path} exists' + (', and is not a folder' if folder else '') +
                          f': move it away or choose another {flag}')
    while not os.path.exists(parent):   # the nearest folder that exists is where the new ones will be made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise RunDirError(f"{flag} {path}: {parent} {'is a file' if not os.path.isdir(parent) else 'cannot be written'}"
                          f': choose another {flag}')


# what a training run saves (run.Run.save), and of which type: a file without these (or with others in their place) is no run of ours
SAVED = {'model': dict, 'config': dict, 'step': int, 'optimizer': dict, 'rng': list, 'metrics': dict}


def read_json(path):
    """The JSON object in path; None if it is missing or damaged (a damaged one is kept beside it, .damaged)."""
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        os.replace(path, path + '.damaged')
        return None
    except OSError as e:   # a directory, no permission
        raise RunDirError(f'{path}: cannot read it ({e.strerror}): move it away') from None


def read_lines(path):
    """The non-blank lines of a text file ([] if there is none)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, errors='replace') as f:
            return [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:   # a directory, no permission
        raise RunDirError(f'{path}: cannot read it ({e.strerror}): move it away') from None


def git_commit(*args, cwd=None):
    """`git rev-parse HEAD` of this repository ('' outside a git checkout), with ' (with uncommitted changes to
    *.py)' where the code that ran is not that commit's; args: another git command, whose output it returns."""
    def git(*a):
        return subprocess.run(['git', *a], capture_output=True, text=True,
                              cwd=cwd or os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    if args:
        return git(*args)
    head = git('rev-parse', 'HEAD')
    return head + (' (with uncommitted changes to *.py)' if head and git('status', '--porcelain', '--', '*.py') else '')


def cpu_name():
    """The processor's model name (speeds differ several-fold between CPUs: every result states it)."""
    if os.path.exists('/proc/cpuinfo'):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()
