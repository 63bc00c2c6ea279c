"""
What a model is fed: datasets by name, their transforms, batch mixing (MixUp / CutMix),
the train / eval splits, and their loaders. How each data set's files are found and
read: util/datafiles.py; how a loader makes each image's augmentation the same after a
resume: util/engine.py.

    --data fashion-mnist | cifar10 | cifar100    files from --data-dir (util/datafiles.py says
                                                 where else, and how)
    --data imagenet | folder                     ImageFolder: <data-dir>/train/<class>/*.JPEG
                                                 and val/...
    --data fake                                  torchvision FakeData: random images, for smoke runs

Every image comes out as 3 channels (grey images are repeated), so one model shape fits all.
"""
import os
from functools import partial
from typing import NamedTuple

import torch
import torchvision
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from util.config import DataError
from util.datafiles import CIFAR, cifar, fashion_mnist, image_folder
from util.engine import build_loader

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INFO = {   # name -> (native image size, classes, (mean, std))
    'cifar10': (32, 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    'cifar100': (32, 100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    'fashion-mnist': (28, 10, ((0.2860,) * 3, (0.3530,) * 3)),
    'imagenet': (224, 1000, IMAGENET_STATS),
    'folder': (224, None, IMAGENET_STATS),
    'fake': (32, 10, ((0.5,) * 3, (0.5,) * 3)),
}

# Shifted test images, labels unchanged (evaluate.py --shift): the paper's ImageNet-V2 (mildly:
# translate), -R, -Sketch and -A in miniature. Each acts on the image in [0, 1], before its
# normalisation; pixels that come from outside the image are black, as Fashion-MNIST's background.
SHIFTS = {'none': [],
          'translate': [partial(v2.functional.affine, angle=0.0, translate=[2, 2], scale=1.0,
                                shear=[0.0])],  # 2 px
          'invert': [v2.RandomInvert(p=1.0)],                            # 1 - x: dark clothes on white
          'rotate': [partial(v2.functional.rotate, angle=20.0)],        # 20 degrees anticlockwise
          'blur': [v2.GaussianBlur(5, sigma=1.0)],
          'noise': [v2.GaussianNoise(sigma=0.2)]}                        # seeded by the image's index; clipped

# -----------------------------------------------------------------------------
# Transforms (torchvision.transforms.v2). PIL images (ImageFolder, FakeData) stay PIL until ToImage,
# as in timm's pipeline: its RandAugment ops are Pillow's, which ours then match pixel for pixel.

def build_transform(cfg, train, shift='none'):
    native, _, (mean, std) = INFO[cfg.data]
    size = cfg.img_size
    t = []
    if cfg.data in ('imagenet', 'folder'):
        if train:
            t += [v2.RandomResizedCrop(size, scale=(cfg.min_scale, 1.0),
                                       interpolation=v2.InterpolationMode.BICUBIC)]
        else:   # the standard 0.875 centre crop
            t += [v2.Resize(int(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC),
                  v2.CenterCrop(size)]
    else:
        if size != native:
            t += [v2.Resize(size)]
        if train and cfg.crop_pad > 0:
            t += [v2.RandomCrop(size, padding=cfg.crop_pad, padding_mode='reflect')]
    if train and cfg.hflip > 0:
        t += [v2.RandomHorizontalFlip(cfg.hflip)]
    if train and cfg.randaug:   # timm's RandAugment, and its fill
        from util.augment import randaugment
        t += [randaugment(cfg.randaug, fill=tuple(min(255, round(255 * m)) for m in mean))]
    t += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *SHIFTS[shift],
          v2.Normalize(mean, std)]
    if train and cfg.reprob > 0:
        from util.augment import random_erasing
        t += [random_erasing(cfg.reprob)]
    return v2.Compose(t)


def batch_mixer(cfg, num_classes):
    """MixUp / CutMix on a whole batch (one is picked per batch), or None when both are off.
    Returns soft targets (B, num_classes); label smoothing is applied in the loss."""
    mixers = [m(alpha=a, num_classes=num_classes)
              for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
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
             f"{'held-out training' if cfg.val_size else 'test'} images of {data.num_classes} "
             f'classes, {data_source(data.train)}')
    if cfg.val_size:
        plan.log(f'evaluating on {cfg.val_size} held-out training images (--val-size), not the test split')
    return (data, build_loader(cfg, data.train, True, plan.rank, plan.world),
            build_loader(cfg, data.eval, False, plan.rank, plan.world))


def build_splits(cfg):
    """Splits(train, eval, num_classes, classes): the eval set is the test split, or
    with --val-size n, n training images held out from training (see build_eval_set)."""
    train_set, num_classes = build_dataset(cfg, train=True)
    if cfg.val_size:
        train_set = Subset(train_set, held_out_order(cfg, len(train_set))[cfg.val_size:])
    return Splits(train_set, build_eval_set(cfg)[0], num_classes,
                  class_names(train_set, num_classes))


def sample_images(data, n, device):
    """The first n evaluation images, (n, 3, H, W): what the start-up checks run the models on."""
    return torch.stack([data.eval[i][0] for i in range(min(n, len(data.eval)))]).to(device)


def class_names(dataset, num_classes):
    """A dataset's class names (its `classes`, as torchvision's datasets have them;
    FakeData's: the labels)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return list(getattr(dataset, 'classes', None) or map(str, range(num_classes)))


def data_source(dataset):
    """Where a dataset's images come from, in a few words: 'read from <folder>', or for
    FakeData 'made at random'."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    source = getattr(dataset, 'source', None)
    return f'read from {source}' if source else 'made at random (torchvision FakeData)'


def build_eval_set(cfg, shift='none'):
    """(dataset, num_classes): the test split; with --val-size n, n training images (the same ones for
    every seed and script) seen with the evaluation transform: the split to make choices on, so that
    the test split is looked at once, at the end. shift: its images changed (SHIFTS), labels not."""
    transform = build_transform(cfg, train=False, shift=shift)
    if not cfg.val_size:
        return build_dataset(cfg, train=False, transform=transform)
    images, num_classes = build_dataset(cfg, train=True, transform=transform)
    return Subset(images, held_out_order(cfg, len(images))[:cfg.val_size]), num_classes


def held_out_order(cfg, n):
    """A fixed permutation of the n training images; its first cfg.val_size are held out."""
    if not 0 < cfg.val_size < n:
        raise DataError(f'--val-size {cfg.val_size}: the training split has {n} images; '
                        f'hold out fewer (e.g. {n // 12})')
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
    if cfg.data in CIFAR:
        classes = INFO[cfg.data][1]
        return cifar(root, cfg.data, train, tf, classes), classes
    return image_folder(cfg.data, root, train, tf)
