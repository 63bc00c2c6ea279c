"""
The files that runs and reports leave behind and read back (config.json, done.json, results.json, metrics.jsonl, ...);
checkpoints are read by util/checkpoints.py. A file cut short by a kill or a full disk, edited by hand, or written by
another program is one error naming the file and the fix, never a traceback; a file is written to a temporary file
and renamed, never left half written, every file opened for writing by one opener (no_follow: never through a link).

A temporary file has a name made for it (temporary: .<name>.<8 random hex digits>.tmp beside the file it writes,
created exclusively), so that no file of anyone's is opened, removed or replaced for it; it is locked while its
command writes it, and one whose lock is free (its command was killed) is removed by the next command that writes
the same file.

Where a command writes, refused before any work where it cannot be written, as open() itself says (the folder
and the errno). A run directory is util/rundir.py's; the other outputs are of two kinds:

    check_out_dir(path, '--out-dir')    a folder a tool writes its report into (tools/benchmark.py, ...)
    claimed('--out', path)              a file written once the work is done (evaluate.py --out, ensemble.py --out,
                                        mae_pretrain.py --export, never a file of its run: util/rundir.py), claimed
                                        when the command starts: one that exists or cannot be written is refused
                                        there, so that two commands given one path never both write it:

    with claimed('--out', path) as write:      # its temporary file made and locked: a second command is refused
        ...                                    # the work
        write(path, lambda f: f.write(data))   # written whole into it, then given the name path, never over a file

Nothing is at the output's name until the output is whole: a command that ends without writing (an error, Ctrl-C,
a kill -9) leaves no file there, and the same command run again goes on.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
import tempfile

from util.errors import ConfigError, DamagedFile, WriteError

# what the scripts write in a run directory (reproduce.py its done.json, mae_pretrain.py its figure)
RUN_FILES = ('config.json', 'log.txt', 'metrics.jsonl', 'checkpoint.pt', 'done.json',
             'reconstruction.png', '.lock')


def read_bytes(path, fix):
    """A file's bytes; one it cannot read is DamagedFile: '<path>: cannot read it (<why>):
    <fix>'."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:   # a directory, no permission
        raise DamagedFile(f'{path}: cannot read it ({e.strerror}): {fix}') from None


def read_json(path, fix, keys=None):
    """The JSON object in `path`. keys: {key: type or tuple of types} it must hold. Otherwise DamagedFile:
    '<path> <what is wrong>: <fix>'."""
    try:
        record = json.loads(read_bytes(path, fix))
    except (ValueError, RecursionError) as e:   # JSONDecodeError, bytes that are not UTF-8, nested past json's depth
        raise DamagedFile(f'{path} is not JSON, cut short or damaged ({e}): {fix}') from None
    keys = keys or {}
    if not isinstance(record, dict) or \
            any(not isinstance(record.get(k), kind) for k, kind in keys.items()):
        raise DamagedFile(f"{path} does not hold a JSON object with {', '.join(keys) or 'keys'} "
                          f"(each of its kind): {fix}")
    return record


def read_jsonl(path, fix, keys=None):
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped; [] where there is no file). keys:
    {key: type} each must hold. A line that is not one (a record cut short by a kill, say), or lacks a key, is
    DamagedFile naming the file and the line."""
    if not os.path.exists(path):
        return []
    records = []
    for n, line in enumerate(read_bytes(path, fix).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):   # nested past json's depth too
            record = None
        if not isinstance(record, dict):
            raise DamagedFile(f'{path}: line {n} is not a JSON record (cut short?): {fix}')
        if any(not isinstance(record.get(k), kind) for k, kind in (keys or {}).items()):
            raise DamagedFile(f"{path}: line {n} does not hold {', '.join(keys)} (each of its kind): "
                              f"{fix}")
        records.append(record)
    return records


@contextlib.contextmanager
def replacing(path, made=None, replace=True):
    """Write `path` whole or not at all: yields a file opened on a temporary file beside it (temporary(); made: one
    made already, a claim's), which takes the name `path` once written: renamed over it, or where no file may be
    replaced (replace False: a new output) linked to it (move_new), never over a file put there meanwhile. On any
    failure (a full disk, Ctrl-C, a file put there) the temporary file is removed and `path` is left as it was; a
    failed write ends in one line (WriteError)."""
    path = os.fspath(path)   # a str or a pathlib.Path
    tmp = None
    try:
        tmp, f = made or temporary(path)
        with f:
            # what a killed command left goes (another command's own stays: the last one renamed wins)
            if not made:
                others_writing(path, tmp)
            yield f
            f.flush()
            if replace:
                os.replace(tmp, path)
            else:
                move_new(tmp, path)
    except BaseException as e:
        if tmp:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        # torch.save's error follows the OSError, or the Ctrl-C that cut its write
        while isinstance(e, Exception) and not isinstance(e, OSError):
            e = e.__cause__ or e.__context__
        if isinstance(e, OSError):
            raise cannot_write(path, e) from None
        if isinstance(e, KeyboardInterrupt):   # with its words: Ctrl-C, or the signal it stands for
            raise KeyboardInterrupt(*e.args) from None
        raise
    finally:
        HELD.discard(tmp)


# the temporary files this process writes now: held to a second command of this process (a test's) as to another
# process's, and never opened a second time (closing any copy of a file lets go of the process's lock on it)
HELD = set()


def temporary(path):
    """A new file to write `path` through: (its name, the file opened 'wb'). Beside `path`, named
    .<name>.<8 random hex digits>.tmp, created exclusively (O_EXCL, never through a link: where any file has the name,
    another is drawn), with the permissions open() gives a new file (tempfile.mkstemp's are 0600: an export its
    group could not read), and locked (lockf, which the kernel lets go when the process dies) while it is
    written."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f'.{name}.{secrets.token_hex(4)}.tmp')
        with contextlib.suppress(FileExistsError):
            f = open(tmp, 'xb', opener=no_follow)
            break
    # a file system without locks (NFS without lockd): held() cannot tell
    with contextlib.suppress(OSError):
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    HELD.add(tmp)
    return tmp, f


def others_writing(path, own):
    """The temporary files of `path` besides `own` that another command is writing now (held); those left by a
    killed command (their lock free) are removed."""
    folder, name = os.path.split(own)
    ours = re.compile(rf'\.{re.escape(os.path.basename(path))}\.[0-9a-f]{{8}}\.tmp')
    live = []
    for entry in os.scandir(folder):
        if entry.name != name and ours.fullmatch(entry.name):
            state = held(entry.path)
            if state:
                live.append(entry.path)
            elif state is False:
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
    return live


def held(path):
    """Whether a command holds the lock of `path` (a temporary file, a run's .lock): True where one does (this
    process's HELD, or another process, alive), False where none does (its process died), None where the file
    system cannot tell (no locks)."""
    if path in HELD:
        return True
    try:   # never waiting on a pipe of that name
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:   # gone meanwhile, a link
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):   # EAGAIN, EACCES: held
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def move_new(tmp, path):
    """Give the written temporary file `tmp` the name `path` where no file may be replaced: a hard link, refused where
    a file was put there meanwhile (File exists); on a file system without hard links (FAT) the name is taken
    exclusively, then renamed over."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        os.close(no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.replace(tmp, path)
    else:
        os.remove(tmp)


def cannot_write(path, e):
    """The one line for a file that could not be written, in open()'s words (e.strerror: a full disk, a
    permission, a link or a directory where the file goes)."""
    return WriteError(f'cannot write {path} ({e.strerror or e}): free some space, make it '
                      f'writable or move what is there away')


def no_follow(path, flags):
    """open()'s opener for every write: never through a link (ELOOP); a new file exclusively where flags say
    O_EXCL (open's 'x': a temporary file)."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o644)


def write_text(path, text):
    with replacing(path) as f:
        f.write(text.encode())


def set_aside(path):
    """Move a damaged file out of the way, kept beside it as <name>.damaged (.damaged.1, .damaged.2, ... where one is
    there: an older copy kept for its user is never replaced)."""
    kept = f'{path}.damaged'
    n = 0
    while os.path.lexists(kept):
        n += 1
        kept = f'{path}.damaged.{n}'
    os.rename(path, kept)


def sha256_of(path):
    """The file's SHA-256 (hex), or None for a name such as mae_vit_large."""
    if not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def save_figure(fig, path, **kwargs):
    """A matplotlib figure saved whole or not at all (replacing), in the format its file name
    says."""
    with replacing(path) as f:
        fig.savefig(f, format=os.path.splitext(path)[1][1:] or 'png', **kwargs)


def write_json(path, record):
    """`record` as indented JSON, whole or not at all (replacing)."""
    write_text(path, json.dumps(record, indent=2))


def git_commit():
    """`git rev-parse HEAD` of this repository ('' outside a git checkout), with ' (with uncommitted changes to
    *.py)' where the code that ran is not that commit's (run in the repository's root: a pathspec is relative to
    the folder git runs in)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a):
        return subprocess.run(['git', *a], capture_output=True, text=True, cwd=root).stdout.strip()
    head = git('rev-parse', 'HEAD')
    if head and git('status', '--porcelain', '--', '*.py'):
        return head + ' (with uncommitted changes to *.py)'
    return head


def cpu_name():
    """The processor's model name (speeds differ several-fold between CPUs: every result states
    it)."""
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:   # Linux's
        for line in f:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.machine()

# -----------------------------------------------------------------------------
# Where a command writes


def check_out_dir(path, flag, record=None):
    """Refuse, before any work, a folder to write into that cannot be written, as open() says: an unnamed
    temporary file made in the nearest folder that exists at or above it, and gone at once (a file, or under a
    file; no permission). Makes nothing. record: the file (its JSON) a command writes there beside the others: a
    folder that is not empty and holds none is someone else's (a user's own README.md), which the command would
    write over, as a run directory without its config.json is (util/rundir.py)."""
    foreign = record and os.path.isdir(path) and os.listdir(path)
    if foreign and not os.path.lexists(os.path.join(path, record)):
        raise ConfigError(f'{flag} {path} is not empty and holds no {record}: choose an empty or new {flag}')
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):   # / exists: the walk stops there at the latest
        parent = os.path.dirname(parent)
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:   # a file where a folder should be, no permission, a read-only file system
        raise ConfigError(f'{flag} {path} cannot be written into ({parent}: {e.strerror}): choose '
                          f'another {flag}') from None


def make_folders(folder, made):
    """os.makedirs(folder), the folders it makes added to `made` first, innermost first (remove_empty's
    order), so that even a partial make is undone."""
    d = os.path.abspath(folder)
    while not os.path.exists(d):   # / exists: the walk stops there at the latest
        made.append(d)
        d = os.path.dirname(d)
    os.makedirs(folder, exist_ok=True)


def remove_empty(folders):
    """Remove each of the folders a command made (innermost first) that it left empty; one written into
    stays."""
    for folder in folders:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def claimed(flag, *paths, replaces=False):
    """Claims of the output files `paths` (empty ones skipped), let go of at the end; replaces: an existing file may
    be replaced (ensemble.py's earlier result). A claim is the temporary file the output is written through
    (temporary), made when the command starts: a path where a file is (unless replaces), one that cannot be
    written, a file of a run that is live (its .lock held: whatever --overwrite says), and one another command
    claimed and is writing now are refused there. Yields write(path, write_to): write_to(file) writes the output into
    its claim, which then takes the name `path` (replacing), never over a file put there meanwhile. At the end the
    claims not written are removed, then the folders made for them: nothing is left at an output's name."""
    claims = {}   # path -> (its temporary file's name, the file, whether it replaces a file there)
    made = []     # the folders made for them, innermost first

    def write(path, write_to):
        tmp, f, replace = claims.pop(path)
        with replacing(path, (tmp, f), replace) as f:
            write_to(f)

    def refused(path, why, fix='move what is there away or'):
        return ConfigError(f'{flag} {path}: {why}: {fix} choose another {flag}')

    try:
        for path in paths:
            if not path:
                continue
            folder = os.path.dirname(os.path.abspath(path))
            replace = replaces and os.path.isfile(path) and not os.path.islink(path)
            if os.path.lexists(path) and not replace:   # an earlier result, another program's file
                raise refused(path, 'cannot write there (File exists)')
            # a live run's file (never this process's own run's: those are refused as cfg.INPUTS)
            lock = os.path.join(folder, '.lock')
            if os.path.basename(path) in RUN_FILES and held(lock):
                holder = read_bytes(lock, '').decode(errors='replace').strip() or 'another process'
                raise refused(path, f'a file of the run {holder} is writing now', 'wait for it to end, or')
            try:
                make_folders(folder, made)
                claims[path] = (*temporary(path), replace)
            except OSError as e:   # a file where a folder goes, no permission
                raise refused(path, f'cannot write there ({e.strerror})') from None
            if others_writing(path, claims[path][0]):
                raise refused(path, 'another command is writing it now', 'wait for it to end, or')
        yield write
    finally:
        for tmp, f, _ in claims.values():
            with contextlib.suppress(OSError):
                os.remove(tmp)
            f.close()
            HELD.discard(tmp)
        remove_empty(made)
