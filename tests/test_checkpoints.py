"""util/checkpoints.py, the reader of every model file a user brings (a teacher, an --init, an ensemble's or
evaluation's --models, a resumed checkpoint): files of weights alone (their heads stated, never guessed), the
wrappers other programs save weights in, a record compared with what it is loaded into, and every damage a file can
carry or be edited into (one table over every reader), pickles that carry code (never run), records of more blocks or
memory than a flag allows. Each case: one line naming the file and a non-zero exit where refused, nothing written;
read right otherwise."""
import hashlib
import os
import pickle
import zipfile

import pytest
import torch

import attention_copy
import attention_distill
from conftest import SHAPE, TINY, assert_one_line_error, random_vit, run_in_process
from conftest import finetune as finetune_tiny
import ensemble
import evaluate
import finetune
from util.checkpoints import CheckpointError, build_from_checkpoint, load_weights, read_checkpoint
from vit import VisionTransformer


SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k.replace('_', '-')}", v)]


@pytest.fixture(scope='module')
def plain8(tmp_path_factory):
    """An 8-head, 64-wide classifier saved as torch.save(model.state_dict()): timm's names, no record."""
    path = tmp_path_factory.mktemp('brought') / 'plain8.pt'
    torch.save(random_vit().state_dict(), path)
    return path


@pytest.mark.parametrize('script', [attention_distill, attention_copy])
def test_a_teacher_of_weights_alone_is_refused_until_its_heads_are_stated(plain8, tmp_path, monkeypatch, script):
    """It trained to the end as a 1-head teacher (64 // 64), maps and student alike; now the heads are stated."""
    out = tmp_path / 'run'
    msg = run_in_process(monkeypatch, script, *TINY, '--teacher', plain8, '--out-dir', out, '--max-steps', '1')
    assert msg and 'do not say how many attention heads' in msg and '--teacher-num-heads N' in msg, msg
    assert not out.exists()                                     # refused before its run directory was written: none left
    assert run_in_process(monkeypatch, script, *TINY, '--teacher', plain8, '--teacher-num-heads', '8',
                          '--out-dir', out, '--max-steps', '1') is None
    log = (out / 'log.txt').read_text()
    assert 'depth 2, 8 heads' in log, log
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ck['arch']['num_heads'] == 8                         # the student built to fit it: 8 heads too
    record = ck.get('teacher') or ck['distilled_from']
    assert record['teacher_num_heads'] == 8


def test_a_copy_student_reloads_its_teacher_with_the_stated_heads(plain8, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'copy'
    assert run_in_process(monkeypatch, attention_copy, *TINY, '--teacher', plain8, '--teacher-num-heads', '8',
                          '--out-dir', out, '--max-steps', '1') is None
    model = attention_copy.load_copy_model(str(out / 'checkpoint.pt'))
    assert model.teacher.num_heads == 8 and model.student.num_heads == 8
    capsys.readouterr()
    assert run_in_process(monkeypatch, ensemble, *TINY, '--models', out / 'checkpoint.pt') is None
    assert 'copy/checkpoint.pt' in capsys.readouterr().out


@pytest.mark.parametrize('heads, says', [
    ('', 'do not say how many attention heads'),   # 32 wide: it ended in a ZeroDivisionError (32 // 64 heads)
    ('5', "cannot be built (embed_dim must be divisible by num_heads)"),
])
def test_a_narrow_teacher_of_weights_alone_is_one_line(tmp_path, monkeypatch, heads, says):
    path = tmp_path / 'narrow.pt'
    torch.save(random_vit(embed_dim=32, num_heads=4).state_dict(), path)
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', path, '--out-dir', tmp_path / 'r',
                         *(['--teacher-num-heads', heads] if heads else []))
    assert msg and says in msg and str(path) in msg, msg
    assert not (tmp_path / 'r').exists()


def test_ensemble_and_evaluate_state_the_heads_of_weights_alone(plain8, tmp_path, monkeypatch, capsys):
    msg = run_in_process(monkeypatch, ensemble, *TINY, '--models', plain8)
    assert msg and '--num-heads N' in msg, msg                  # it was scored as a 1-head model
    capsys.readouterr()
    assert run_in_process(monkeypatch, ensemble, '--data', 'fake', '--fake-size', '256', '--num-workers', '0',
                          '--models', plain8, '--num-heads', '8') is None
    assert ensemble.load_models([str(plain8)], num_heads=[8])[0][0].num_heads == 8
    wide = tmp_path / 'imagenet_head.pt'   # evaluate.py's models predict ImageNet's classes
    torch.save(random_vit(num_classes=1000).state_dict(), wide)
    msg = run_in_process(monkeypatch, evaluate, '--models', wide, '--imagenet', tmp_path, '--out', tmp_path / 'res')
    assert msg and '--num-heads N' in msg and not (tmp_path / 'res').exists(), msg


def test_finetune_init_of_weights_alone_states_its_heads(plain8, tmp_path, monkeypatch):
    args = [*TINY, '--init', plain8, '--embed-dim', '64', '--depth', '2', '--max-steps', '1']
    msg = run_in_process(monkeypatch, finetune, *args, '--num-heads', '8', '--out-dir', tmp_path / 'a')
    assert msg and '--init-num-heads N' in msg, msg
    msg = run_in_process(monkeypatch, finetune, *args, '--num-heads', '4', '--init-num-heads', '8',
                         '--out-dir', tmp_path / 'b')
    assert msg and 'num_heads 8 (here 4)' in msg, msg   # loaded into 4 heads
    assert run_in_process(monkeypatch, finetune, *args, '--num-heads', '8', '--init-num-heads', '8',
                          '--out-dir', tmp_path / 'c') is None


def test_a_stated_count_the_record_contradicts_is_refused(tmp_path):
    model = random_vit()
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 'recorded.pt')
    assert build_from_checkpoint(str(tmp_path / 'recorded.pt'), num_heads=8).num_heads == 8
    with pytest.raises(CheckpointError, match=r'--num-heads 4: .* has 8 attention heads'):
        build_from_checkpoint(str(tmp_path / 'recorded.pt'), num_heads=4)


def test_a_family_known_by_its_keys_has_its_own_heads(tmp_path):
    """torchvision's ViT-B is 12 heads of 64; its ViT-H/14 16 of 80, which no rule of 64-wide heads gives."""
    import torchvision
    for hidden, heads in ((768, 12), (1280, 16)):
        tv = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=heads,
                                                  hidden_dim=hidden, mlp_dim=hidden)
        torch.save(tv.state_dict(), tmp_path / 'tv.pth')
        assert build_from_checkpoint(str(tmp_path / 'tv.pth')).num_heads == heads


def wrapped(sd):
    """The ways other programs save a ViT's weights: (name, object saved)."""
    head = {'head.mlp.0.weight': torch.randn(8, 64), 'head.last_layer.weight': torch.randn(16, 8)}   # DINO's head
    noise = {k: v + 1 for k, v in sd.items()}
    return [
        ('DistributedDataParallel', {'model': {f'module.{k}': v for k, v in sd.items()}}),
        ('DINO-style training checkpoint', {'teacher': {**{f'backbone.{k}': v for k, v in sd.items()}, **head},
                                            'student': {f'module.backbone.{k}': v for k, v in noise.items()},
                                            'epoch': 100}),
        ('teacher. beside student.', {**{f'teacher.{k}': v for k, v in sd.items()},
                                      **{f'student.{k}': v for k, v in noise.items()}}),
        ('fp16', {k: v.half() for k, v in sd.items()}),
        ('bf16', {k: v.bfloat16() for k, v in sd.items()}),
    ]


@pytest.mark.parametrize('case', range(5), ids=[w[0] for w in wrapped({})])
def test_wrapped_weights_are_read_right(tmp_path, case):
    sd = random_vit(num_classes=0).state_dict()
    name, saved = wrapped(sd)[case]
    torch.save(saved, tmp_path / 'w.pt')
    model = build_from_checkpoint(str(tmp_path / 'w.pt'), num_heads=8)
    for k, v in model.state_dict().items():
        want = sd[k].to(saved[next(iter(saved))].dtype).float() if name.startswith(('fp', 'bf')) else sd[k]
        assert torch.equal(v, want), (name, k)


@pytest.mark.parametrize('change, named', [
    (lambda sd: sd.update({'blocks.0.attn.extra': torch.ones(3)}), 'blocks.0.attn.extra'),
    (lambda sd: sd.pop('blocks.1.mlp.fc2.weight'), 'blocks.1.mlp.fc2.weight'),
])
def test_extra_and_missing_keys_are_named(tmp_path, monkeypatch, change, named):
    sd = random_vit().state_dict()
    change(sd)
    torch.save(sd, tmp_path / 'odd.pt')
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', tmp_path / 'odd.pt',
                         '--teacher-num-heads', '8', '--out-dir', tmp_path / 'r')
    assert msg and named in msg and 'architecture mismatch' in msg, msg


@pytest.mark.parametrize('dtype', [torch.int8, torch.int64, torch.complex64])
def test_weights_that_are_not_real_floats_are_refused_wherever_read(tmp_path, monkeypatch, dtype):
    """Loading cast int8 / int64 / complex weights to float32 without a word (a quantised file without its scales
    made garbage maps) as a teacher, an --init and an ensemble member: one loader, one line, nothing written."""
    model = random_vit()
    sd = {k: v.to(dtype) if k == 'blocks.0.attn.qkv.weight' else v for k, v in model.state_dict().items()}
    torch.save({'model': sd, 'arch': model.arch}, tmp_path / 'q.pt')
    says = f"holds weights that are not real floating-point numbers (blocks.0.attn.qkv.weight is {dtype})"
    for script, args in [(attention_distill, ['--teacher', tmp_path / 'q.pt']),
                         (finetune, ['--init', tmp_path / 'q.pt', *SHAPE_ARGS]),
                         (ensemble, ['--models', tmp_path / 'q.pt'])]:
        out = tmp_path / script.__name__
        msg = run_in_process(monkeypatch, script, *TINY, *args, *['--out-dir', out] * (script is not ensemble))
        assert msg and says in msg and 'q.pt' in msg, (script.__name__, msg)
        assert not os.path.exists(out) or os.listdir(out) == []


def reading_scripts(path, out):
    """Every script that reads a model file, with its arguments: (script, args, the file's flag)."""
    return [(attention_distill, [*TINY, '--teacher', path, '--out-dir', out], '--teacher'),
            (attention_copy, [*TINY, '--teacher', path, '--out-dir', out], '--teacher'),
            (finetune, [*TINY, '--init', path, *SHAPE_ARGS, '--out-dir', out], '--init'),
            (ensemble, [*TINY, '--models', path, '--out', out / 'r.json'], '--models'),
            (evaluate, ['--data', 'fake', '--num-workers', '0', '--models', path, '--out', out], '--models')]


def flip_a_bit(path):
    """One bit changed inside the largest tensor's record of a zip archive torch wrote (its CRC-32 unchanged)."""
    with zipfile.ZipFile(path) as z:
        record = z.read(max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size))
    data = bytearray(path.read_bytes())
    data[data.find(record) + len(record) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_file_is_refused_wherever_read_before_its_digest_is_recorded(tmp_path, monkeypatch):
    """A flipped bit inside a tensor was read as a weight (torch checks no CRC-32), the damaged teacher's SHA-256
    recorded as the teacher's. Every script refuses it in one line naming it, before anything is written (what else
    a damaged file may hold: test_a_damaged_file_is_one_line_in_every_reader)."""
    model = random_vit()
    path = tmp_path / 't.pt'
    torch.save({'model': model.state_dict(), 'arch': model.arch}, path)
    flip_a_bit(path)
    out = tmp_path / 'out'
    for script, args, _ in reading_scripts(path, out):
        msg = run_in_process(monkeypatch, script, *args)
        assert msg and 'is not a readable PyTorch checkpoint: it is damaged (Bad CRC-32 for file' in msg \
            and str(path) in msg, (script.__name__, msg)
        assert not out.exists()                          # no config.json recording its digest, no folder


def nested(depth):
    """A list nested `depth` deep (torch.save's pickler recurses once a level: run on a thread with a deep stack)."""
    deep = []
    for _ in range(depth):
        deep = [deep]
    return deep


def saved_deep(path, ckpt):
    import sys
    import threading

    def save():
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(10 * 100_000)
        try:
            torch.save(ckpt, path)
        finally:
            sys.setrecursionlimit(limit)
    size = threading.stack_size(2 ** 29)
    try:
        thread = threading.Thread(target=save)
        thread.start()
        thread.join()
    finally:
        threading.stack_size(size)


def script_archive(path, parameters):
    """A TorchScript archive of a Linear whose class declares its parameters as `parameters` (code, as text)."""
    import re
    plain = path.with_suffix('.plain')
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), plain)
    with zipfile.ZipFile(plain) as z, zipfile.ZipFile(path, 'w') as out:
        for name in z.namelist():
            data = z.read(name)
            if '/code/' in name and name.endswith('.py'):
                data = re.sub(rb'__parameters__ = \[[^\]]*\]', b'__parameters__ = ' + parameters, data)
            out.writestr(name, data)


READ = ('teacher', '--init', '--models', 'resume')     # what every reader reads first


LOADED = ('teacher', '--init', '--models')             # what is loaded into a ViT (a resume builds from its flags)


BUILT = ('teacher', '--models')                        # what a file's record builds (an --init's is compared)


def damaged_file(path, damage):
    """A random ViT's checkpoint, as this project saves it, with one damage."""
    model = random_vit()
    sd, arch = model.state_dict(), model.arch
    pos = sd['pos_embed']
    tensors = {'a tensor on the meta device': {k: v.to('meta') for k, v in sd.items()},
               'a sparse pos_embed': {**sd, 'pos_embed': pos.to_sparse()},
               'a pos_embed of stride 0': {**sd, 'pos_embed': torch.zeros(1).as_strided((2 ** 20, 2 ** 20), (0, 0))},
               'a transposed pos_embed': {**sd, 'pos_embed': pos.transpose(1, 2).contiguous()},
               'an empty pos_embed': {**sd, 'pos_embed': torch.zeros(0)},
               'float8 weights': {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}}
    records = {'an unknown act': {'act': 'relu'}, 'heads of -8': {'num_heads': -8}, 'no heads': {'num_heads': 0},
               'an MLP ratio of inf': {'mlp_ratio': float('inf')}, 'a depth of -1': {'depth': -1},
               'a depth that is a string': {'depth': '2'}, 'a negative patch': {'patch_size': -8},
               '10 million blocks': {'depth': 10 ** 7}, '2**60 tokens': {'img_size': 8 * 2 ** 30}}
    good = path.with_suffix('.good')
    torch.save({'model': sd, 'arch': arch}, good)
    random_bytes = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1))
    contents = {'no bytes': b'', 'a file cut in half': good.read_bytes()[:good.stat().st_size // 2],
                'random bytes': bytes(random_bytes.tolist()), 'text': b'model weights\n'}
    if damage in contents:
        path.write_bytes(contents[damage])
    elif damage in tensors:
        torch.save({'model': tensors[damage], 'arch': arch}, path)
    elif damage in records:
        torch.save({'model': sd, 'arch': {**arch, **records[damage]}}, path)
    elif damage == 'lists nested 100,000 deep':
        saved_deep(path, {'model': sd, 'arch': arch, 'metrics': nested(100_000)})
    elif damage == 'a flipped bit':
        torch.save({'model': sd, 'arch': arch}, path)
        flip_a_bit(path)
    else:   # a TorchScript archive whose parameters are no list of names
        script_archive(path, b'5')


# damage -> the readers it reaches (each refuses it; the others have no use for what is damaged)
DAMAGES = {'no bytes': READ, 'a file cut in half': READ, 'random bytes': READ, 'text': READ,
           'lists nested 100,000 deep': READ, 'a tensor on the meta device': READ, 'a sparse pos_embed': READ,
           'a pos_embed of stride 0': READ, 'a flipped bit': READ, 'a TorchScript list of no names': READ,
           'a transposed pos_embed': LOADED, 'an empty pos_embed': LOADED, 'float8 weights': LOADED,
           'an unknown act': LOADED, 'heads of -8': LOADED, 'no heads': LOADED, 'an MLP ratio of inf': LOADED,
           'a depth of -1': LOADED, 'a depth that is a string': LOADED, 'a negative patch': LOADED,
           '10 million blocks': LOADED, '2**60 tokens': ('--models',)}


def read_as(reader, path):
    """The reader of a file a user brings, called in this process as its script calls it: the transfer scripts' and
    finetune.py's resolve steps, ensemble.py's and evaluate.py's load_models, a resume's read (open_resumed)."""
    from attention_distill import DistillConfig
    from finetune import FinetuneConfig
    return {'teacher': lambda: DistillConfig(data='fake', img_size=32, teacher=path).resolve(),
            '--init': lambda: FinetuneConfig(data='fake', **SHAPE, init=path).resolve(),
            '--models': lambda: ensemble.load_models([path]),
            'resume': lambda: read_checkpoint(path)}[reader]()


@pytest.mark.parametrize('damage', DAMAGES)
def test_a_damaged_file_is_one_line_in_every_reader(tmp_path, damage):
    """Whatever a file a user brings holds that no ViT is read or built from is one line naming the file, in every
    reader that meets it, never with torch's advice to unpickle it (weights_only=False): what torch's reader cannot
    parse (no bytes, a file cut in half, random bytes, text, a pickle nested 100,000 lists deep was RecursionError's
    traceback), what torch.save never writes (a tensor on the meta device, a sparse pos_embed, blamed on a stride of
    0; a view repeating one float, whose finiteness check asked for 4 TB), tensors of no ViT's shapes (a pos_embed
    transposed or empty), float8 weights, a TorchScript archive's parameters that are no list of names; what no ViT
    is built from (the constructor's refusals: an activation it ran as GELU, heads that divide the width but are
    negative); and a size counted from the record's numbers before anything is built (2**60 tokens; 10 million blocks
    built a Python module each on the meta device, no answer in 60 s)."""
    path = str(tmp_path / 'damaged.pt')
    damaged_file(tmp_path / 'damaged.pt', damage)
    for reader in DAMAGES[damage]:
        with pytest.raises(CheckpointError) as e:
            read_as(reader, path)
        said = str(e.value)
        assert path in said and '\n' not in said and 'weights_only' not in said, (reader, said)


@pytest.mark.parametrize('script, flag', [(attention_distill, '--teacher-num-heads'), (finetune, '--init-num-heads'),
                                          (ensemble, '--num-heads')])
def test_a_stated_head_count_that_does_not_divide_the_width_blames_the_flag(tmp_path, monkeypatch, script, flag):
    """--teacher-num-heads 3 on a 32-wide file of weights alone: the line said the file cannot be built."""
    path = tmp_path / 'narrow.pt'
    torch.save(random_vit(embed_dim=32, num_heads=4).state_dict(), path)
    shape = ['--embed-dim', '32', '--depth', '2', '--num-heads', '4'] if script is finetune else []
    target = ['--models', path] if script is ensemble else \
        [{finetune: '--init'}.get(script, '--teacher'), path, '--out-dir', tmp_path / 'out', *shape]
    msg = run_in_process(monkeypatch, script, *TINY, *target, flag, '3')
    assert msg and msg.startswith(f'error: {flag} 3: ') and 'state a divisor of 32 (1, 2, 4, 8, 16, 32)' in msg, msg
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('blocks', [10_000, 100_000])
def test_a_record_of_more_blocks_than_a_flag_allows_is_refused_before_any_is_built(tmp_path, monkeypatch, blocks):
    """A file of many blocks of one tiny tensor each, its record saying so (370 KB for 10,000): each block a module
    on the meta device, it took a minute and more before a refusal. Refused from its record, as --depth would be
    (util/config.MOST), before any ViT is built, in one line naming the file."""
    from util import checkpoints
    model = random_vit()
    sd = {**model.state_dict(), **{f'blocks.{i}.norm1.weight': torch.ones(1) for i in range(blocks)}}
    path = tmp_path / 'deep.pt'
    torch.save({'model': sd, 'arch': {**model.arch, 'depth': blocks}}, path)
    monkeypatch.setattr(checkpoints, 'VisionTransformer', lambda **kw: pytest.fail('a ViT was built'))
    with pytest.raises(checkpoints.CheckpointError) as e:
        checkpoints.build_from_checkpoint(str(path))
    assert f'records depth {blocks:,}, more than the 4,096 any command line allows' in str(e.value)
    assert str(path) in str(e.value) and '\n' not in str(e.value)
    del sd['blocks.0.norm1.weight']   # no record: its blocks counted, the same rule
    torch.save({'model': sd}, path)
    with pytest.raises(checkpoints.CheckpointError, match=f'holds {blocks:,} blocks, more than the 4,096'):
        checkpoints.build_from_checkpoint(str(path), num_heads=2)


def test_init_not_a_checkpoint(tmp_path):
    bad = tmp_path / 'weights.pt'
    bad.write_text('these are not weights\n')
    assert_one_line_error(finetune_tiny(tmp_path / 'r', '--init', bad, check=False), str(bad))
    missing = tmp_path / 'nothing_here.pt'
    assert_one_line_error(finetune_tiny(tmp_path / 'r', '--init', missing, check=False), str(missing))


@pytest.mark.parametrize('source, change, says', [
    ('state_dict', ['--init-num-heads', '3', '--depth', '3'], 'architecture mismatch'),
    ('state_dict', ['--init-num-heads', '3', '--embed-dim', '96'], 'architecture mismatch'),
    ('state_dict', ['--init-num-heads', '6'], 'the checkpoint has num_heads 6 (here 3)'),
    ('state_dict', [], 'do not say how many attention heads'),   # weights alone: never guessed
    ('checkpoint', ['--depth', '3'], 'architecture mismatch'),
])
def test_init_architecture_mismatch(depth2_run, tmp_path, source, change, says):
    out, plain = depth2_run
    src = plain if source == 'state_dict' else out / 'checkpoint.pt'
    p = finetune_tiny(tmp_path / 'r', '--init', src, *change, check=False)
    assert_one_line_error(p, says)


def test_init_from_own_checkpoint(depth2_run, tmp_path):
    """The positive case next to the mismatches: this project's checkpoint.pt, the same architecture,
    loads (blr 0: the weights cannot move, so the result is exactly what was loaded)."""
    out, _ = depth2_run
    finetune_tiny(tmp_path / 'r', '--init', out / 'checkpoint.pt', '--blr', '0', '--max-steps', '1', '--amp', 'off')
    src = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=False)['model']
    got = torch.load(tmp_path / 'r' / 'checkpoint.pt', map_location='cpu', weights_only=False)['model']
    assert src.keys() == got.keys()
    assert all(torch.equal(src[k], got[k]) for k in src)


def save_vit(path, extra=None, **arch):
    model = VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4,
                                        num_classes=10), **arch})
    torch.save({'model': model.state_dict(), 'arch': model.arch, **(extra or {})}, path)
    return path


def read(path):
    """load_weights' source and checkpoint: a file's name and what read_checkpoint reads of it."""
    return str(path), read_checkpoint(str(path))


def test_init_compares_heads_and_every_recorded_field(tmp_path, monkeypatch):
    """4 heads and 3 heads of a 48-wide model have tensors of the same shapes: only 'arch' tells them apart."""
    four = save_vit(tmp_path / 'four.pt')
    with pytest.raises(CheckpointError, match=r'num_heads 4 \(here 3\)'):
        load_weights(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3), *read(four))
    # what loading adapts may differ: image size (position embeddings resized), classes (new head), pooling
    load_weights(VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=5,
                                   global_pool=True), *read(four))
    msg = run_in_process(monkeypatch, finetune, *TINY, '--out-dir', tmp_path / 'r', '--init', four,
                         '--embed-dim', '48', '--depth', '1', '--num-heads', '3')
    assert msg and 'architecture mismatch' in msg and 'num_heads 4 (here 3)' in msg, msg


def test_copy_student_is_neither_a_teacher_nor_an_init(tmp_path, monkeypatch):
    copy = save_vit(tmp_path / 'copy.pt', extra={'teacher': {'source': 't.pt', 'sha256': None}}, no_qk_layers=[0])
    for load in (lambda: build_from_checkpoint(str(copy)),
                 lambda: load_weights(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1,
                                                        num_heads=4), *read(copy))):
        with pytest.raises(CheckpointError, match='is an attention-copy student'):
            load()
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'r', '--teacher', copy)
    assert msg and 'is an attention-copy student' in msg, msg


@pytest.mark.parametrize('arch', [{'embed_dim': 50, 'num_heads': 3}, {'no_such_field': 1}])
def test_checkpoint_with_a_bad_arch(tmp_path, arch):
    path = tmp_path / 'bad.pt'
    torch.save({'model': VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=1).state_dict(),
                'arch': {**VisionTransformer(depth=1).arch, **arch}}, path)
    for size in (None, 64):   # the checkpoint's fault, whatever the caller asks for
        with pytest.raises(CheckpointError, match="bad.pt' cannot be built"):
            build_from_checkpoint(str(path), img_size=size)


def test_teacher_at_an_image_size_its_patches_do_not_divide(tmp_path, monkeypatch):
    """--img-size 30 with a patch-8 teacher: one line naming the file and the size VisionTransformer refuses."""
    path = save_vit(tmp_path / 'teacher.pt')
    with pytest.raises(CheckpointError, match=r"cannot be built \(img_size 30 is not a multiple"):
        build_from_checkpoint(str(path), img_size=30)
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'r', '--teacher', path,
                         '--img-size', '30')
    assert msg and 'cannot be built (img_size 30 is not a multiple' in msg and str(path) in msg, msg


def test_a_copy_student_whose_teacher_is_gone_says_how_to_point_at_it(tmp_path, monkeypatch, depth2_run):
    from attention_copy import load_copy_model
    teacher = tmp_path / 'teacher.pt'
    teacher.write_bytes((depth2_run[0] / 'checkpoint.pt').read_bytes())
    msg = run_in_process(monkeypatch, attention_copy, *TINY, '--out-dir', tmp_path / 'copy', '--teacher', teacher,
                         '--max-steps', '1')
    assert msg is None, msg
    student, moved = str(tmp_path / 'copy' / 'checkpoint.pt'), tmp_path / 'moved.pt'
    teacher.rename(moved)
    digest = hashlib.sha256(moved.read_bytes()).hexdigest()
    with pytest.raises(CheckpointError) as e:
        load_copy_model(student)
    assert f'its recorded teacher {teacher} (sha256 {digest}) is gone' in str(e.value)
    assert 'teacher_source=' in str(e.value) and '--teacher' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(CheckpointError, match=f'the teacher given for it, {tmp_path / "nope.pt"}, is not a file'):
        load_copy_model(student, str(tmp_path / 'nope.pt'))
    assert load_copy_model(student, str(moved))(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class Opens:
    """Unpickled, it calls open(marker, 'w'): the marker file appears if the pickle's code runs."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def code_pickles(tmp_path):
    """{kind: (file, marker)}: torch.save's format, a plain pickle, and torch.save's with a constants.pkl
    record added so that it passes for a TorchScript archive."""
    out = {}
    for kind in ('torch.save', 'pickle', 'as TorchScript'):
        marker, path = tmp_path / f'ran-{kind}', tmp_path / f'{kind}.pt'
        if kind == 'pickle':
            path.write_bytes(pickle.dumps({'model': Opens(marker)}))
        else:
            torch.save({'model': {'w': torch.ones(2)}, 'config': Opens(marker)}, path)
        if kind == 'as TorchScript':
            with zipfile.ZipFile(path, 'a') as z:
                z.writestr(z.namelist()[0].split('/')[0] + '/constants.pkl', pickle.dumps((), protocol=2))
        out[kind] = path, marker
    return out


def test_a_pickle_that_carries_code_is_refused_unrun(tmp_path):
    files = code_pickles(tmp_path)
    for kind, (path, marker) in files.items():
        with pytest.raises(CheckpointError) as e:
            read_checkpoint(str(path))
        msg = str(e.value)
        assert msg.startswith(f"'{path}' is not a readable PyTorch checkpoint") and '\n' not in msg, msg
        assert 'weights_only' not in msg and 'refused' in msg, msg
        assert not marker.exists(), kind
    # the marker would show it: unpickled without the guard, the code runs
    path, marker = files['torch.save']
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_damaged_download_names_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: pytest.fail('the file is there'))
    cached = tmp_path / 'hub' / 'checkpoints' / 'dino_deitsmall16_pretrain.pth'
    os.makedirs(cached.parent)
    cached.write_bytes(b'')
    with pytest.raises(CheckpointError) as e:
        read_checkpoint('dino_vits16')
    msg = str(e.value)
    assert msg.startswith(f"'{cached}' is not a readable PyTorch checkpoint: torch.load refused it unread "
                          '(EOFError)'), msg
    assert 'download it again' in msg and '\n' not in msg and cached.read_bytes() == b'', msg
