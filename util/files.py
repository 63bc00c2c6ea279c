"""
The files that runs and reports leave behind and read back (config.json, done.json, results.json, metrics.jsonl, ...);
checkpoints are read by util/checkpoints.py. A file cut short by a kill or a full disk, edited by hand, or written by
another program is one error naming the file and the fix, never a traceback.

A file is written whole, the standard library's way (replacing): into a named temporary file beside it
(tempfile.NamedTemporaryFile: .<name>.<8 random characters>.tmp, created exclusively, never through a link), then
given its name: os.replace over the file there where it may be replaced, else os.link, which refuses a name taken
at that very moment. A command killed mid-write leaves its temporary file, named as its file's; the next command
that writes the same file removes it first (no lock is probed: a run's own files are written under its lock,
util/rundir.py).

Where a command writes, refused before any work where it cannot be written, as open() itself says (the folder
and the errno). A run directory is util/rundir.py's; the other outputs are of two kinds:

    check_out_dir(path, '--out-dir')    a folder a tool writes its report into (tools/benchmark.py, ...)
    check_outputs('--out', path)        a file written once the work is done (evaluate.py --out, ensemble.py --out,
                                        mae_pretrain.py --export, tools.curves --out), one policy for all: a file
                                        there is refused unless it is the command's own earlier result (or its
                                        flag says so), when the command starts and again at the moment it writes:

    write = check_outputs('--out', path, may_replace=is_result)   # refused here: nothing is done
    ...                                                           # the work
    write(path, lambda f: f.write(data))   # written whole, then given the name path, never over a file put there

Nothing is at the output's name until the output is whole: a command that ends without writing (an error, Ctrl-C,
a kill -9) leaves no file there, and the same command run again goes on.
"""
import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import stat
import subprocess
import tempfile

from util.errors import ConfigError, DamagedFile, WriteError

# what the scripts write in a run directory (reproduce.py its done.json, mae_pretrain.py its figure)
RUN_FILES = ('config.json', 'log.txt', 'metrics.jsonl', 'checkpoint.pt', 'done.json',
             'reconstruction.png', '.lock', 'ended.json')


def read_regular(path):
    """A file's bytes, read only where it is a regular file; else OSError saying what it is. A pipe named where a file
    is expected would hold its reader until something writes to it: it is opened without waiting (O_NONBLOCK), looked
    at, and refused, as a folder or a device is. Every reader of a file a user names or a run left reads through
    here (read_bytes, util/checkpoints.read_whole)."""
    with open(path, 'rb', opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            kind = 'Is a directory' if stat.S_ISDIR(mode) else 'Is a pipe' if stat.S_ISFIFO(mode) else \
                'Is not a regular file'
            raise OSError(errno.EINVAL, kind, path)
        return f.read()


def read_bytes(path, fix):
    """A file's bytes; one it cannot read is DamagedFile: '<path>: cannot read it (<why>):
    <fix>'."""
    try:
        return read_regular(path)
    except OSError as e:   # a directory, a pipe, no permission
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
def replacing(path, may_replace=lambda path: True):
    """Write `path` whole or not at all, the standard library's way: yields a named temporary file beside it
    (NamedTemporaryFile, created exclusively, never through a link), which takes the name `path` once written:
    os.replace over the file there where may_replace(path) allows it (a run's own files, its lock held; an output's
    earlier result), else os.link, which refuses a name taken (File exists) at the moment of writing, never over a
    file put there meanwhile. What a killed command left (LEFT) goes first. On any failure (a full disk, Ctrl-C) the
    temporary file is removed and `path` is left as it was; a failed write ends in one line (WriteError)."""
    path = os.fspath(path)   # a str or a pathlib.Path
    folder, name = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        remove_left(folder, name)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f'.{name}.', suffix='.tmp', delete=False) as f:
            tmp = f.name
            os.fchmod(f.fileno(), 0o666 & ~UMASK)   # mkstemp's 0600: an export its group could not read
            yield f
        # a file it may replace (never a pipe opened to ask), or a folder: os.replace's own refusal (Is a directory)
        if os.path.isfile(path) and may_replace(path) or os.path.isdir(path) and not os.path.islink(path):
            os.replace(tmp, path)
        else:
            link(tmp, path)
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


# a temporary file's name: .<name>.<tempfile's 8 random characters>.tmp
LEFT = r'\.{name}\.[a-z0-9_]{{8}}\.tmp'

# the permissions open() gives a new file (read once, at import: os.umask can only be read by setting it)
UMASK = os.umask(0o22)
os.umask(UMASK)


def remove_left(folder, name):
    """Remove the temporary files of `name` in `folder` that a killed command left (their names say whose they
    are: LEFT), before the same file is written again."""
    ours = re.compile(LEFT.format(name=re.escape(name)))
    for entry in os.scandir(folder):
        if ours.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):   # gone meanwhile
                os.remove(entry.path)


def link(tmp, path):
    """Give the written temporary file `tmp` the name `path` where no file may be replaced: a hard link, refused
    where a file is (File exists); on a file system without hard links (FAT) the name is taken exclusively, then
    renamed over."""
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


def git(*args):
    """What `git args` prints in this repository's root ('' outside a git checkout: a pathspec is relative to the
    folder git runs in)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(['git', *args], capture_output=True, text=True, cwd=root).stdout.strip()


def git_commit():
    """`git rev-parse HEAD` of this repository ('' outside a git checkout), with ' (with uncommitted changes to
    *.py)' where the code that ran is not that commit's."""
    head = git('rev-parse', 'HEAD')
    if head and git('status', '--porcelain', '--', '*.py'):
        return head + ' (with uncommitted changes to *.py)'
    return head


def page_commit(dirty=False, flag='--dirty true'):
    """{'git_commit': the commit a results page is made from, 'clean': whether its code (*.py, *.sh) holds no
    uncommitted change}: a page is made from committed code, so that its numbers are that commit's. A tree with such
    changes is refused in one line unless `dirty` (the flag `flag`), and the page then records that it was not clean."""
    head = git('rev-parse', 'HEAD')
    if not head:   # no git checkout (an archive): nothing to say either way
        return {'git_commit': 'unknown', 'clean': None}
    changed = git('status', '--porcelain', '--', '*.py', '*.sh').splitlines()
    if changed and not dirty:
        raise ConfigError(f"{len(changed)} file(s) of code have uncommitted changes ({changed[0].split()[-1]}, ...): a "
                          f"results page is made from committed code: commit them, or pass {flag} to make a page "
                          f"that says it was not")
    return {'git_commit': head, 'clean': not changed}


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
    """Refuse, before any work, a folder to write into that cannot be written, as open() says (cannot_write_into).
    Makes nothing. record: the file (its JSON) a command writes there beside the others: a folder that is not empty
    and holds none is someone else's (a user's own README.md), which the command would write over, as a run
    directory without its config.json is (util/rundir.py)."""
    foreign = record and os.path.isdir(path) and os.listdir(path)
    if foreign and not os.path.lexists(os.path.join(path, record)):
        raise ConfigError(f'{flag} {path} is not empty and holds no {record}: choose an empty or new {flag}')
    why = cannot_write_into(path)
    if why:
        raise ConfigError(f'{flag} {path} cannot be written into ({why}): choose another {flag}')


def cannot_write_into(folder):
    """'' where a file can be made in `folder` (or in the folders a command would make for it), else why not, as
    open() says: '<the nearest folder that exists>: <errno's words>' (a file, or under a file; no permission). An
    unnamed temporary file made there and gone at once: nothing is left."""
    parent = os.path.abspath(folder)
    while not os.path.lexists(parent):   # / exists: the walk stops there at the latest
        parent = os.path.dirname(parent)
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:   # a file where a folder should be, no permission, a read-only file system
        return f'{parent}: {e.strerror}'
    return ''


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


def check_outputs(flag, *paths, may_replace=None, own='an earlier result of this command', overwrite='', reads=(),
                  formats=()):
    """Refuse, before any work, output files (`paths`, empty ones skipped) the command could not write at its end: a
    file there that may_replace(path) does not allow replacing (None: none may be; `own`, an earlier result of the
    same command, or what the flag `overwrite` allows), a directory or a pipe, a file it reads (`reads`), a file
    of a run folder (named as one, beside its config.json or .lock: util/rundir.py's alone), a name whose format
    (its suffix) is none of `formats` (where the name chooses it), a folder that cannot be written. Makes nothing.
    Returns write(path, write_to): write_to(file) writes the output whole (replacing), the same rule held at that
    moment: a file put there meanwhile is kept and the write refused in one line."""
    for path in filter(None, paths):
        folder = os.path.dirname(os.path.abspath(path))
        kind = os.path.splitext(path)[1][1:].lower()
        run_file = os.path.basename(path) in RUN_FILES and \
            any(os.path.lexists(os.path.join(folder, f)) for f in ('config.json', '.lock'))
        if formats and kind not in formats:
            raise ConfigError(f"{flag} {path}: no format of that name ({', '.join(formats)}): name a file "
                              f"ending in one of them")
        if os.path.realpath(path) in {os.path.realpath(r) for r in reads if r}:
            raise ConfigError(f'{flag} {path} is a file this command reads: name another file')
        if run_file:
            raise ConfigError(f'{flag} {path} is a file of the run in {folder}: name a file outside a run folder')
        if os.path.isdir(path):
            raise ConfigError(f'{flag} {path} is a directory: name a file')
        if os.path.exists(path) and not os.path.isfile(path):   # opened, a pipe would block for ever
            raise ConfigError(f'{flag} {path} is not a regular file (a pipe or a device): name a file')
        if os.path.lexists(path) and not (may_replace and may_replace(path)):
            also = f', or pass {overwrite} true' if overwrite else ''
            raise ConfigError(f'{flag} {path} exists and is not {own}: move it away or choose another '
                              f'{flag}{also}')
        why = cannot_write_into(folder)
        if why:
            raise ConfigError(f'{flag} {path}: cannot write there ({why}): choose another {flag}')

    def write(path, write_to):
        made = []   # the folders made for it, gone again if the write fails
        try:
            make_folders(os.path.dirname(os.path.abspath(path)), made)
            with replacing(path, may_replace or (lambda path: False)) as f:
                write_to(f)
        except BaseException:
            remove_empty(made)
            raise
    return write
