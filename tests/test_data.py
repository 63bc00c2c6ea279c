"""data.py and util/datafiles.py: the real Fashion-MNIST files, CIFAR's python batches, ImageFolder, FakeData,
transforms, MixUp / CutMix, samplers, the loader's workers at the interpreter's end, a data set named wrong or
missing. (Image folders' entries, images and class names: tests/test_folders.py.)"""
import gzip
import hashlib
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys
import types

import numpy as np
from PIL import Image
import pytest
import torch
import torchvision
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.transforms import v2

from conftest import ROOT, assert_one_line_error, finetune, sub_env
from data import batch_mixer, build_dataset, build_eval_set, build_splits
from finetune import PRESETS, FinetuneConfig
from util.datafiles import DATASETS, FASHION_MNIST_SYSTEM_DIR, ResumableSampler, read_idx
from util.errors import DataError


def config(**kw):
    return FinetuneConfig(**{**PRESETS['fake'], 'num_workers': 0, **kw})


def write_idx(path, array, gz=True):
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    with (gzip.open if gz else open)(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize('gz', [True, False])
def test_idx_reader_reads_what_torchvision_reads(tmp_path, gz):
    """read_idx against torchvision's own IDX readers (which take an uncompressed file), images and labels."""
    rng = np.random.default_rng(0)
    for name, a, ndim, theirs in (('x', rng.integers(0, 256, (5, 28, 28)), 3, read_image_file),
                                  ('y', rng.integers(0, 10, (5,)), 1, read_label_file)):
        path = tmp_path / (name + ('.gz' if gz else ''))
        write_idx(path, a, gz)
        ours = read_idx(str(path), ndim)
        assert torch.equal(ours, torch.from_numpy(a.astype(np.uint8)))
        plain = tmp_path / f'{name}-plain'
        plain.write_bytes(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
        assert torch.equal(ours, theirs(str(plain)))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR) and not os.environ.get('CI'),
                    reason='apt-get install dataset-fashion-mnist')
def test_real_fashion_mnist(tmp_path):
    cfg = config(data='fashion-mnist', img_size=28, data_dir=str(tmp_path))   # empty dir: falls back to the system copy
    train, n = build_dataset(cfg, train=True)
    test, _ = build_dataset(cfg, train=False)
    assert (len(train), len(test), n) == (60000, 10000, 10)
    x, y = test[0]
    assert x.shape == (3, 28, 28) and torch.equal(x[0], x[2]) and 0 <= y < 10   # grey -> 3 equal channels
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert abs(torch.stack([test[i][0] for i in range(500)]).mean()) < 0.1     # normalised


def test_fashion_mnist_from_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (('train', 9), ('t10k', 7)):
        write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, (n,)))
    ds, _ = build_dataset(config(data='fashion-mnist', img_size=28, data_dir=str(tmp_path)), train=False)
    assert len(ds) == 7 and ds.source == str(tmp_path)
    assert list(ds.classes) == torchvision.datasets.FashionMNIST.classes   # torchvision's names, in its order


def idx_pair(root, n_images=12, n_labels=12, gz=True, split='t10k'):
    """images (n_images, 28, 28) and labels (n_labels,) of a split in root, in the IDX format (with the training
    split's files beside them, which the test split is read with: one place holds the data set); returns the
    split's two paths."""
    if split == 't10k' and not any(root.glob('train-*')):
        idx_pair(root, 5, 5, gz, 'train')
    rng, ext = np.random.default_rng(0), '.gz' if gz else ''
    paths = [root / f'{split}-images-idx3-ubyte{ext}', root / f'{split}-labels-idx1-ubyte{ext}']
    for path, a in zip(paths, (rng.integers(0, 256, (n_images, 28, 28)), rng.integers(0, 10, (n_labels,)))):
        header = bytes([0, 0, 8, a.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in a.shape)
        (gzip.open if gz else open)(path, 'wb').write(header + a.astype(np.uint8).tobytes())
    return paths


def cut(path, n):           # the file less its last n bytes
    path.write_bytes(path.read_bytes()[:-n])


def relabel(path, label):   # a plain IDX labels file whose first label is `label`
    data = bytearray(path.read_bytes())
    data[8] = label
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage, gz, culprit, match', [
    (lambda images, labels: None, True, None, None),                                   # intact: read
    (lambda images, labels: idx_pair(images.parent, 12, 10), True, 'both',   # 2 images silently left out
     r'do not pair up \(12 images, 10 labels\)'),
    (lambda images, labels: cut(images, 20), True, 'images', 'cannot be read .EOFError'),   # a cut download
    (lambda images, labels: cut(labels, 3), False, 'labels',
     r'cannot be read \(its header declares 12 values, it holds 9\)'),
    (lambda images, labels: labels.write_bytes(labels.read_bytes() + b'x'), False, 'labels',
     r'cannot be read \(its header declares 12 values, it holds more\)'),
    (lambda images, labels: labels.write_bytes(bytes([0, 0, 8, 1]) + b'\xff' * 4), False, 'labels',   # 4 billion
     r'cannot be read \(its header declares 4,294,967,295 values, it holds 0\)'),
    (lambda images, labels: images.write_bytes(bytes([0, 0, 8, 3]) + b'\xff' * 12), False, 'images',
     r'cannot be read \(its header declares 79,228,162,[0-9,]+ values\)'),
    (lambda images, labels: labels.write_bytes(b'<html>Not Found</html>'), True, 'labels',
     'cannot be read .BadGzipFile'),
    (lambda images, labels: labels.write_bytes(b'<html>Not Found</html>'), False, 'labels',
     r'cannot be read \(not an IDX file of 1-dimensional unsigned bytes\)'),
    (lambda images, labels: images.write_bytes(labels.read_bytes()), False, 'images',   # labels named as images
     r'cannot be read \(not an IDX file of 3-dimensional unsigned bytes\)'),
    # a test label of 77: IndexError's traceback at the first evaluation, after the whole training
    (lambda images, labels: relabel(labels, 77), False, 'labels', r'holds labels outside its 10 classes'),
])
def test_damaged_idx_files_are_named_with_the_fix(tmp_path, damage, gz, culprit, match):
    """Truncated, not gzip, not IDX, a count that disagrees with the data or with the other file, a label beyond the
    classes: one line naming the file(s) and the fix; a labels file saying 10 no longer trains on 10 of 12 images."""
    images, labels = idx_pair(tmp_path, gz=gz)
    damage(images, labels)
    cfg = config(data='fashion-mnist', img_size=28, data_dir=str(tmp_path))
    if culprit is None:
        assert len(build_dataset(cfg, train=False)[0]) == 12
        return
    with pytest.raises(DataError) as e:
        build_dataset(cfg, train=False)
    msg = str(e.value)
    named = {'images': [images], 'labels': [labels], 'both': [images, labels]}[culprit]
    assert re.search(match, msg) and '\n' not in msg, msg
    assert msg.startswith(' and '.join(map(str, named)) + ' ') and 'with the original file' in msg


def test_an_unknown_data_set_is_refused_where_the_command_line_is_read(monkeypatch, tmp_path):
    import finetune
    from conftest import run_in_process
    msg = run_in_process(monkeypatch, finetune, '--data', 'mnist', '--out-dir', tmp_path / 'run')
    assert msg.startswith('error: --data') and "'mnist'" in msg and 'fashion-mnist' in msg, msg
    assert not (tmp_path / 'run').exists()


def test_imagenet_classes_are_imagenet_1k_indices(tmp_path):
    """--data imagenet: ImageNet-1k's indices, whatever the split holds, so that val/ is read without train/."""
    from util.datafiles import read_classes
    wnids = read_classes('imagenet')
    for k, w in ((0, wnids[0]), (1, wnids[500]), (2, wnids[999])):
        os.makedirs(tmp_path / 'val' / w)
        Image.new('RGB', (40, 40), color=(k, 0, 0)).save(tmp_path / 'val' / w / 'x.JPEG')
    val, n = build_dataset(config(data='imagenet', data_dir=str(tmp_path), img_size=32), train=False)
    assert n == 1000
    assert {p.split('/')[-2]: y for p, y in val.samples} == {wnids[0]: 0, wnids[500]: 500, wnids[999]: 999}
    os.makedirs(tmp_path / 'val' / 'cats')
    with pytest.raises(DataError, match='val has folders cats: not ImageNet-1k classes.*use --data folder'):
        build_dataset(config(data='imagenet', data_dir=str(tmp_path), img_size=32), train=False)


def test_val_size_holds_out_training_images_with_the_eval_transform():
    cfg = config(data='fake', fake_size=100, val_size=10, hflip=1.0)
    train, val, n, _ = build_splits(cfg)
    assert (len(train), len(val), n) == (90, 10, 10)
    assert not set(train.indices) & set(val.indices)
    assert build_splits(config(data='fake', fake_size=100, val_size=10, seed=5))[1].indices == val.indices   # one split for all
    assert build_eval_set(cfg)[0].indices == val.indices
    full_eval, _ = build_dataset(cfg, train=True, transform=build_dataset(cfg, train=False)[0].transform)
    i = val.indices[0]
    assert torch.equal(val[0][0], full_eval[i][0])          # no flip: the evaluation transform
    assert not torch.equal(train.dataset[i][0], val[0][0])  # the training transform flips every image
    assert len(build_splits(config(data='fake', fake_size=100))[1]) == 64   # no --val-size: the test split
    with pytest.raises(DataError, match='hold out fewer'):
        build_splits(config(data='fake', fake_size=100, val_size=100))


def test_train_transform_is_random_eval_is_not():
    train, _ = build_dataset(config(hflip=0.5, crop_pad=4), train=True)
    val, _ = build_dataset(config(), train=False)
    assert not all(torch.equal(train[0][0], train[0][0]) for _ in range(5))
    assert torch.equal(val[0][0], val[0][0])


def test_mixup_cutmix_give_soft_targets():
    mixer = batch_mixer(types.SimpleNamespace(mixup=0.8, cutmix=1.0), 10)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    xm, ym = mixer(x, y)
    assert ym.shape == (8, 10) and torch.allclose(ym.sum(-1), torch.ones(8))
    assert batch_mixer(types.SimpleNamespace(mixup=0.0, cutmix=0.0), 10) is None


def test_sampler_shards_and_resumes():
    ds = list(range(20))
    ranks = [ResumableSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=1) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(3)
    a, b = list(ranks[0]), list(ranks[1])
    assert {e for e, _ in a + b} == {3} and sorted(i for _, i in a + b) == ds    # disjoint, complete
    ranks[0].start = 4
    assert list(ranks[0]) == a[4:] and len(ranks[0]) == len(a) - 4


# -----------------------------------------------------------------------------
# CIFAR's python version, written by the test in its exact format


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root, name, rng, monkeypatch, per_file=2):
    """The extracted folder of cifar-10-python.tar.gz / cifar-100-python.tar.gz, each file as the archive
    holds it (a protocol-2 pickle of a dict: a row of 3072 bytes an image, its red, green and blue planes
    row by row), a few images a file, and torchvision's md5 table made these files'. Returns
    {file: (images (n, 32, 32, 3) as one sees them, labels (n,))}."""
    kind = {'cifar10': torchvision.datasets.CIFAR10, 'cifar100': torchvision.datasets.CIFAR100}[name]
    folder = root / kind.base_folder
    folder.mkdir(parents=True)
    out = {}
    for table in ('train_list', 'test_list'):
        files = []
        for f, _ in getattr(kind, table):
            images = rng.integers(0, 256, (per_file, 32, 32, 3), dtype=np.uint8)
            labels = rng.integers(0, 10 if name == 'cifar10' else 100, per_file)
            entry = {'batch_label': f, 'data': images.transpose(0, 3, 1, 2).reshape(per_file, 3072),
                     'filenames': [f'{i}.png' for i in range(per_file)]}
            if name == 'cifar10':
                entry['labels'] = labels.tolist()
            else:
                entry['fine_labels'] = labels.tolist()
                entry['coarse_labels'] = (labels // 5).tolist()
            (folder / f).write_bytes(pickle.dumps(entry, protocol=2))
            files.append([f, md5(folder / f)])
            out[f] = images, labels
        monkeypatch.setattr(kind, table, files)
    from util.datafiles import read_classes
    meta = {kind.meta['key']: read_classes(name)}
    (folder / kind.meta['filename']).write_bytes(pickle.dumps(meta, protocol=2))
    monkeypatch.setattr(kind, 'meta', {**kind.meta, 'md5': md5(folder / kind.meta['filename'])})
    return out


def test_cifar10_batches(tmp_path, monkeypatch):
    written = write_cifar(tmp_path, 'cifar10', np.random.default_rng(0), monkeypatch)
    cfg = config(data='cifar10', data_dir=str(tmp_path), img_size=32)
    train, n = build_dataset(cfg, train=True)
    test, _ = build_dataset(cfg, train=False)
    assert (len(train), len(test), n) == (10, 2, 10) and test.classes[0] == 'airplane'
    images, labels = written['test_batch']
    mean, std = (torch.tensor(v)[:, None, None] for v in DATASETS['cifar10'].stats)
    for i in range(2):
        x, y = test[i]
        want = (torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255 - mean) / std    # (3, 32, 32)
        assert torch.allclose(x, want, atol=1e-6) and y == labels[i]
    first = torch.from_numpy(np.concatenate([written[f'data_batch_{k}'][0] for k in range(1, 6)]))
    assert torch.equal(train.images, first.permute(0, 3, 1, 2))          # the five files, in order


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    written = write_cifar(tmp_path, 'cifar100', np.random.default_rng(1), monkeypatch, per_file=5)
    ds, n = build_dataset(config(data='cifar100', data_dir=str(tmp_path), img_size=32), train=False)
    assert n == 100 and ds.labels.tolist() == written['test'][1].tolist()     # the fine label
    assert torch.equal(ds.images, torch.from_numpy(written['test'][0]).permute(0, 3, 1, 2))


def test_cifar_archive_is_checked_then_extracted(tmp_path, monkeypatch):
    import tarfile
    src = tmp_path / 'src'
    written = write_cifar(src, 'cifar10', np.random.default_rng(2), monkeypatch)
    root = tmp_path / 'root'
    root.mkdir()
    archive = root / 'cifar-10-python.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(src / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'tgz_md5', md5(archive))
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url',
                        lambda *a, **k: pytest.fail('nothing to download'))
    ds, _ = build_dataset(config(data='cifar10', data_dir=str(root), img_size=32), train=False)
    assert ds.labels.tolist() == written['test_batch'][1].tolist()

    archive.write_bytes(archive.read_bytes()[:-100])                  # present but cut short
    shutil.rmtree(root / 'cifar-10-batches-py')
    with pytest.raises(DataError, match=f'{archive} is corrupt .*delete it'):
        build_dataset(config(data='cifar10', data_dir=str(root), img_size=32), train=False)
    assert archive.exists()                                           # never overwritten


def test_cifar_failed_download_is_one_line(tmp_path, monkeypatch):
    """A download cut short leaves its partial archive, which the next run refuses (its md5), never reads."""
    def unreachable(url, root, md5=None):                             # torchvision creates root, then fails mid-file
        os.makedirs(root, exist_ok=True)
        (pathlib.Path(root) / os.path.basename(url)).write_bytes(b'partial')
        raise OSError('network unreachable')
    monkeypatch.setattr(torchvision.datasets.utils, 'download_url', unreachable)
    with pytest.raises(DataError, match='could not be downloaded.*cifar-100-python.tar.gz'):
        build_dataset(config(data='cifar100', data_dir=str(tmp_path), img_size=32), train=True)
    archive = tmp_path / 'cifar-100-python.tar.gz'
    with pytest.raises(DataError, match=f'{archive} is corrupt .*delete it'):
        build_dataset(config(data='cifar100', data_dir=str(tmp_path), img_size=32), train=True)
    assert archive.read_bytes() == b'partial' and os.listdir(tmp_path) == [archive.name]


class Planted:
    """A pickle that, unpickled, creates the file `marker` (a stand-in for any code a file could run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


@pytest.mark.parametrize('damage', ['cut', 'planted', 'missing'])
def test_a_cifar_file_not_the_official_one_is_never_unpickled(tmp_path, monkeypatch, damage):
    """A batch cut short, a pickle that would run code, a batch missing: refused in one line naming the
    folder and the fix, before any file is unpickled (torchvision checks every md5 first)."""
    write_cifar(tmp_path, 'cifar10', np.random.default_rng(3), monkeypatch)
    batch = tmp_path / 'cifar-10-batches-py' / 'test_batch'
    marker = tmp_path / 'ran'
    if damage == 'cut':
        batch.write_bytes(batch.read_bytes()[:-10])
    elif damage == 'planted':
        batch.write_bytes(pickle.dumps({'data': Planted(marker)}, protocol=2))
    else:
        batch.unlink()
    for train in (True, False):
        with pytest.raises(DataError) as e:
            build_dataset(config(data='cifar10', data_dir=str(tmp_path), img_size=32), train=train)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / 'cifar-10-batches-py'} does not hold the official cifar10 files")
        assert 'delete it and run again' in msg and '\n' not in msg
    assert not marker.exists()


# -----------------------------------------------------------------------------
# The augmentation a config asks for


def test_train_transform_carries_the_policy_and_erasing():
    from util.augment import RandAugment
    from data import build_transform
    authors = dict(data='fake', randaug='rand-m9-mstd0.5-inc1', reprob=0.25)
    tf = build_transform(config(**authors), train=True).transforms
    ra = next(t for t in tf if isinstance(t, RandAugment))
    assert ra.fill == (128, 128, 128) and (ra.num_ops, ra.magnitude, ra.std, ra.prob) == (2, 9, 0.5, 0.5)
    assert next(t for t in build_transform(config(**{**authors, 'data': 'imagenet'}), train=True).transforms
                if isinstance(t, RandAugment)).fill == (124, 116, 104)    # timm's: round(255 x ImageNet mean)
    erase = tf[-1]
    assert isinstance(erase, v2.RandomErasing) and erase.value is None and erase.p == 0.25   # noise, not zeros
    assert erase.scale == (0.02, 1 / 3) and erase.ratio == (0.3, 1 / 0.3)
    assert tf.index(ra) < [type(t) for t in tf].index(v2.ToImage)       # on the PIL image, as timm
    evaluation = build_transform(config(**authors), train=False).transforms
    assert not any(isinstance(t, (RandAugment, v2.RandomErasing)) for t in evaluation)
    x, _ = build_dataset(config(**authors), train=True)[0][0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_missing_dataset_directory(tmp_path):
    p = finetune(tmp_path / 'r', '--data', 'folder', '--data-dir', tmp_path / 'missing', check=False)
    assert_one_line_error(p, str(tmp_path / 'missing'))


def test_an_interpreter_whose_loader_workers_are_still_alive_ends(tmp_path):
    """The workers ignore SIGTERM (a scheduler's, while the run saves), and SIGTERM is how multiprocessing ends them at
    the interpreter's exit, before it waits for them: a loader kept in a reference cycle until then (as an error's
    traceback keeps one) left the interpreter waiting forever, the test process's own included."""
    code = ('import types, torch\nfrom util.datafiles import build_loader\n'
            'data = torch.utils.data.TensorDataset(torch.zeros(64, 1), torch.zeros(64, dtype=torch.long))\n'
            'cfg = types.SimpleNamespace(batch_size=8, num_workers=1, seed=0)\n'
            'cycle = [iter(build_loader(cfg, data, train=True))]\n'
            'next(cycle[0])\ncycle.append(cycle)\n')
    p = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=sub_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and not p.stderr, p.stderr[-2000:]
