"""data.py: the real Fashion-MNIST files, ImageFolder, FakeData, transforms, MixUp / CutMix, samplers."""
import gzip
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from data import (FASHION_MNIST_SYSTEM_DIR, DataError, ResumableSampler, batch_mixer, build_dataset, build_eval_set,
                  build_splits, read_idx)
from finetune import PRESETS, FinetuneConfig


def config(**kw):
    return FinetuneConfig(**{**PRESETS['fake'], 'num_workers': 0, **kw})


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / 'x.gz', a)
    assert torch.equal(read_idx(str(tmp_path / 'x.gz')), torch.from_numpy(a.astype(np.uint8)))


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
    write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (7, 28, 28)))
    write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', rng.integers(0, 10, (7,)))
    ds, _ = build_dataset(config(data='fashion-mnist', img_size=28, data_dir=str(tmp_path)), train=False)
    assert len(ds) == 7


def test_image_folder_and_missing_split(tmp_path):
    for split in ('train', 'val'):
        for c in ('cat', 'dog', 'grey'):
            os.makedirs(tmp_path / split / c)
            mode = 'L' if c == 'grey' else 'RGB'
            for i in range(2):
                Image.new(mode, (40 + 7 * i, 30), color=60 * i).save(tmp_path / split / c / f'{i}.png')
    cfg = config(data='folder', data_dir=str(tmp_path), img_size=32)
    train, n = build_dataset(cfg, train=True)
    val, _ = build_dataset(cfg, train=False)
    assert n == 3 and len(train) == 6
    assert all(train[i][0].shape == (3, 32, 32) and val[i][0].shape == (3, 32, 32) for i in range(6))
    with pytest.raises(DataError, match='expects --data-dir with train/<class>'):
        build_dataset(config(data='imagenet', data_dir=str(tmp_path / 'nowhere')), train=True)
    with pytest.raises(DataError, match='unknown --data'):
        build_dataset(config(data='mnist'), train=True)


def test_val_size_holds_out_training_images_with_the_eval_transform():
    cfg = config(data='fake', fake_size=100, val_size=10, hflip=1.0)
    train, val, n = build_splits(cfg)
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
