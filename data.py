"""
What a model is fed: datasets by name, their transforms, batch mixing (MixUp / CutMix), the train / eval
splits, and their loaders. How each data set's files are found and read: util/datafiles.py; how a loader makes
each image's augmentation the same after a resume: util/loader.py.

    --data fashion-mnist                         IDX files from --data-dir, else Debian's dataset-fashion-mnist
                                                 (/usr/share/datasets/fashion-mnist), else downloaded: read here
    --data cifar10 | cifar100                    files from --data-dir (util/datafiles.py says where else, and how)
    --data imagenet | folder                     ImageFolder: <data-dir>/train/<class>/*.JPEG and val/...
    --data fake                                  torchvision FakeData: random images, for smoke runs

Every image comes out as 3 channels (grey images are repeated), so one model shape fits all.
"""
import gzip
import math
import os
import zlib
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from util.config import DataError
from util.loader import TensorImages, build_loader

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INFO = {   # name -> (native image size, classes, (mean, std))
    'cifar10': (32, 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    'cifar100': (32, 100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    'fashion-mnist': (28, 10, ((0.2860,) * 3, (0.3530,) * 3)),
    'imagenet': (224, 1000, IMAGENET_STATS),
    'folder': (224, None, IMAGENET_STATS),
    'fake': (32, 10, ((0.5,) * 3, (0.5,) * 3)),
}

# -----------------------------------------------------------------------------
# Transforms (torchvision.transforms.v2). PIL images (ImageFolder, FakeData) stay PIL until ToImage, as in
# timm's pipeline: its RandAugment ops are Pillow's, which ours then match pixel for pixel.

def build_transform(cfg, train):
    native, _, (mean, std) = INFO[cfg.data]
    size = cfg.img_size
    t = []
    if cfg.data in ('imagenet', 'folder'):
        if train:
            t += [v2.RandomResizedCrop(size, scale=(cfg.min_scale, 1.0), antialias=True,
                                       interpolation=v2.InterpolationMode.BICUBIC)]
        else:   # the standard 0.875 centre crop
            t += [v2.Resize(int(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                  v2.CenterCrop(size)]
    else:
        if size != native:
            t += [v2.Resize(size, antialias=True)]
        if train and cfg.crop_pad > 0:
            t += [v2.RandomCrop(size, padding=cfg.crop_pad, padding_mode='reflect')]
    if train:
        t += [v2.RandomHorizontalFlip(cfg.hflip)] if cfg.hflip > 0 else []
    if train and cfg.randaug:   # timm's RandAugment, and its fill
        from util.augment import randaugment
        t += [randaugment(cfg.randaug, fill=tuple(min(255, round(255 * m)) for m in mean))]
    t += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and cfg.reprob > 0:
        from util.augment import random_erasing
        t += [random_erasing(cfg.reprob)]
    return v2.Compose(t)


def batch_mixer(cfg, num_classes):
    """MixUp / CutMix on a whole batch (one is picked per batch), or None when both are off.
    Returns soft targets (B, num_classes); label smoothing is applied in the loss."""
    mixers = [m(alpha=a, num_classes=num_classes) for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix))
              if a > 0]
    return v2.RandomChoice(mixers) if mixers else None


# -----------------------------------------------------------------------------
# Datasets by name, and the train / eval splits

class Splits(NamedTuple):
    train: Dataset
    eval: Dataset        # the test split, or with --val-size n, n training images held out from training
    num_classes: int
    classes: list        # the class names, index = label: what a run records it was trained to tell apart


def build_data(plan):
    """The splits and their loaders (train, then eval), the data stated in the run's log."""
    cfg = plan.cfg
    data = build_splits(cfg)
    plan.log(f'data: {cfg.data}, {len(data.train)} training and {len(data.eval)} '
             f"{'held-out training' if cfg.val_size else 'test'} images of {data.num_classes} classes, "
             f'{data_source(data.train)}')
    if cfg.val_size:
        plan.log(f'evaluating on {cfg.val_size} held-out training images (--val-size), not the test split')
    return (data, build_loader(cfg, data.train, True, plan.rank, plan.world),
            build_loader(cfg, data.eval, False, plan.rank, plan.world))


def build_splits(cfg):
    """Splits(train, eval, num_classes, classes): the eval set is the test split, or with --val-size n, n training
    images held out from training (see build_eval_set)."""
    train_set, num_classes = build_dataset(cfg, train=True)
    if cfg.val_size:
        train_set = Subset(train_set, held_out_order(cfg, len(train_set))[cfg.val_size:])
    return Splits(train_set, build_eval_set(cfg)[0], num_classes, class_names(train_set, num_classes))


def sample_images(data, n, device):
    """The first n evaluation images, (n, 3, H, W): what the start-up checks run the models on."""
    return torch.stack([data.eval[i][0] for i in range(min(n, len(data.eval)))]).to(device)


def class_names(dataset, num_classes):
    """A dataset's class names (its `classes`, as torchvision's datasets have them; FakeData's: the labels)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(getattr(dataset, 'classes', None) or map(str, range(num_classes)))


def data_source(dataset):
    """Where a dataset's images come from, in a few words: 'read from <folder>', or for FakeData 'made at random'."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    source = getattr(dataset, 'source', None)
    return f'read from {source}' if source else 'made at random (torchvision FakeData)'


def build_eval_set(cfg):
    """(dataset, num_classes): the test split; with --val-size n, n training images (the same ones for
    every seed and script) seen with the evaluation transform: the split to make choices on, so that
    the test split is looked at once, at the end."""
    if not cfg.val_size:
        return build_dataset(cfg, train=False)
    images, num_classes = build_dataset(cfg, train=True, transform=build_transform(cfg, train=False))
    return Subset(images, held_out_order(cfg, len(images))[:cfg.val_size]), num_classes


def held_out_order(cfg, n):
    """A fixed permutation of the n training images; its first cfg.val_size are held out."""
    if not 0 < cfg.val_size < n:
        raise DataError(f'--val-size {cfg.val_size}: the training split has {n} images; hold out fewer '
                        f'(e.g. {n // 12})')
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()


def build_dataset(cfg, train, transform=None):
    """Returns (dataset, num_classes). Raises DataError with the fix when data is missing.
    train: which split; its transform too unless `transform` is given."""
    if cfg.data not in INFO:
        raise DataError(f"unknown --data '{cfg.data}'; choose one of {', '.join(INFO)}")
    tf, root = transform or build_transform(cfg, train), os.path.expanduser(cfg.data_dir)
    if cfg.data == 'fashion-mnist':
        return fashion_mnist(root, train, tf), 10
    if cfg.data == 'fake':
        n = cfg.fake_size if train else max(cfg.fake_size // 8, 64)
        return torchvision.datasets.FakeData(n, (3, cfg.img_size, cfg.img_size), 10, tf,
                                             random_offset=0 if train else 10 ** 6), 10
    from util.datafiles import CIFAR, cifar, image_folder   # the other data sets' files: read only where used
    if cfg.data in CIFAR:
        classes = INFO[cfg.data][1]
        return cifar(root, cfg.data, train, tf, classes), classes
    return image_folder(cfg.data, root, train, tf)

# -----------------------------------------------------------------------------
# Fashion-MNIST from its IDX files (the format of MNIST: a magic number, sizes, then raw bytes)

FASHION_MNIST_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'

def read_idx(path):
    """An IDX file of unsigned bytes (0, 0, 8, the number of dimensions, each size as a big-endian int32, then
    the data), gzipped or not, as a uint8 tensor; one that is not one, or is cut short, is a DataError."""
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:   # not gzip (BadGzipFile is an OSError), or a cut .gz
        raise damaged_idx([path], f'cannot be read ({type(e).__name__}: {e})') from None
    ndim = data[3] if len(data) >= 4 and data[:3] == bytes([0, 0, 8]) else 0
    if not ndim or len(data) < 4 + 4 * ndim:
        raise damaged_idx([path], 'is not an IDX file of bytes (its header is not 00 00 08 and the sizes)')
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    if len(data) - 4 - 4 * ndim != math.prod(shape):
        raise damaged_idx([path], f'has {len(data) - 4 - 4 * ndim} bytes of data where its header says '
                                  f'{" x ".join(map(str, shape))} = {math.prod(shape)}')
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def damaged_idx(paths, problem):
    """DataError: the files, what is wrong with them, and how to get intact ones."""
    it = 'it' if len(paths) == 1 else 'them'
    system = all(p.startswith(FASHION_MNIST_SYSTEM_DIR) for p in paths)
    fix = f'reinstall {it}: apt-get install --reinstall dataset-fashion-mnist' if system else \
        f'delete {it} and run again to download {it} anew'
    return DataError(f"{' and '.join(paths)} {problem}: {fix}")


def find_idx(directory, stem):
    """directory/stem or directory/stem.gz, whichever exists (None: neither)."""
    return next((p for p in (os.path.join(directory, stem), os.path.join(directory, stem + '.gz'))
                 if os.path.isfile(p)), None)


FASHION_MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                       't10k-labels-idx1-ubyte')


def fashion_mnist_files(dirs):
    """{stem: path} of the first of dirs that holds all four Fashion-MNIST files (None: none does). A data set's
    files come from one place: a folder holding only some of them is a DataError naming what it lacks, never
    paired with files found in the next folder (images from one place, labels from another)."""
    for d in dirs:
        found = {stem: find_idx(d, stem) for stem in FASHION_MNIST_FILES}
        if all(found.values()):
            return found
        if any(found.values()):
            missing = [s for s, p in found.items() if p is None]
            raise DataError(f"{d} holds only some of Fashion-MNIST's files (not {', '.join(missing)}[.gz]): put all "
                            f"four there, or remove them to read the data set from elsewhere")
    return None


def fashion_mnist(data_dir, train, transform):
    """One split of Fashion-MNIST, from the first folder holding all its four files: --data-dir, torchvision's
    download folder in it (FashionMNIST/raw), Debian's dataset-fashion-mnist; else downloaded there by torchvision."""
    stem = 'train' if train else 't10k'
    dirs = [data_dir, os.path.join(data_dir, 'FashionMNIST', 'raw'), FASHION_MNIST_SYSTEM_DIR]
    files = fashion_mnist_files(dirs)
    if files is None:
        try:   # last resort: torchvision's download (needs the internet)
            torchvision.datasets.FashionMNIST(data_dir, train=train, download=True)
        except Exception:
            raise DataError(f"Fashion-MNIST not found in {', '.join(dirs)} and could not be downloaded; put its "
                            f"four files ({', '.join(FASHION_MNIST_FILES)}, each [.gz]) in --data-dir, or "
                            f"`apt-get install dataset-fashion-mnist`") from None
        return fashion_mnist(data_dir, train, transform)
    images, labels = files[f'{stem}-images-idx3-ubyte'], files[f'{stem}-labels-idx1-ubyte']
    x, y = read_idx(images), read_idx(labels)                                  # (N, 28, 28), (N,)
    if x.dim() == 3 and x.shape[1:] != (28, 28):   # 32 x 32, say: it would fail in the model, with a traceback
        raise damaged_idx([images], f"holds images of {x.shape[1]} x {x.shape[2]} pixels, not Fashion-MNIST's 28 x 28")
    if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
        raise damaged_idx([images, labels], f'do not pair up: images {tuple(x.shape)}, labels {tuple(y.shape)} '
                                            f'(expected (N, 28, 28) and (N,))')
    if len(y) and y.max() >= 10:
        raise damaged_idx([labels], f'holds label {y.max()}, not a Fashion-MNIST class (0-9)')
    return TensorImages(x[:, None], y, transform, torchvision.datasets.FashionMNIST.classes,
                        os.path.dirname(os.path.abspath(images)))
