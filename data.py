"""
What a model is fed: datasets by name, their transforms, batch mixing (MixUp / CutMix),
the train / eval splits, and their loaders (a test split's classes checked against the trained
models scored on it: ensemble.py, evaluate.py). What each data set is (one row of
util/datafiles.DATASETS), how its files are found and read, and how a loader makes each batch the
same after a resume: util/datafiles.py.

    --data fashion-mnist | cifar10 | cifar100    files from --data-dir (util/datafiles.py says
                                                 where else, and how)
    --data imagenet | folder                     ImageFolder: <data-dir>/train/<class>/*.JPEG
                                                 and val/...
    --data fake                                  torchvision FakeData: random images, for smoke runs

Every image comes out as 3 channels (grey images are repeated), so one model shape fits all.

Two paths, by what an image costs to read:
- In memory (Fashion-MNIST, CIFAR-10 / 100, a small fake set: util/datafiles.py): the split
  is read once as uint8 (N, C, H, W) and held on the run's device (in the host's memory where
  the device has too little free: one line of the log says so). A batch is gathered there by
  the sampler's indices and transformed as a whole (BatchTransform: crop, flip, RandAugment per
  image, erasing, in a few kernels), without a worker: a pipeline that passes each image through
  Python in worker processes cannot feed a GPU with images this small.
- Folders (ImageNet, any ImageFolder): decoding a JPEG is CPU work, an image at a time, so these
  keep the per-image transforms (build_transform) in --num-workers loader processes. A larger
  scale would decode on the GPU (torchvision.io.decode_jpeg on a CUDA device) or hand the whole
  pipeline to NVIDIA DALI; neither is built here.
"""
import copy
import os
from functools import partial
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, Subset

from util.augment import BatchRandAugment, erase, erasing_boxes, randaugment
from util.errors import DataError
from util.datafiles import DATASETS, TensorImages, build_loader, held_in_memory, send, unwrap

# Shifted test images, labels unchanged (evaluate.py --shift): the paper's ImageNet-V2 (mildly:
# translate), -R, -Sketch and -A in miniature. Each acts on the image in [0, 1], before its
# normalisation; pixels that come from outside the image are black, as Fashion-MNIST's background.
SHIFTS = ('none', 'translate', 'invert', 'rotate', 'blur', 'noise')


def shifted(shift):
    """The transforms of a shift (one of SHIFTS), on images in [0, 1]; none for 'none'."""
    if shift == 'none':
        return []
    from torchvision.transforms import v2
    return {'translate': [partial(v2.functional.affine, angle=0.0, translate=[2, 2], scale=1.0,
                                  shear=[0.0])],  # 2 px
            'invert': [v2.RandomInvert(p=1.0)],   # 1 - x: dark clothes on white
            'rotate': [partial(v2.functional.rotate, angle=20.0)],   # 20 degrees anticlockwise
            'blur': [v2.GaussianBlur(5, sigma=1.0)],
            'noise': [v2.GaussianNoise(sigma=0.2)]}[shift]   # seeded by the image's index; clipped

# -----------------------------------------------------------------------------
# Transforms (torchvision.transforms.v2). PIL images (ImageFolder, FakeData) stay PIL until ToImage,
# as in timm's pipeline: its RandAugment ops are Pillow's, which ours then match pixel for pixel.
# torchvision is imported where it is used: importing it imports torch's compiler (torch._dynamo),
# a second or more, which a data set held in memory (BatchTransform, plain torch ops) never needs.

def build_transform(cfg, train, shift='none'):
    from torchvision.transforms import v2
    native, (mean, std) = DATASETS[cfg.data].size, DATASETS[cfg.data].stats
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
        t += [randaugment(cfg.randaug, fill=mean_colour(mean))]
    t += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), *shifted(shift),
          v2.Normalize(mean, std)]
    if train and cfg.reprob > 0:
        from util.augment import random_erasing
        t += [random_erasing(cfg.reprob)]
    return v2.Compose(t)


def mean_colour(mean):
    """A data set's mean colour in 0-255: timm's RandAugment fill."""
    return tuple(min(255, round(255 * m)) for m in mean)


class BatchTransform:
    """build_transform's pipeline for a data set held in memory, on a whole batch of uint8 images
    (B, 1 or 3, H, W) on their device: grey repeated to 3 channels, the size; to train, the crop
    (reflect-padded), the flip, RandAugment; then [0, 1], a shift, the normalisation; to train,
    erasing. draw() makes a batch's random choices on the host, by name (a CPU generator; each
    image's flip its own seed's first draw: util/datafiles.py's TensorBatches), apply() runs them on
    the device without waiting for it. Called on a batch alone, it draws from torch's global RNG."""

    def __init__(self, cfg, train, shift='none'):
        native, (mean, std) = DATASETS[cfg.data].size, DATASETS[cfg.data].stats
        self.size = cfg.img_size
        self.resize = None
        if cfg.img_size != native:   # torchvision's, imported once, where a size asks for it
            from torchvision.transforms.v2.functional import resize
            self.resize = partial(resize, size=[cfg.img_size])
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.pad = cfg.crop_pad if train else 0
        self.hflip = cfg.hflip if train else 0.0
        self.randaug = None
        if train and cfg.randaug:
            policy = randaugment(cfg.randaug, fill=mean_colour(mean))
            self.randaug = BatchRandAugment(policy, cfg.img_size)
        self.reprob = cfg.reprob if train else 0.0
        self.shift = shifted(shift)
        self.noise = self.shift[0].sigma if shift == 'noise' else 0.0   # drawn by draw(), as v2.GaussianNoise

    def to(self, device):
        """This transform with its constants on device (made there once, not at every batch)."""
        other = copy.copy(self)
        other.mean = self.mean.to(device)
        other.std = self.std.to(device)
        if self.randaug:
            other.randaug = copy.copy(self.randaug).to(device)
        return other

    def draw(self, n, generator=None, first=None, seeds=None):
        """(draws, groups): a batch's random choices on the host, {name: tensor} to send to the
        device ('flip', 'corners' of the crop, RandAugment's 'order i' and 'rows i' of each op slot
        i, erasing's 'boxes', a shift's 'noise'), and the RandAugment groups the host keeps. first
        (n,): each image's first draw in [0, 1) (its flip); seeds (n,): each image's seed (a noise
        shift's); None: drawn from the generator."""
        uniform = torch.rand(n, generator=generator) if first is None else torch.as_tensor(first)
        draws = {'flip': uniform < self.hflip}
        groups = []
        if self.pad:   # each image's top-left corner in the padded image
            draws['corners'] = torch.randint(2 * self.pad + 1, (n, 2), generator=generator)
        if self.randaug:
            for i, (op_groups, order, rows) in enumerate(self.randaug.draw(n, generator)):
                groups.append(op_groups)
                draws[f'order {i}'] = order
                draws[f'rows {i}'] = rows
        if self.reprob:
            draws['boxes'] = erasing_boxes(n, self.size, self.reprob, generator)
        if self.noise:   # SeededDataset's: its own
            generators = [None] * n
            if seeds is not None:
                generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
            noise = [torch.randn(3, self.size, self.size, generator=g) for g in generators]
            draws['noise'] = torch.stack(noise)
        return draws, groups

    def apply(self, x, draws, groups, generator=None):
        """The batch x (B, C, H, W) uint8 transformed by the choices draw() made (draws on x's
        device): (B, 3, size, size) float32. generator: on x's device, for erasing's noise."""
        x = x.expand(-1, 3, -1, -1)
        if self.resize:
            x = self.resize(x)
        if self.pad:   # v2.functional.pad's reflection: in float32, its pixels whole numbers
            padded = torch.nn.functional.pad(x.float(), [self.pad] * 4, mode='reflect').to(x.dtype)
            x = crop(padded, draws['corners'].long(), self.size)
        if self.hflip:   # evaluation's, and --hflip 0's, flip nothing
            x = torch.where(draws['flip'].bool().view(-1, 1, 1, 1), x.flip(-1), x)
        if self.randaug:
            slots = [(g, draws[f'order {i}'].long(), draws[f'rows {i}'])
                     for i, g in enumerate(groups)]
            x = self.randaug(x, slots)
        x = x.to(torch.float32).mul_(1 / 255)   # v2.functional.to_dtype(x, torch.float32, scale=True)
        if self.noise:   # v2.GaussianNoise (mean 0) with the noise drawn
            x = (x + draws['noise'].float() * self.noise).clamp(0, 1)
        else:
            for t in self.shift:
                x = t(x)
        x = x.sub(self.mean).div_(self.std)
        return x if 'boxes' not in draws else erase(x, draws['boxes'], generator)

    def __call__(self, x):
        draws, groups = self.draw(len(x))
        return self.apply(x, send(draws, x.device), groups)


def crop(x, corners, size):
    """Each image of x (B, C, H, W) cropped to size x size from its own top-left corner
    (corners (B, 2))."""
    rows = corners[:, :1] + torch.arange(size, device=x.device)                    # (B, size)
    cols = corners[:, 1:] + torch.arange(size, device=x.device)
    batch = torch.arange(len(x), device=x.device)[:, None, None]
    out = x[batch, :, rows[:, :, None], cols[:, None, :]]              # (B, size, size, C)
    return out.permute(0, 3, 1, 2)


def batch_mixer(cfg, num_classes):
    """MixUp / CutMix on a whole batch (one is picked per batch), or None when both are off.
    Returns soft targets (B, num_classes); label smoothing is applied in the loss."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from torchvision.transforms import v2
    mixers = [m(alpha=a, num_classes=num_classes)
              for m, a in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if a > 0]
    return v2.RandomChoice(mixers)


# -----------------------------------------------------------------------------
# Datasets by name, and the train / eval splits

class Splits(NamedTuple):
    train: Dataset
    # the test split, or with --val-size n, n training images held out from training
    eval: Dataset
    num_classes: int
    # the class names, index = label: what a run records it was trained to tell apart
    classes: list


def build_data(plan):
    """The splits and their loaders (train, then eval), the data stated in the run's log; a data
    set held in memory is moved to the run's device once (held_where), its batches made there."""
    cfg = plan.cfg
    data = build_splits(cfg)
    plan.log(f'data: {cfg.data}, {len(data.train)} training and {len(data.eval)} '
             f"{'held-out training' if cfg.val_size else 'test'} images of {data.num_classes} "
             f'classes, {data_source(data.train)}')
    if cfg.val_size:
        plan.log(f'evaluating on {cfg.val_size} held-out training images (--val-size), '
                 f'not the test split')
    data = data._replace(**held_where(plan.device, plan.log, train=data.train, eval=data.eval))
    return (data, build_loader(cfg, data.train, True, plan.rank, plan.world, plan.device),
            build_loader(cfg, data.eval, False, plan.rank, plan.world, plan.device,
                         eval_batch_size(cfg, plan.device)))


# an evaluation batch on a GPU (--eval-batch-size auto): it keeps no gradients, so a batch far past training's fits,
# and a small model's evaluation makes a tenth of the launches it would at a training batch of 128
EVAL_BATCH = 1000


def eval_batch_size(cfg, device):
    """The images of an evaluation batch: --eval-batch-size, or for 0 (auto) on a GPU EVAL_BATCH or --batch-size if
    larger, on a CPU --batch-size (as the committed CPU runs evaluated). Its metrics are the same at any batch, to
    float rounding."""
    if cfg.eval_batch_size:
        return cfg.eval_batch_size
    if device.type == 'cuda':
        return max(EVAL_BATCH, cfg.batch_size)
    return cfg.batch_size


def data_device(device, need, free, log):
    """Where a data set of `need` bytes is held for a run on `device` with `free` bytes free
    (None: the host's): there if it takes at most half of them; else in the host's memory, never
    failing later for want of it. On a GPU one line to `log` says which."""
    if device.type == 'cpu':
        return device
    if device.type == 'cuda':
        if need <= free // 2:
            log(f'data: its {need / 2 ** 20:,.0f} MiB of images held on {device} '
                f'({free / 2 ** 20:,.0f} MiB free), each batch made there')
            return device
        log(f'data: its {need / 2 ** 20:,.0f} MiB of images do not fit in half of the '
            f'{free / 2 ** 20:,.0f} MiB free on {device}: held in the host\'s memory, each batch '
            f'made there and copied')
    return torch.device('cpu')


def held_on(device, **splits):
    """The splits with their in-memory images and labels on device, each tensor moved once (a
    held-out split shares its training split's)."""
    moved = {}

    def move(d):
        if isinstance(d, Subset):
            return Subset(move(d.dataset), d.indices)
        if id(d.images) not in moved:
            moved[id(d.images)] = d.images.to(device), d.labels.to(device)
        return d.holding(*moved[id(d.images)])
    return {name: move(d) for name, d in splits.items()}


def held_where(device, log, **splits):
    """The splits (of one data set) with their images held in memory where a run on `device` holds
    them (data_device), each tensor moved once; splits read from files, as they are."""
    held = {}   # the bytes of each in-memory split's tensors, by id: a held-out split shares them
    for d in map(unwrap, splits.values()):
        if isinstance(d, TensorImages):
            held[id(d.images)] = d.images.nbytes + d.labels.nbytes
    if not held:
        return splits
    free = torch.cuda.mem_get_info(device)[0] if device.type == 'cuda' else None
    return held_on(data_device(device, sum(held.values()), free, log), **splits)


def build_splits(cfg):
    """Splits(train, eval, num_classes, classes): the eval set is the test split, or
    with --val-size n, n training images held out from training (see build_eval_set)."""
    full, num_classes = build_dataset(cfg, train=True)
    train_set = full
    if cfg.val_size:
        train_set = Subset(full, held_out_order(cfg, len(full))[cfg.val_size:])
    eval_set = build_eval_set(cfg, held=full if isinstance(full, TensorImages) else None)[0]
    return Splits(train_set, eval_set, num_classes, class_names(train_set, num_classes))


def sample_images(data, n, device):
    """The first n evaluation images, (n, 3, H, W): what the start-up checks run the models on."""
    return torch.stack([data.eval[i][0] for i in range(min(n, len(data.eval)))]).to(device)


def class_names(dataset, num_classes):
    """A dataset's class names (its `classes`, as torchvision's datasets have them;
    FakeData's: the labels)."""
    return list(getattr(unwrap(dataset), 'classes', None) or map(str, range(num_classes)))


def data_source(dataset):
    """Where a dataset's images come from, in a few words: 'read from <folder>', or for
    FakeData 'made at random'."""
    source = getattr(unwrap(dataset), 'source', None)
    return f'read from {source}' if source else 'made at random (torchvision FakeData)'


def build_eval_set(cfg, shift='none', held=None):
    """(dataset, num_classes): the test split; with --val-size n, n training images (the same ones for
    every seed and script) seen with the evaluation transform: the split to make choices on, so that
    the test split is looked at once, at the end. shift: its images changed (SHIFTS), labels not.
    held: the training split when already held in memory: the held-out images share its tensors."""
    transform = transform_for(cfg, False, shift)
    if not cfg.val_size:
        return build_dataset(cfg, train=False, transform=transform)
    if held is not None:
        images = held.holding(held.images, held.labels, transform)
        num_classes = DATASETS[cfg.data].classes
    else:
        images, num_classes = build_dataset(cfg, train=True, transform=transform)
    return Subset(images, held_out_order(cfg, len(images))[:cfg.val_size]), num_classes


def held_out_order(cfg, n):
    """A fixed permutation of the n training images; its first cfg.val_size are held out."""
    if not 0 < cfg.val_size < n:
        raise DataError(f'--val-size {cfg.val_size}: the training split has {n} images; '
                        f'hold out fewer (e.g. {n // 12})')
    return torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()


def transform_for(cfg, train, shift='none'):
    """A data set's transform: BatchTransform where it is held in memory, else build_transform's
    per-image pipeline."""
    if held_in_memory(cfg):
        return BatchTransform(cfg, train, shift)
    return build_transform(cfg, train, shift)


def build_dataset(cfg, train, transform=None):
    """Returns (dataset, num_classes): a split of the data set cfg.data names, read by its reader
    (util/datafiles.DATASETS). Raises DataError with the fix when data is missing. train: which split; its transform
    too unless `transform` is given (--data was checked against the data sets' names where the command line was
    read)."""
    row = DATASETS[cfg.data]
    dataset = row.read(os.path.expanduser(cfg.data_dir), train, transform or transform_for(cfg, train), cfg)
    return dataset, row.classes or len(dataset.classes)
