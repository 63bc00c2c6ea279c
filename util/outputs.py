"""
Where a command writes, refused before any work where it cannot be written, as open() itself says (the folder
and the errno). A run directory is util/rundir.py's; the other outputs are of two kinds:

    check_out_dir(path, '--out-dir')    a folder a tool writes its report into (tools/benchmark.py, ...)
    check_output('--out', path)         a file written once the work is done (mae_pretrain.py --export, evaluate.py
                                        --out, ensemble.py --out), then claimed when the command starts, so that two
                                        commands given one path never both write it:

    with claimed('--out', path) as out:        # path made empty, exclusively: a second command is refused at once
        ...                                    # the work
        out.write(path, lambda f: f.write(data))   # written whole, only over its own empty claim

A command that ends without writing (an error, Ctrl-C) removes its empty claim and the folders it made for it.
"""
import contextlib
import os
import tempfile

from util.errors import ConfigError, WriteError
from util.files import RUN_FILES, replacing


def writable(flag, path, parent):
    """Refuse `path` unless a file can be made in the nearest folder that exists at or above `parent` (the one
    written into, or made in), as open() says: an unnamed temporary file made there and gone at once, so nothing is
    left. '<flag> <path>[: <that folder>] cannot be written into (<the errno's words>): choose another <flag>'."""
    while not os.path.lexists(parent):   # / exists: the walk stops there at the latest
        parent = os.path.dirname(parent)
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:   # a file where a folder should be, no permission, a read-only file system
        where = path if parent == os.path.abspath(path) else f'{path}: {parent}'
        raise ConfigError(f'{flag} {where} cannot be written into ({e.strerror}): choose another '
                          f'{flag}') from None


def check_out_dir(path, flag, record=None, files=()):
    """Refuse, before any work, a folder to write into that cannot be written (writable: a file, or under a file; no
    permission). Makes nothing. record, files: what a command writes there, `record` (its JSON) beside the others;
    any of them in a folder without `record` is someone else's (a user's own README.md), which the command would
    replace: refused, as it replaces only its own."""
    found = [f for f in files if os.path.lexists(os.path.join(path, f))]
    if record and found and not os.path.lexists(os.path.join(path, record)):
        raise ConfigError(f"{flag} {path} holds {', '.join(found)} but no {record} saying this "
                          f"command made them: choose another {flag}")
    writable(flag, path, os.path.abspath(path))


def check_output(flag, path, out_dir=None, folder=False):
    """Refuse, before any work, an output written only once the work is done: a file of the run directory
    out_dir (its checkpoint, its figure), one that exists already, or one whose folder cannot be written.
    folder: path is a directory to write files into (it may exist)."""
    parent = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    if out_dir and os.path.basename(path) in RUN_FILES + ('checkpoint.pt.tmp',) and \
            os.path.realpath(parent) == os.path.realpath(out_dir):
        raise ConfigError(f'{flag} {path} is a file of the run directory --out-dir {out_dir}: choose '
                          f'a path outside it, or another name')
    if os.path.lexists(path) and not folder:
        raise ConfigError(f'{flag} {path} exists: move it away or choose another {flag}')
    writable(flag, path, parent)


class Claims:
    """The output files of one command (claimed: their (device, inode) while they are its empty claims; None: a file
    it may replace), the folders it made for them, and the ones it has written."""

    def __init__(self, flag):
        self.flag = flag
        self.claimed = {}         # path -> (device, inode) of its empty claim, or None: may replace
        self.made = []            # the folders made for them, innermost first
        self.written = set()

    def take(self, path, replaces=False):
        """Make `path` an empty file of this command's, never opening one that exists (O_EXCL, O_NOFOLLOW): one
        there already is refused (a second command writing the same path), unless `replaces` allows it."""
        if replaces and os.path.isfile(path) and not os.path.islink(path):
            self.claimed[path] = None
            return
        try:
            make_folders(os.path.dirname(os.path.abspath(path)), self.made)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            raise ConfigError(f'{self.flag} {path} exists (another command writing it now, or an '
                              f'earlier result): move it away or choose another {self.flag}') from None
        except OSError as e:
            raise ConfigError(f'{self.flag} {path}: cannot write there ({e.strerror}): choose '
                              f'another {self.flag}') from None
        stat = os.fstat(fd)
        os.close(fd)
        self.claimed[path] = stat.st_dev, stat.st_ino

    def own(self, path):
        """Whether `path` is still this command's empty claim (or a file it may replace)."""
        if self.claimed[path] is None:
            return True
        try:
            stat = os.lstat(path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self.claimed[path] and stat.st_size == 0

    def write(self, path, write):
        """write(file) writes the output into a binary file: to a temporary file, renamed over the claim once whole,
        if the claim is still this command's (refused in one line if another program took the path meanwhile)."""
        if not self.own(path):
            raise WriteError(f'{self.flag} {path} was replaced while this command ran (it holds '
                             f'another file now, kept as it is): choose another {self.flag}')
        with replacing(path) as tmp, open(tmp, 'wb') as f:
            write(f)
        self.written.add(path)

    def let_go(self):
        """Remove the claims not written (if still empty and this command's), then the folders made
        for them."""
        for path in self.claimed:
            if path not in self.written and self.claimed[path] is not None and self.own(path):
                with contextlib.suppress(OSError):
                    os.remove(path)
        remove_empty(self.made)


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
    may be replaced (ensemble.py's earlier result) and is not claimed."""
    claims = Claims(flag)
    try:
        for path in paths:
            if path:
                claims.take(path, replaces)
        yield claims
    finally:
        claims.let_go()
