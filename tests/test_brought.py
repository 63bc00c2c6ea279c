"""What users bring is read right or refused: teacher files that hold weights alone (their heads are stated, never
guessed), the wrappers other programs save weights in, image folders with hidden entries and images of less common
kinds, class names that differ from the run's, runs that diverge and teachers that are not finite, files damaged or
edited into what no ViT is read or built from (one table over every reader). Each case: one line and a non-zero exit
where refused, nothing written; read right otherwise."""
import hashlib
import io
import json
import math
import os
import shutil
import unicodedata
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import attention_copy
import attention_distill
import ensemble
import evaluate
import finetune
from conftest import TINY, run_in_process, run_script
from data import build_dataset, build_splits
from util.checkpoints import CheckpointError, build_from_checkpoint
from util.datafiles import DataError
from util.folders import read_image
from vit import MOST, VisionTransformer

# the fake preset's images (32 px, patches of 8); a teacher as people save one: 8 heads of 8, the weights alone
SHAPE = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=8)
SHAPE_ARGS = [a for k, v in SHAPE.items() for a in (f"--{k.replace('_', '-')}", v)]


def random_vit(**arch):
    torch.manual_seed(0)
    return VisionTransformer(**{**SHAPE, 'num_classes': 10, **arch})


@pytest.fixture(scope='module')
def plain8(tmp_path_factory):
    """An 8-head, 64-wide classifier saved as torch.save(model.state_dict()): timm's names, no record."""
    path = tmp_path_factory.mktemp('brought') / 'plain8.pt'
    torch.save(random_vit().state_dict(), path)
    return path


def digest(d):
    return {p: hashlib.sha256(open(os.path.join(d, p), 'rb').read()).hexdigest()
            for p in sorted(os.listdir(d))} if os.path.isdir(d) else None

# -----------------------------------------------------------------------------
# 1. Teachers: the head count of a file of weights alone is stated, never guessed


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

# -----------------------------------------------------------------------------
# 2. Folders: hidden entries are no class and no image; images read as what they are; class names recorded


def save_png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode).save(path)


def image_folder(root, classes=('cat', 'dog', 'fox'), per_class=4, splits=('train', 'val')):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            for i in range(per_class):
                save_png(root / split / c / f'{i}.png', rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return root


def folder_cfg(root, **kw):
    from util.config import TrainConfig
    return TrainConfig(**{'data': 'folder', 'data_dir': str(root), 'img_size': 32, **kw})


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    root = image_folder(tmp_path)
    save_png(root / 'train' / '.ipynb_checkpoints' / 'x.png', np.zeros((32, 32, 3), np.uint8))   # Jupyter's
    save_png(root / 'train' / 'cat' / '.ipynb_checkpoints' / '0-checkpoint.png', np.zeros((32, 32, 3), np.uint8))
    (root / 'train' / 'dog' / '._0.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')             # macOS's
    (root / 'train' / 'notes.txt').write_text('not a class')
    train, n = build_dataset(folder_cfg(root), train=True)
    assert n == 3 and train.classes == ['cat', 'dog', 'fox'] and len(train) == 12   # it was 4 classes
    assert all(os.sep + '.' not in path for path, _ in train.samples)


def encoded(image, fmt, **save):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def test_images_are_read_as_what_they_are(tmp_path):
    rng = np.random.default_rng(0)
    # 16-bit greyscale: PIL's conversion clipped every value above 255 to white; its high byte is the image
    grey16 = (rng.integers(0, 65536, (8, 8))).astype(np.uint16)
    (tmp_path / 'g16.png').write_bytes(encoded(Image.fromarray(grey16), 'PNG'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'g16.png')))[..., 0], grey16 >> 8)
    # EXIF orientation 6 (the camera turned a quarter clockwise): shown upright, as PIL's exif_transpose shows it
    rgb = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / 'turned.png').write_bytes(encoded(Image.fromarray(rgb), 'PNG', exif=exif))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'turned.png'))), np.rot90(rgb, -1))
    # RGBA: the colour kept, the transparency dropped (PIL's convert('RGB') and torchvision's decode_image)
    rgba = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    (tmp_path / 'a.png').write_bytes(encoded(Image.fromarray(rgba, 'RGBA'), 'PNG'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'a.png'))), rgba[..., :3])
    # a palette: its colours; CMYK: PIL's conversion
    palette = Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=8)
    (tmp_path / 'p.png').write_bytes(encoded(palette, 'PNG'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'p.png'))), np.asarray(palette.convert('RGB')))
    cmyk = Image.fromarray(rgb).convert('CMYK')
    (tmp_path / 'c.tif').write_bytes(encoded(cmyk, 'TIFF'))
    assert np.array_equal(np.asarray(read_image(str(tmp_path / 'c.tif'))), np.asarray(cmyk.convert('RGB')))
    # float pixels have no agreed range: refused, naming the file
    (tmp_path / 'f.tif').write_bytes(encoded(Image.fromarray(rng.random((4, 4)).astype(np.float32), 'F'), 'TIFF'))
    with pytest.raises(DataError, match=r'f\.tif has 32-bit pixels \(mode F\).*8 or 16 bits'):
        read_image(str(tmp_path / 'f.tif'))


FOLDER_RUN = ['--data', 'folder', '--img-size', '32', '--patch-size', '8', '--depth', '1', '--batch-size', '4',
              '--num-workers', '0', '--amp', 'off']


def test_a_resume_on_other_class_names_is_refused(tmp_path, monkeypatch):
    a, b = image_folder(tmp_path / 'a'), image_folder(tmp_path / 'b', classes=('cat', 'dog', 'owl'))
    out = tmp_path / 'run'
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', a, '--out-dir', out,
                          '--max-steps', '1') is None
    assert torch.load(out / 'checkpoint.pt', weights_only=True)['classes'] == ['cat', 'dog', 'fox']
    before = digest(out)
    msg = run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', b, '--out-dir', out, '--resume', 'true')
    assert msg and ("other classes than the data here has (other class names (its class 2 is 'fox', the data's 'owl'; "
                    '3 classes, the data has 3))') in msg, msg
    assert digest(out) == before
    msg = run_in_process(monkeypatch, ensemble, *FOLDER_RUN[:4], '--data-dir', b, '--models', out / 'checkpoint.pt',
                         '--num-workers', '0')
    assert msg and "predicts other class names (its class 2 is 'fox', the data's 'owl';" in msg, msg
    assert run_in_process(monkeypatch, ensemble, '--models', out / 'checkpoint.pt', '--num-workers', '0') is None


def test_class_names_that_differ_only_in_their_unicode_form_are_the_same_classes(tmp_path, monkeypatch):
    """A class folder named café by a Mac (decomposed, NFD) is the café of a run trained on Linux (composed, NFC): a
    resume and an ensemble on it were refused as "other class names (3; the data has 3)"."""
    nfc, nfd = (unicodedata.normalize(form, 'café') for form in ('NFC', 'NFD'))
    a = image_folder(tmp_path / 'a', classes=('cat', nfc, 'dog'))
    b = shutil.copytree(a, tmp_path / 'b')   # the same images, their times kept: the same data
    for split in ('train', 'val'):
        os.rename(b / split / nfc, b / split / nfd)
    out = tmp_path / 'run'
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', a, '--out-dir', out,
                          '--max-steps', '1') is None
    assert run_in_process(monkeypatch, finetune, *FOLDER_RUN, '--data-dir', b, '--out-dir', out, '--resume', 'true',
                          '--max-steps', '2') is None
    assert run_in_process(monkeypatch, ensemble, *FOLDER_RUN[:4], '--data-dir', b, '--models', out / 'checkpoint.pt',
                          '--num-workers', '0') is None


def test_evaluate_refuses_models_of_other_classes(tmp_path, monkeypatch):
    model = random_vit(num_classes=1000)
    torch.save({'model': model.state_dict(), 'arch': model.arch, 'classes': [f'c{i}' for i in range(1000)]},
               tmp_path / 'other.pt')
    msg = run_in_process(monkeypatch, evaluate, '--models', tmp_path / 'other.pt', '--imagenet', tmp_path,
                         '--out', tmp_path / 'res')
    assert msg and "predicts other class names (its class 0 is 'c0', the data's 'n01440764'; 1000 classes, the " \
        'data has 1000)' in msg, msg

# -----------------------------------------------------------------------------
# 3. Numeric health: no checkpoint keeps a value that is not finite; a teacher that is not finite is refused


def test_a_run_that_diverges_keeps_a_finite_checkpoint_and_goes_on_with_a_lower_lr(tmp_path, monkeypatch):
    """From step 3 the loss is scaled by 1e30: the weights stay finite (AdamW's step is exp_avg / sqrt(inf) = 0)
    but the optimizer's second moment is inf. The checkpoint of step 2 was kept, that of step 4 was written with
    inf in it and called 'the last good checkpoint' once the loss went NaN, and the advised lower --blr refused.
    (A higher --blr is allowed too, and diverges again from the same checkpoint: nothing is lost.)"""
    calls, plain = [0], finetune.soft_cross_entropy   # the fine-tuning loss's cross-entropy

    def blowing_up(*args, **kw):
        calls[0] += 1
        return plain(*args, **kw) * (1e30 if calls[0] >= 3 else 1)
    monkeypatch.setattr(finetune, 'soft_cross_entropy', blowing_up)
    out, args = tmp_path / 'run', [*TINY, '--amp', 'off', '--save-every', '2', '--log-every', '100']
    msg = run_in_process(monkeypatch, finetune, *args, '--out-dir', out)
    assert msg and 'optimizer' in msg and 'is inf at step 4' in msg and 'the last finite checkpoint (step 2)' in msg
    assert str(out / 'checkpoint.pt') in msg, msg
    ck = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ck['step'] == 2 and all(v.isfinite().all() for s in ck['optimizer']['state'].values()
                                   for v in s.values() if torch.is_tensor(v))
    monkeypatch.setattr(finetune, 'soft_cross_entropy', plain)
    assert run_in_process(monkeypatch, finetune, *args, '--out-dir', out, '--resume', 'true', '--blr', '5e-4') is None
    config = json.loads((out / 'config.json').read_text())
    resume = config['resumes'][-1]
    assert resume['changed']['blr'] == [1e-3, 5e-4] and resume['after_divergence']['step'] == 4
    assert 'diverged' not in config                             # allowed once, from the checkpoint kept
    msg = run_in_process(monkeypatch, finetune, *args, '--out-dir', out, '--resume', 'true', '--blr', '1e-4')
    assert msg and '--blr 0.0005 -> 0.0001' in msg, msg         # without a divergence, the lr is the run's


@pytest.mark.parametrize('broken, says', [
    (lambda m: m.blocks[1].mlp.fc1.weight.data.__setitem__((0, 0), float('nan')),
     "holds weights that are not finite (blocks.1.mlp.fc1.weight has nan or inf)"),
    (lambda m: m.blocks[0].attn.qkv.weight.data.mul_(1e30), 'hands over attention maps that are not finite'),
])
def test_a_teacher_that_is_not_finite_is_refused_by_name(tmp_path, monkeypatch, broken, says):
    """It was reported as a training loss of NaN with advice to lower the learning rate, the teacher unnamed."""
    model = random_vit()
    broken(model)
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 't.pt')
    out = tmp_path / 'run'
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', tmp_path / 't.pt', '--out-dir', out,
                         '--amp', 'off')
    assert msg and says in msg and 't.pt' in msg, msg
    assert not out.exists()                                     # refused: the folder it made is gone again


def test_finite_queries_and_keys_whose_fp16_maps_overflow_are_refused(tmp_path, monkeypatch):
    """The teacher hands over q and k, finite here, but their products pass fp16's range: explicit maps under fp16
    autocast are not finite, so eager refuses the teacher; sdpa's kernels keep their sums in fp32 and take it."""
    model = random_vit()
    model.blocks[0].attn.qkv.weight.data.mul_(300 / model.blocks[0].attn.qkv.weight.data.abs().max())
    model.blocks[0].attn.qkv.bias.data.fill_(30.0)
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 't.pt')
    args = [*TINY, '--teacher', tmp_path / 't.pt', '--amp', 'fp16', '--max-steps', '1', '--layers', '0']
    msg = run_in_process(monkeypatch, attention_copy, *args, '--out-dir', tmp_path / 'e', '--attn-implementation', 'eager')
    assert msg and 'hands over attention maps that are not finite (its layer 0)' in msg and '--amp off' in msg, msg
    assert run_in_process(monkeypatch, attention_copy, *args, '--out-dir', tmp_path / 's', '--attn-implementation',
                          'sdpa') is None


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

def test_splits_name_their_classes(tmp_path):
    from util.config import TrainConfig
    splits = build_splits(TrainConfig(data='fake', fake_size=64, img_size=32))
    assert splits.classes == [str(i) for i in range(10)] and splits.num_classes == 10


# -----------------------------------------------------------------------------
# 4. Damaged files and architecture records: refused in one line naming the file, in every reader


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
    import zipfile
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
    from util.checkpoints import read_checkpoint
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


def limited(*args):
    """`python <args...>` in a process whose address space is limited to 8 GB, as a machine smaller than what the
    command asks for: a command that allocates what it asks for fails in torch's words."""
    import resource
    return run_script(*args, limits=[(resource.RLIMIT_AS, 8 * 2 ** 30)])


def test_a_small_file_whose_record_asks_for_more_memory_than_there_is_is_refused_unallocated(tmp_path):
    """A 0.5 MB file whose record asks for a classifier of 51 GB (or more than twice this machine: one it cannot hold
    whatever it is), or an image size whose position embeddings take as much: ensemble.py and evaluate.py built it
    for real, reaching GBs before failing (uncapped, a machine met its OOM killer). Refused from the model built on the
    meta device, in one line naming the file, under a limit it would exceed."""
    model = random_vit()
    machine = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    numbers = max(51e9, 2 * machine) / 4                              # fp32
    grid = math.isqrt(int(numbers / 64)) + 1                         # position embeddings 64 wide
    for field, value in [('num_classes', int(numbers / 64)), ('img_size', 8 * grid)]:
        path = tmp_path / f'{field}.pt'
        torch.save({'model': model.state_dict(), 'arch': {**model.arch, field: value}}, path)
        assert path.stat().st_size < 2 ** 20
        for args in [('ensemble.py', *TINY, '--models', path),
                     ('evaluate.py', '--data', 'fake', '--num-workers', '0', '--models', path, '--out',
                      tmp_path / 'out')]:
            p = limited(*args)
            err = p.stderr.strip()
            # beyond a flag's most (img_size here), the same line as a flag's; below it, what it needs
            why = 'any command line allows' if value > MOST[field] else 'GB'
            assert p.returncode == 1 and err.startswith(f"error: '{path}' ") and why in err and '\n' not in err, \
                (field, args[0], err[-3000:])
            assert 'edited or is damaged' in err
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


TEACHER = os.path.join(os.path.dirname(__file__), '..', 'teachers', 'fashion-mnist-mae.pt')


@pytest.mark.parametrize('args, flag', [
    (['attention_distill.py', '--teacher', TEACHER, '--img-size', '65536'], '--img-size 65536'),
    (['attention_copy.py', '--teacher', TEACHER, '--img-size', '65536'], '--img-size 65536'),
    (['finetune.py', '--img-size', '65536'], '--img-size 65536'),
    (['finetune.py', '--embed-dim', '65536', '--num-heads', '8'], '--embed-dim 65536'),
    (['attention_copy.py', '--teacher', TEACHER, '--img-size', '28', '--model', 'vit_tiny', '--embed-dim', '65536',
      '--num-heads', '8'], '--embed-dim 65536'),
    (['mae_pretrain.py', '--embed-dim', '65536', '--num-heads', '8'], '--embed-dim 65536')],
    ids=['distill-img', 'copy-img', 'finetune-img', 'finetune-dim', 'copy-dim', 'mae-dim'])
def test_a_size_too_big_for_the_machine_names_its_flag(tmp_path, args, flag):
    """--img-size 65536 (a teacher with patches of 4: its position embeddings alone take 68.7 GB) or --embed-dim 65536
    (terabytes): made for real, an allocation error naming no flag. Refused from the model built on the meta device,
    in one line naming the flag, under a limit it would exceed."""
    p = limited(*args, *TINY, '--out-dir', tmp_path / 'out')
    err = p.stderr.strip()
    assert p.returncode == 1 and err.startswith('error: ') and flag in err and ' GB ' in err and '\n' not in err, \
        err[-3000:]
    assert not (tmp_path / 'out').exists()
