"""
The files that runs and reports leave behind and read back (config.json, done.json, results.json, metrics.jsonl, ...);
checkpoints are read by util/checkpoints.py. A file cut short by a kill or a full disk, edited by hand, or written by
another program is one error naming the file and the fix, never a traceback; a file is written to a temporary file
and renamed, never left half written, every file opened for writing by one opener (no_follow: never through a link).

Where a command writes, refused before any work where it cannot be written, as open() itself says (the folder
and the errno). A run directory is util/rundir.py's; the other outputs are of two kinds:

    check_out_dir(path, '--out-dir')    a folder a tool writes its report into (tools/benchmark.py, ...)
    claimed('--out', path)              a file written once the work is done (evaluate.py --out, ensemble.py --out,
                                        mae_pretrain.py --export, never a file of its run: util/rundir.py), claimed
                                        when the command starts: one that exists or cannot be written is refused
                                        there, so that two commands given one path never both write it:

    with claimed('--out', path) as write:      # path made empty, exclusively: a second command is refused at once
        ...                                    # the work
        write(path, lambda f: f.write(data))   # written whole, only over its own empty claim

A command that ends without writing (an error, Ctrl-C) removes its empty claim and the folders it made for it.
"""
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import tempfile

from util.errors import ConfigError, DamagedFile, WriteError

# what the scripts write in a run directory (reproduce.py its done.json, mae_pretrain.py its figure)
RUN_FILES = ('config.json', 'log.txt', 'metrics.jsonl', 'checkpoint.pt', 'checkpoint.pt.tmp',
             'done.json', 'reconstruction.png', '.lock')


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
    except ValueError as e:   # JSONDecodeError, or bytes that are not UTF-8
        raise DamagedFile(f'{path} is not JSON, cut short or damaged ({e}): {fix}') from None
    keys = keys or {}
    if not isinstance(record, dict) or \
            any(not isinstance(record.get(k), kind) for k, kind in keys.items()):
        raise DamagedFile(f"{path} does not hold a JSON object with {', '.join(keys) or 'keys'} "
                          f"(each of its kind): {fix}")
    return record


def read_jsonl(path, fix):
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped; [] where there is no file). A line
    that is not one (a record cut short by a kill, say) is DamagedFile naming the file and the line."""
    if not os.path.exists(path):
        return []
    records = []
    for n, line in enumerate(read_bytes(path, fix).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise DamagedFile(f'{path}: line {n} is not a JSON record (cut short?): {fix}')
        records.append(record)
    return records


@contextlib.contextmanager
def replacing(path):
    """Write `path` whole or not at all: yields a file opened on a temporary name beside it (never through a link,
    no_follow), renamed over `path` once written. On any failure (a full disk, Ctrl-C) the temporary file is
    removed and `path` is left as it was; a failed write ends in one line (WriteError)."""
    path = os.fspath(path)   # a str or a pathlib.Path
    tmp = path + '.tmp'
    try:
        # one left by a kill, or a link: never written through
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        with open(tmp, 'xb', opener=no_follow) as f:
            yield f
        os.replace(tmp, path)
    except BaseException as e:
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


def cannot_write(path, e):
    """The one line for a file that could not be written, in open()'s words (e.strerror: a full disk, a
    permission, a link or a directory where the file goes)."""
    return WriteError(f'cannot write {path} ({e.strerror or e}): free some space, make it '
                      f'writable or move what is there away')


def no_follow(path, flags):
    """open()'s opener for every write: never through a link (ELOOP); a new file exclusively where flags say
    O_EXCL (open's 'x': the temporary file replacing() writes, a claim)."""
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
    """Claims of the output files `paths` (empty ones skipped), let go of at the end; replaces: an existing file
    may be replaced (ensemble.py's earlier result) and is not claimed. Each claim makes its path an empty file of
    this command's, never opening one that exists (O_EXCL, O_NOFOLLOW): one there already is refused (a second
    command writing the same path). Yields write(path, write_to): write_to(file) writes the output into a binary
    file, renamed over the claim once whole, if the claim is still this command's (refused in one line if another
    program took the path meanwhile). At the end the claims not written (still empty and this command's: a written
    one is a new file) are removed, then the folders made for them."""
    claims = {}   # path -> the stat of its empty claim
    made = []     # the folders made for them, innermost first

    def own(path):
        with contextlib.suppress(OSError):
            stat = os.lstat(path)
            return os.path.samestat(stat, claims[path]) and stat.st_size == 0
        return False

    def write(path, write_to):
        if path in claims and not own(path):
            raise WriteError(f'{flag} {path} was removed or replaced while this command ran '
                             f'(kept as it is): choose another {flag}')
        with replacing(path) as f:
            write_to(f)

    try:
        for path in paths:
            if not path or replaces and os.path.isfile(path) and not os.path.islink(path):
                continue
            try:
                make_folders(os.path.dirname(os.path.abspath(path)), made)
                fd = no_follow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except OSError as e:   # File exists: another command writing it now, an earlier result
                raise ConfigError(f'{flag} {path}: cannot write there ({e.strerror}): move what is '
                                  f'there away or choose another {flag}') from None
            claims[path] = os.fstat(fd)
            os.close(fd)
        yield write
    finally:
        for path in claims:
            if own(path):
                with contextlib.suppress(OSError):
                    os.remove(path)
        remove_empty(made)
