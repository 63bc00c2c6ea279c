"""
The files that runs and reports leave behind and read back (config.json, done.json, results.json, metrics.jsonl, ...);
checkpoints are read by util/checkpoints.py, and where a command may write is util/outputs.py's. A file cut short by
a kill or a full disk, edited by hand, or written by another program is one error naming the file and the fix, never
a traceback; a file is written to a temporary file and renamed, never left half written.
"""
import contextlib
import errno
import hashlib
import json
import os
import platform
import subprocess

from util.errors import DamagedFile, WriteError

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
    data = read_bytes(path, fix)
    try:
        record = json.loads(data)
    except ValueError as e:   # JSONDecodeError, or bytes that are not UTF-8
        raise DamagedFile(f'{path} is not JSON, cut short or damaged ({e}): {fix}') from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DamagedFile(f'{path} holds a JSON {kind}, not the object expected: {fix}')
    bad = [k for k, kind in (keys or {}).items() if not isinstance(record.get(k), kind)]
    if bad:
        raise DamagedFile(f"{path} lacks {', '.join(bad)} (missing or of another kind): {fix}")
    return record


def read_jsonl(path, fix):
    """The JSON objects of a JSON-lines file, one a line (blank lines skipped). A line that is not one (a
    record cut short by a kill, say) is DamagedFile naming the file and the line."""
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
    """Write `path` whole or not at all: yields a temporary name beside it, renamed over it once written. On any
    failure (a full disk, Ctrl-C) the temporary file is removed and `path` is left as it was; a failed write
    ends in one line (WriteError)."""
    path = os.fspath(path)
    tmp = path + '.tmp'
    try:
        # one left by a kill, or a link: never written through
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        yield tmp
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
    """The one line for a file that could not be written (a full disk, a file size limit, a read-only disk, or a
    path of the wrong kind: a directory where the file goes, a file where a folder on its path should be)."""
    why = e.strerror or ' '.join(str(e).split())[:200] or type(e).__name__
    if e.errno == errno.ELOOP:   # opened with O_NOFOLLOW
        return WriteError(f'cannot write {path}: it is a link, which this would write through: put '
                          f'a copy of its file there, or remove it', '')
    if e.errno == errno.EISDIR:
        return WriteError(f'cannot write {path}: it is a directory: move that away, or choose '
                          f'another path', '')
    if e.errno == errno.ENOTDIR:
        return WriteError(f'cannot write {path}: it has a file where a folder of its path should '
                          f'be: move that away, or choose another path', '')
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):   # no space to free: a permission
        folder = os.path.dirname(os.path.abspath(path))
        return WriteError(f'cannot write {path} ({why}): make {folder} writable (or choose another '
                          f'path)')
    return WriteError(f'cannot write {path} ({why}): free some space')


def write_text(path, text):
    with replacing(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


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
    with replacing(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or 'png', **kwargs)


def write_json(path, record):
    """`record` as indented JSON, whole or not at all (replacing)."""
    write_text(path, json.dumps(record, indent=2))


def read_lines(path):
    """The non-blank lines of a text file ([] if there is none)."""
    if not os.path.exists(path):
        return []
    text = read_bytes(path, 'move it away').decode(errors='replace')
    return [line for line in text.splitlines() if line.strip()]


def git_commit(*args, cwd=None):
    """`git rev-parse HEAD` of this repository ('' outside a git checkout), with ' (with uncommitted changes to
    *.py)' where the code that ran is not that commit's; args: another git command, whose output it returns."""
    def git(*a):
        return subprocess.run(['git', *a], capture_output=True, text=True,
                              cwd=cwd or os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    if args:
        return git(*args)
    head = git('rev-parse', 'HEAD')
    if head and git('status', '--porcelain', '--', '*.py'):
        return head + ' (with uncommitted changes to *.py)'
    return head


def cpu_name():
    """The processor's model name (speeds differ several-fold between CPUs: every result states
    it)."""
    if os.path.exists('/proc/cpuinfo'):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()

