"""
A file of weights (a checkpoint, a teacher, an --init) read without running any of its code, or refused in one line
naming it and the fix. torch.save's format is read by torch.load(weights_only=True): tensors and plain containers,
a pickled object that could run code refused unread; a TorchScript archive (OpenAI ships CLIP so) by
util/torchscript.py's reader, which executes nothing of the archive. Every record's CRC-32 is checked first, which
torch's reader does not do (a flipped bit would be read as a weight), and an architecture record out of range (ARCH)
is refused before any of its numbers is used.
"""
import re
import warnings
import zipfile

import torch

from util.config import DEPTH, SIZE
from util.errors import CheckpointError, UnreadableFile
from util.torchscript import ArchiveRefused, read_archive


def read_file(path):
    """A checkpoint file's contents (what torch.save wrote; a TorchScript archive's parameters and buffers), or one
    UnreadableFile line naming the file."""
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
