"""TorchScript archives read without running them (util/pretrained.py): the reader gives exactly what
torch.jit.load(path).state_dict() gives (names, order, dtypes, shapes, strides, values, shared storages) for scripted
and traced modules; an archive whose compiled __setstate__ writes a file or never returns is refused unrun wherever a
checkpoint is read, the file it would write unchanged, nothing hung."""
import subprocess
import sys
import warnings
import zipfile
from typing import Tuple

import pytest
import torch
import torch.nn as nn

from conftest import TINY, run_script, sub_env
from util.checkpoints import CheckpointError, read_file

warnings.filterwarnings('ignore', 'torch.jit', FutureWarning)   # torch's note that TorchScript is deprecated

# -----------------------------------------------------------------------------
# Honest archives: the oracle is torch.jit.load


class Inner(nn.Module):
    """Buffers of several dtypes, a transposed (non-contiguous) one, a tensor attribute that is no buffer, a
    Linear without bias (its parameter None), a MultiheadAttention (its q/k/v projections None)."""
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2, bias=False)
        self.mha = nn.MultiheadAttention(4, 2)
        self.register_buffer('steps', torch.arange(5))
        self.register_buffer('flags', torch.tensor([True, False, True]))
        self.register_buffer('table', torch.randn(3, 4).t())
        self.scale = torch.full((2,), 3.0)   # an attribute, not in the state dict

    def forward(self, x):
        return self.lin(x) * self.scale.sum()


class Outer(nn.Module):
    """Nested modules, a half and a bfloat16 parameter, parameters and a buffer that are views of one storage,
    a tied weight (one parameter under two names), a scalar parameter."""
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.twin = nn.Linear(3, 2, bias=False)
        self.twin.weight = self.inner.lin.weight
        base = torch.randn(6, 4)
        self.low = nn.Parameter(base[:3])
        self.high = nn.Parameter(base[3:, 1:])
        self.register_buffer('every_other', base[::2, ::2])
        self.half_weight = nn.Parameter(torch.randn(4, 3).half())
        self.brain = nn.Parameter(torch.randn(5).bfloat16())
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x):
        return self.inner(x) + self.twin(x) * self.logit_scale


class TextBlock(nn.Module):
    """OpenAI CLIP's text block: its causal mask a tensor attribute, not a buffer."""
    def __init__(self, width, mask):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, 2)
        self.ln_1 = nn.LayerNorm(width)
        self.attn_mask = mask

    def forward(self, x):
        y = self.ln_1(x)
        return x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]


class ClipLike(nn.Module):
    """CLIP's layout: an image tower's tensors under visual.*, a text tower of blocks in a Sequential, logit_scale,
    and the integer buffers OpenAI's archives carry; stored in half, as OpenAI's are."""
    def __init__(self, width=8, context=5):
        super().__init__()
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, width, 4, 4, bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(width))
        mask = torch.full((context, context), float('-inf')).triu(1)
        self.transformer = nn.Sequential(*[TextBlock(width, mask) for _ in range(2)])
        self.logit_scale = nn.Parameter(torch.ones([]) * 4.6)
        for k, v in (('input_resolution', 8), ('context_length', context), ('vocab_size', 10)):
            self.register_buffer(k, torch.tensor(v))

    def forward(self, image, text):
        return self.visual.conv1(image).flatten(1).sum(), self.transformer(text)


def scripted(path):
    torch.manual_seed(0)
    torch.jit.script(Outer()).save(str(path))
    return path


def traced(path):
    torch.manual_seed(0)
    clip = ClipLike().half().float()   # values a half can hold
    example = (torch.randn(1, 3, 8, 8), torch.randn(5, 1, 8))
    torch.jit.trace(clip, example).half().save(str(path))
    return path


def scripted_clip(path):
    torch.manual_seed(0)
    torch.jit.script(ClipLike()).save(str(path))
    return path


@pytest.mark.parametrize('make', [scripted, traced, scripted_clip])
def test_the_reader_gives_what_torch_jit_load_gives(tmp_path, make):
    path = str(make(tmp_path / 'model.pt'))
    ours, theirs = read_file(path), torch.jit.load(path).state_dict()
    assert list(ours) == list(theirs)
    for k, t in theirs.items():
        o = ours[k]
        assert (o.dtype, o.shape, o.stride(), o.storage_offset()) == (t.dtype, t.shape, t.stride(), t.storage_offset()), k
        assert torch.equal(o, t), k

    def shared(sd):   # which tensors share a storage
        ptr = {k: v.untyped_storage().data_ptr() for k, v in sd.items()}
        return {(a, b) for a in sd for b in sd if a < b and ptr[a] == ptr[b]}
    assert shared(ours) == shared(theirs)
    if make is scripted:   # the cases are there: views, a tie, attributes left out
        assert {('every_other', 'high'), ('every_other', 'low'), ('inner.lin.weight', 'twin.weight')} <= shared(ours)
        assert 'inner.scale' not in ours and 'inner.lin.bias' not in ours and ours['brain'].dtype == torch.bfloat16
    if make is traced:
        assert ours['logit_scale'].dtype == torch.half and 'transformer.0.attn_mask' not in ours


def test_a_damaged_record_is_refused(tmp_path):
    """A bit flipped inside a tensor's record: zipfile's CRC-32 check says so (torch.jit.load would not)."""
    path = scripted(tmp_path / 'model.pt')
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        record = z.read(next(n for n in z.namelist() if n.endswith('/data/0')))
    data[data.find(record) + 1] ^= 0x10   # inside its bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"it is damaged \(Bad CRC-32 for file '.*data/0'"):
        read_file(str(path))

# -----------------------------------------------------------------------------
# Hostile archives: their __setstate__ is code that torch.jit.load runs


class Writes(nn.Module):
    """Its __setstate__ writes 'XXXX' over the first bytes of the file at `victim` (torch.from_file, shared)."""
    def __init__(self, victim: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.victim = victim
        self.hit = 0

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return self.victim, self.weight, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.hit = int(torch.from_file(state[0], True, 4, dtype=torch.uint8).fill_(88).sum())
        self.victim, self.weight, self.training = state

    def forward(self, x):
        return x * self.weight


class Loops(Writes):
    """Its __setstate__ never returns."""
    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        n = 0
        while n >= 0:
            n += 1
        self.hit = n
        self.victim, self.weight, self.training = state


@torch.jit.script
class Hidden:
    """A scripted class (no module) whose __setstate__ writes the victim, held by a plain module."""
    def __init__(self, victim: str):
        self.victim = victim

    def __getstate__(self) -> Tuple[str, int]:
        return self.victim, 0

    def __setstate__(self, state: Tuple[str, int]) -> None:
        self.victim = state[0] + str(int(torch.from_file(state[0], True, 4, dtype=torch.uint8).fill_(88).sum()))


class Holds(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2))
        self.hidden = Hidden(victim)

    def forward(self, x):
        return x * self.weight


HOSTILE = {'writes': Writes, 'loops': Loops, 'hidden': Holds}


@pytest.fixture
def hostile(tmp_path):
    """(kind) -> (its archive, the victim file, the victim's bytes)."""
    def make(kind):
        victim = tmp_path / 'victim.txt'
        victim.write_bytes(b'precious data\n')
        path = tmp_path / f'{kind}.pt'
        torch.jit.script(HOSTILE[kind](str(victim))).save(str(path))
        return path, victim, victim.read_bytes()
    return make


def test_the_hostile_archives_do_what_they_say_when_torch_jit_loads_them(hostile, tmp_path):
    """The threat is real: torch.jit.load writes the victim (two archives), or never returns (a process of its own,
    still loading 5 s after torch was imported, where the archive's own size loads in milliseconds; then killed)."""
    for kind in ('writes', 'hidden'):
        path, victim, before = hostile(kind)
        torch.jit.load(str(path))
        assert victim.read_bytes() == b'XXXX' + before[4:]
    path, _, _ = hostile('loops')
    load = f'import torch; print("loading", flush=True); torch.jit.load({str(path)!r})'
    p = subprocess.Popen([sys.executable, '-c', load], env=sub_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'loading\n'
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=5)
    finally:
        p.kill()
        p.communicate()


@pytest.mark.parametrize('kind', list(HOSTILE))
def test_a_hostile_archive_is_refused_unrun(hostile, kind):
    path, victim, before = hostile(kind)
    with pytest.raises(CheckpointError, match=r'has its own __setstate__, code that torch\.jit\.load would run'):
        read_file(str(path))
    assert victim.read_bytes() == before


def places(tmp_path, archive):
    """Every command line that reads a checkpoint, with the archive as that checkpoint."""
    resumed, inspected = tmp_path / 'resumed', tmp_path / 'inspected'
    for d in (resumed, inspected):
        d.mkdir()
        (d / 'checkpoint.pt').write_bytes(archive.read_bytes())
    return {'--teacher (distill)': ['attention_distill.py', *TINY, '--out-dir', tmp_path / 'a', '--teacher', archive],
            '--teacher (copy)': ['attention_copy.py', *TINY, '--out-dir', tmp_path / 'b', '--teacher', archive],
            '--init': ['finetune.py', *TINY, '--out-dir', tmp_path / 'c', '--init', archive],
            'ensemble.py --models': ['ensemble.py', '--data', 'fake', '--num-workers', '0', '--models', archive],
            'evaluate.py --models': ['evaluate.py', '--data', 'fake', '--num-workers', '0', '--out', tmp_path / 'e',
                                     '--models', archive],
            'resumed --out-dir': ['finetune.py', *TINY, '--out-dir', resumed, '--resume', 'true'],
            'inspected --out-dir': ['finetune.py', *TINY, '--out-dir', inspected]}


@pytest.mark.parametrize('kind', ['writes', 'loops'])
def test_a_hostile_archive_changes_nothing_wherever_a_checkpoint_is_read(hostile, tmp_path, kind):
    path, victim, before = hostile(kind)
    for place, command in places(tmp_path, path).items():
        p = run_script(*command, timeout=120)   # a hang ends the test here (TimeoutExpired)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith('error:'), (place, p.stderr[-2000:])
        assert victim.read_bytes() == before, place
        if place != 'inspected --out-dir':   # a folder whose checkpoint is unreadable holds no run of ours
            assert '__setstate__' in lines[0], (place, lines[0])


def archive_with(tmp_path, name, data, compress=zipfile.ZIP_STORED):
    """A TorchScript archive of a small Linear with one more record `name` (data) appended."""
    path = tmp_path / 'edited.pt'
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), path)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # zipfile's note on a duplicate name
        with zipfile.ZipFile(path, 'a', compression=compress) as z:
            z.writestr(name, data)
    return path


def test_an_archive_with_two_records_of_one_name_is_refused(tmp_path):
    """torch.jit.load reads one copy of a name and this reader another: two teachers in one file, one SHA-256."""
    with zipfile.ZipFile(archive_with(tmp_path, 'x', b'')) as z:
        weight = next(n for n in z.namelist() if '/data/' in n)
        own = z.read(weight)
    path = archive_with(tmp_path, weight, bytes(len(own)))   # the same size, other values, a right CRC
    with pytest.raises(CheckpointError, match=f'two records named {weight}'):
        read_file(str(path))


def test_a_record_larger_than_its_file_is_refused_before_it_is_inflated(tmp_path):
    """A deflated record of 64 MB of zeros in a file of kilobytes: inflated (and held) before anything said no."""
    path = archive_with(tmp_path, 'edited/code/__torch__/big.py', bytes(2 ** 26), zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2 ** 20
    with pytest.raises(CheckpointError, match='declares 67,108,864 bytes, 16 times more than the whole file'):
        read_file(str(path))


def rewritten(tmp_path, edit):
    """A TorchScript archive of a small Linear written again record by record, edit(name, data) -> data (None:
    the record left out): each record whole, with its own CRC-32."""
    plain, path = tmp_path / 'plain.pt', tmp_path / 'edited.pt'
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), plain)
    with zipfile.ZipFile(plain) as z, zipfile.ZipFile(path, 'w') as out:
        for name in z.namelist():
            data = edit(name, z.read(name))
            if data is not None:
                out.writestr(name, data)
    return str(path)


@pytest.mark.parametrize('edit, says', [
    (lambda name, data: data[:-4] if name.endswith('/data/0') else data,
     'out of bounds for storage'),
    (lambda name, data: None if name.endswith('.py') and '/code/' in name else data,
     'There is no item named'),
    (lambda name, data: None if name.endswith('/data.pkl') else data, 'There is no item named'),
    (lambda name, data: data.replace(b'__parameters__ = [', b'__parameters__ = [f(), ')
     if name.endswith('.py') and '/code/' in name else data, 'malformed node'),
])
def test_a_record_missing_short_or_not_written_by_torchscript_is_one_line(tmp_path, edit, says):
    """A storage shorter than its tensor, a code record or data.pkl missing, a parameter list that is no constant:
    refused in the words of torch, zipfile or ast, in one line naming the file, never read on."""
    path = rewritten(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        read_file(path)
    said = str(e.value)
    assert said.startswith(f"'{path}' is not a readable PyTorch checkpoint") and says in said
    assert '\n' not in said
