"""
The files that runs and reports leave behind and read back (checkpoints, done.json, results.json, metrics.jsonl, ...),
and the folders they go in. A file cut short by a kill or a full disk, edited by hand, or written by another program
is one error naming the file and the fix, never a traceback (a pickle is refused unread); a file is written to a
temporary file and renamed, never left half written; an output that cannot be written is refused before any work.
"""
import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import subprocess
import warnings
import zipfile

import torch

from util.config import DEPTH, SIZE, ConfigError
from util.torchscript import ArchiveRefused, read_archive

# what the scripts write in a run directory (reproduce.py its done.json, mae_pretrain.py its figure)
RUN_FILES = ('config.json', 'log.txt', 'metrics.jsonl', 'checkpoint.pt', 'done.json', 'reconstruction.png', '.lock')


class CheckpointError(RuntimeError):
    """A file of weights that cannot be read or used: one line naming it and the fix."""


class UnreadableFile(CheckpointError):
    """A file that is no checkpoint; `what` says why, the message adds the fix."""
    def __init__(self, what, fix):
        super().__init__(f'{what}: {fix}')
        self.what = what


def read_file(path):
    """A checkpoint file's contents: what torch.save wrote, read with weights_only=True (tensors and plain
    containers only: a pickled object that could run code is refused, not run), or the parameters and buffers of a
    TorchScript archive (OpenAI ships CLIP so), read by util/torchscript.py without running any of its code. Every
    record's CRC-32 is checked first (torch's reader does not: a flipped bit would be read as a weight). Anything
    else, or an architecture record out of range (ARCH), is one UnreadableFile line naming the file."""
    try:
        if records(path):   # torch's zip archive
            with zipfile.ZipFile(path) as z:
                damaged = z.testzip()   # the first record whose CRC-32 differs
            if damaged:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file '{damaged}'")
        if records(path, 'constants.pkl'):   # a TorchScript archive (torch.load's own test)
            return read_archive(path)
        with warnings.catch_warnings():   # torch's notes on formats; what is wrong is said below, in one line
            warnings.simplefilter('ignore')
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        what, fix = unreadable(path, e)
        raise UnreadableFile(f"'{path}' is not a readable PyTorch checkpoint: {what}", fix) from None
    arch = ckpt.get('arch') if isinstance(ckpt, dict) else None
    bad = [f'{k} {v!r}' for k, v in (arch if isinstance(arch, dict) else {}).items()
           if k in ARCH and not in_range(v, *ARCH[k])]
    if bad:   # before a 0 divides or a string multiplies where it is used
        raise UnreadableFile(f"'{path}' records an architecture with {', '.join(bad)}, of another type or out of "
                             f"range: it was edited or is damaged", 'take another copy of it')
    return ckpt


# the numbers an architecture record ('arch', VisionTransformer's keywords) may hold: (least, most), whole numbers
# where the least is one, else floats too
ARCH = {'img_size': (1, SIZE), 'patch_size': (1, SIZE), 'in_chans': (1, SIZE), 'num_classes': (0, SIZE),
        'embed_dim': (1, SIZE), 'depth': (1, DEPTH), 'num_heads': (1, DEPTH), 'reg_tokens': (0, SIZE),
        'mlp_ratio': (1e-3, SIZE), 'norm_eps': (1e-12, 1.0), 'drop_path_rate': (0.0, 1.0)}


def in_range(value, least, most):
    return (type(value) is int or type(value) is float and type(least) is float) and least <= value <= most


def records(path, name='data.pkl'):
    """Whether a zip file has a record `name` (in torch's archive folder); None: not a whole zip file."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.rpartition('/')[2] == name for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return None


LEGACY = b'\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19'   # torch.save's format before zip files (torch < 1.6)


def unreadable(path, error):
    """(what is wrong with a file torch refused to read, the fix), never torch's advice to load it with
    weights_only=False: that would run whatever code a pickle carries."""
    if isinstance(error, PermissionError):
        return 'it cannot be opened (permission denied)', 'check its permissions'
    if isinstance(error, ArchiveRefused):
        return error.args
    if 'CRC-32' in str(error):   # zipfile's words
        return f'it is damaged ({error}: a changed byte)', 'copy or download it again'
    with open(path, 'rb') as f:
        head = f.read(len(LEGACY))
    refused = re.search(r"GLOBAL (\S+)", str(error))   # the object refused, as the weights-only unpickler names it
    if not head:
        return 'it is empty (0 bytes; an interrupted copy or download?)', 'copy or download it again'
    if refused:
        return (f'it holds a pickled Python object ({refused[1]}), not only tensors, refused without '
                f'running it (a pickle can run code)', 'save the tensors alone: torch.save(model.state_dict(), path)')
    if head.startswith(LEGACY) or head.startswith(b'PK') and records(path) in (None, True):   # no zip, or torch's
        return 'it is truncated or damaged (it does not read to its end)', 'copy or download it again'
    if head.startswith(b'\x80'):
        return ('it is a pickle, not a file torch.save wrote; refused unread (a pickle can run code)',
                'save the tensors with torch.save(model.state_dict(), path)')
    return ('it is neither a file torch.save wrote nor a TorchScript archive',
            'give the checkpoint file (.pt, .pth) or a name such as mae_vit_base')


class DamagedFile(ConfigError):
    """A file that does not hold what the program that wrote it writes."""


class WriteError(ConfigError):
    """A file that could not be written whole (a full disk, a file size limit, a read-only disk). `what`: the message
    without its last words ('and run the command again'), which a training run replaces by how to continue it."""
    def __init__(self, what, again=' and run the command again'):
        super().__init__(what + again)
        self.what = what


def read_bytes(path, fix):
    """A file's bytes; one it cannot read is DamagedFile: '<path>: cannot read it (<why>): <fix>'."""
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
        raise DamagedFile(f'{path} holds a JSON {type(record).__name__}, not the object expected: {fix}')
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
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        while isinstance(e, Exception) and not isinstance(e, OSError):   # torch.save's error follows the OSError
            e = e.__cause__ or e.__context__                              # or the Ctrl-C that cut its write
        if isinstance(e, OSError):
            raise cannot_write(path, e) from None
        if isinstance(e, KeyboardInterrupt):   # with its words: Ctrl-C, or the signal it stands for (SIGTERM)
            raise KeyboardInterrupt(*e.args) from None
        raise


def cannot_write(path, e):
    """The one line for a file that could not be written (a full disk, a file size limit, a read-only disk, or a
    path of the wrong kind: a directory where the file goes, a file where a folder on its path should be)."""
    why = e.strerror or ' '.join(str(e).split())[:200] or type(e).__name__
    if e.errno in (errno.EISDIR, errno.ENOTDIR):
        kind = 'is a directory' if e.errno == errno.EISDIR else 'has a file where a folder of its path should be'
        return WriteError(f'cannot write {path}: it {kind}: move that away, or choose another path', '')
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):   # no space to free: a permission
        return WriteError(f'cannot write {path} ({why}): make {os.path.dirname(os.path.abspath(path))} writable '
                          f'(or choose another path)')
    return WriteError(f'cannot write {path} ({why}): free some space')


def write_text(path, text):
    with replacing(path) as tmp, open(tmp, 'w') as f:
        f.write(text)


def append_text(path, text):
    """Add text at the end of a file (a log): what it held stays whole if this fails, which is one WriteError line."""
    try:
        with open(path, 'a') as f:
            f.write(text)
    except OSError as e:
        raise cannot_write(path, e) from None


def sha256_of(path):
    """The file's SHA-256 (hex), or None for a name such as mae_vit_large."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2 ** 20), b''):
            digest.update(block)
    return digest.hexdigest()


def save_figure(fig, path, **kwargs):
    """A matplotlib figure saved whole or not at all (replacing), in the format its file name says."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format=os.path.splitext(path)[1][1:] or 'png', **kwargs)


def write_json(path, record):
    """`record` as indented JSON, whole or not at all (replacing)."""
    write_text(path, json.dumps(record, indent=2))


def check_out_dir(path, flag, record=None, files=()):
    """Refuse, before any work, a folder to write into that is a file, lies under a file, or cannot be made
    or written there (no permission, a read-only file system). Makes nothing. record, files: what a command
    writes there, `record` (its JSON) beside the others; any of them in a folder without `record` is someone
    else's (a user's own README.md), which the command would replace: refused, as it replaces only its own."""
    found = [f for f in files if os.path.lexists(os.path.join(path, f))]
    if record and found and not os.path.lexists(os.path.join(path, record)):
        raise ConfigError(f"{flag} {path} holds {', '.join(found)} but no {record} saying this command made them: "
                          f"choose another {flag}")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'{flag} {path} is a file, not a folder: choose another {flag}')
    writable(flag, path, path, 'is a file, so no folder can be made there',
             'cannot be written (read-only, or no permission)')


def writable(flag, path, parent, is_file='is a file', denied='cannot be written'):
    """Refuse `path` unless the nearest folder that exists at or above `parent` (the one written into, or made in)
    is a folder that can be written: '<flag> <path>: <that folder> <is_file or denied>: choose another <flag>'."""
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):   # also false when read-only
        raise ConfigError(f'{flag} {path}: {parent} {denied if os.path.isdir(parent) else is_file}: choose '
                          f'another {flag}')


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
    return head + (' (with uncommitted changes to *.py)' if head and git('status', '--porcelain', '--', '*.py') else '')


def cpu_name():
    """The processor's model name (speeds differ several-fold between CPUs: every result states it)."""
    if os.path.exists('/proc/cpuinfo'):
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()

