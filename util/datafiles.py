"""
The data: each data set's files found, downloaded when missing (checksummed), read and checked (a damaged or
misplaced file is one DataError naming it and the fix), and the loader that batches them.

    Fashion-MNIST   IDX files from --data-dir, else Debian's dataset-fashion-mnist, else downloaded (by
                    torchvision); read here (read_idx)
    CIFAR-10 / 100  the python version's batches, extracted from its archive (downloaded if absent); read by
                    torchvision's CIFAR10 / CIFAR100, which check each file's md5 before unpickling it
    ImageNet, any   ImageFolder's layout, <split>/<class>/<image>, each class numbered once for every split;
    class folders   hidden entries are neither classes nor images; each image read as what it is; a pipe, socket
                    or device named like an image refused before any image is opened (util/folders.py)

Fashion-MNIST and CIFAR are held in memory whole (TensorImages, uint8 on the run's device), their batches
gathered and augmented there (TensorBatches); a folder's images are read one at a time by loader workers
(SeededDataset). Each epoch can start part-way (ResumableSampler): a resumed run sees the batches of one that
never stopped. Every data set has `classes` (index = label) and `source` (the folder its files came from).
Each data set is declared once, as a row of DATASETS at the end (its size, classes, statistics, training images,
whether it is held in memory, its reader); data.py says how it is augmented. torchvision is imported where a
reader needs it (CIFAR, folders, random images, a download): importing it imports torch's compiler (torch._dynamo),
which a Fashion-MNIST run never needs.
"""
import atexit
import gzip
import hashlib
import math
import multiprocessing.util
import os
import pathlib
import signal
import sys
import unicodedata
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from util import stop
from util.errors import DataError

# -----------------------------------------------------------------------------
# A small data set held in memory, and its batches made where it is held


class TensorImages(Dataset):
    """A data set held in memory: uint8 images (N, 1 or 3, H, W) and labels (N,), on the host or a
    device, read once. transform: data.py's BatchTransform, which makes a whole batch of them
    (gathered by TensorBatches, below); an item alone is a batch of one. classes: the class names
    (index = label); source: the folder the files were read from (None: made at random)."""

    def __init__(self, images, labels, transform, classes, source):
        self.images = images                  # (N, C, H, W) uint8
        self.labels = labels.long()           # (N,)
        self.transform = transform
        self.classes = classes
        self.source = source

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i:i + 1])[0], int(self.labels[i])

    def holding(self, images, labels, transform=None):
        """This data set with these images and labels (moved to a device), or another transform; its
        constants where the images are, so that items and TensorBatches' batches are made there."""
        transform = (transform or self.transform).to(images.device)
        return TensorImages(images, labels, transform, self.classes, self.source)


class TensorBatches:
    """The batches of a data set held in memory (TensorImages, or a Subset of one), as a DataLoader
    gives them: the sampler's (epoch, index) keys in batches, each batch's images gathered by index
    where they are held and transformed there as a whole (data.py's BatchTransform), then moved to
    `device` (pinned first, for a GPU). Batch b of an epoch draws its augmentation from (seed, rank,
    epoch, b); each image's flip is the first draw of its own seed (image_seed), SeededDataset's
    first draw. So the same seed gives the same batches, a resume mid-epoch continues them bit for
    bit, and with no random crop before the flip (Fashion-MNIST's preset) they are the per-image
    pipeline's, bit for bit. The host sends each batch's choices in one copy, and never waits for
    the device."""

    def __init__(self, dataset, batch_size, sampler, drop_last, seed, rank, device):
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.device = device                  # where the batches go
        self.index = torch.arange(len(dataset))   # the positions the sampler gives, as held indices
        while isinstance(dataset, Subset):
            self.index = torch.as_tensor(dataset.indices)[self.index]
            dataset = dataset.dataset
        self.images = dataset.images
        self.labels = dataset.labels
        self.transform = dataset.transform                    # its constants where the images are

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        keys = list(self.sampler)
        epoch = keys[0][0] if keys else 0
        positions = np.array([i for _, i in keys], dtype=np.uint64)
        seeds = image_seed(self.seed, epoch, positions)
        index = self.index[positions.astype(np.int64)]   # where each is held
        # the whole epoch's flips, at once
        first = first_uniform(seeds) if self.transform.hflip > 0 else None
        done = getattr(self.sampler, 'start', 0) // self.batch_size   # batches a resume skips
        for b in range(len(self)):
            part = slice(b * self.batch_size, (b + 1) * self.batch_size)
            key = np.random.SeedSequence([self.seed, self.rank, epoch, done + b])
            step = int(key.generate_state(1, np.uint64)[0])   # the batch's seed
            yield self.batch(index[part], step, None if first is None else first[part], seeds[part])

    def batch(self, index, step, first, seeds):
        """One batch (images, labels) on self.device: the images held at `index`, transformed by the
        choices drawn from the batch's seed `step` (first: each image's flip draw, or None; seeds: each
        image's seed)."""
        held = self.images.device
        draws, groups = self.transform.draw(len(seeds), torch.Generator().manual_seed(step), first,
                                            seeds)
        draws = send({'at': index, **draws}, held)
        at = draws.pop('at').long()
        # on the host, on one thread: each op is small, and its threads would wait at every op
        # for a core the training step (or anything else) holds (on 2 shared cores,
        # Fashion-MNIST's batches came 15x faster)
        threads = torch.get_num_threads()
        if held.type == 'cpu':
            torch.set_num_threads(1)
        try:   # erasing's noise drawn where the images are
            x = self.transform.apply(self.images[at], draws, groups,
                                     torch.Generator(held).manual_seed(step))
            y = self.labels[at]
        finally:
            torch.set_num_threads(threads)
        if held.type == 'cpu' and self.device.type == 'cuda':
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def send(tensors, device):
    """Host tensors {name: tensor} on `device` in one copy (pinned, and not waited for, to a GPU):
    {name: tensor}, each in its shape, as float64 (exact for integers below 2 ** 53)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors.values()])
    if device.type == 'cuda':
        flat = flat.pin_memory().to(device, non_blocking=True)
    parts = flat.split([t.numel() for t in tensors.values()])
    return {name: part.view(t.shape) for (name, t), part in zip(tensors.items(), parts)}


def first_uniform(seeds):
    """torch.rand(1) after torch.manual_seed(s), for each s of seeds (a numpy array), at once: the
    first number of torch's CPU generator, a Mersenne Twister (MT19937) seeded with s's low 32
    bits; 24 bits of its first output word make the float. Its state is 624 words, each made from
    the one before; the first output needs words 0, 1 and 397 (Matsumoto and Nishimura, 1998)."""
    word = (seeds & 0xFFFFFFFF).astype(np.uint32)
    first = word
    for j in range(1, 398):
        word = np.uint32(1812433253) * (word ^ (word >> np.uint32(30))) + np.uint32(j)
        if j == 1:
            second = word
    y = (first & np.uint32(0x80000000)) | (second & np.uint32(0x7FFFFFFF))
    odd = np.where(y & np.uint32(1), np.uint32(0x9908B0DF), np.uint32(0))
    x = word ^ (y >> np.uint32(1)) ^ odd             # the twist of word 0
    x ^= x >> np.uint32(11)                          # tempering
    x ^= (x << np.uint32(7)) & np.uint32(0x9D2C5680)
    x ^= (x << np.uint32(15)) & np.uint32(0xEFC60000)
    x ^= x >> np.uint32(18)
    return torch.from_numpy((x & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0 ** -24))


def image_seed(seed, epoch, i):
    """The seed of sample i's augmentation in epoch `epoch` (SeededDataset, and TensorBatches'
    flips); i: an int, or a numpy array of them (uint64 seeds)."""
    return (((seed * 1_000_003 + epoch) * 100_000_007) % 2 ** 63 + i) % 2 ** 63


def unwrap(dataset):
    """The data set under a Subset (or several)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


# what a folder's fingerprint reads of its images: this many files of each class, spread over its sorted list, and
# this many bytes of each from its start (an image's header and first rows: two different photos differ there)
SAMPLE_FILES = 8
SAMPLE_BYTES = 4096


def fingerprint(dataset):
    """What a split holds, identified by its content, not by where it lies or when it was copied; a checkpoint records
    it and a resume compares it (util/run.py). A folder: {'files': a digest of each image's path under the split's
    folder, label and size (one stat a file), 'content': a digest of the first SAMPLE_BYTES of SAMPLE_FILES images
    spread over each class} (a `cp -r` copy, new times and all, is the same; two class folders of the same names and
    sizes swapped, or an image replaced by another of its size in the sample, are not). A set held in memory
    (Fashion-MNIST, CIFAR): {'content': a digest of its images' and labels' bytes as read}. None for a set made at
    random (fake). dataset: the split, or a loader's (a Subset, SeededDataset)."""
    while isinstance(dataset, (Subset, SeededDataset)):
        dataset = dataset.dataset
    if getattr(dataset, 'source', None) is None:   # FakeData
        return None
    if isinstance(dataset, TensorImages):
        digest = hashlib.sha256()
        for t in (dataset.images, dataset.labels):
            digest.update(t.cpu().numpy().tobytes())
        return {'content': digest.hexdigest()}
    files, content = hashlib.sha256(), hashlib.sha256()
    by_class = {}
    for path, label in dataset.samples:   # ClassFolder's, sorted
        name = unicodedata.normalize('NFC', os.path.relpath(path, dataset.root))   # a Mac's café is café
        files.update(f'{name}\0{label}\0{os.stat(path).st_size}\n'.encode())
        by_class.setdefault(label, []).append((name, path))
    for label in sorted(by_class):
        paths = by_class[label]
        for i in sorted({k * (len(paths) - 1) // max(SAMPLE_FILES - 1, 1) for k in range(SAMPLE_FILES)}):
            name, path = paths[i]
            with open(path, 'rb') as f:
                content.update(f'{name}\0'.encode() + f.read(SAMPLE_BYTES))
    return {'files': files.hexdigest(), 'content': content.hexdigest()}


# -----------------------------------------------------------------------------
# The loader: its batches exactly the same after a resume


class ResumableSampler(DistributedSampler):
    """DistributedSampler (one permutation per seed + epoch, each rank its slice; also unsharded) that can start
    part-way through an epoch. It yields (epoch, index) keys: SeededDataset seeds each sample's augmentation by them."""
    start = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start:]])

    def __len__(self):
        return super().__len__() - self.start


class SeededDataset(Dataset):
    """Sample i of epoch e is augmented with its own seed f(seed, e, i): what a run sees does not depend on the loader's
    workers, their number, or where a resume picked up. torch's global RNG is left as it was (fork_rng): without
    workers this runs in the training process, whose drop-path, MixUp and MAE masks draw from it."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(self.seed, epoch, i))
            return self.dataset[i]


def build_loader(cfg, dataset, train, rank=0, world_size=1, device=torch.device('cpu'), batch_size=None):
    """The batches of a data set: one held in memory (TensorImages, or a Subset of one) gathered
    and transformed where its images are (TensorBatches), no worker; any other read an image at a
    time by --num-workers processes, each image augmented from its own seed (SeededDataset).
    device: where the batches go; batch_size: images a batch (default --batch-size)."""
    batch_size = batch_size or cfg.batch_size
    if train:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=cfg.seed)
    else:   # every rank evaluates a disjoint slice (results summed across ranks), as epoch 0: a
        sampler = [(0, i) for i in range(rank, len(dataset), world_size)]   # shift's noise too
    if isinstance(unwrap(dataset), TensorImages):
        return TensorBatches(dataset, batch_size, sampler, train, cfg.seed, rank, device)
    generator = torch.Generator().manual_seed(cfg.seed)   # the global RNG left alone
    return DataLoader(SeededDataset(dataset, cfg.seed), batch_size=batch_size, sampler=sampler,
                      drop_last=train, num_workers=cfg.num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0,
                      worker_init_fn=quiet_on_stop, generator=generator)


def quiet_on_stop(worker_id):
    """A worker ends quietly when its run is stopped: SIGUSR1 and SIGTERM (a scheduler's, sent to every process of the
    job) leave it making batches, as the run finishes its step and saves it (util/stop.py), then the run ends it
    (torch's own handler dies of the signal, which the main process reports as a worker's failure); its
    multiprocessing sharing thread, left a closed connection mid-hand-over, reports through sys.excepthook."""
    for signum in stop.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.excepthook = quiet_hook


def end_workers():
    """At the interpreter's exit, the loader workers still alive (a loader kept in a reference cycle until then) are
    killed. multiprocessing ends them with SIGTERM, which they ignore (quiet_on_stop), and then waits for them: an
    interpreter would never end. Registered after multiprocessing's own exit function, so it runs before it. torch's
    handler of a child's end, which reports a killed worker as the run's error, is taken down first: nothing runs."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in workers:
        p.kill()


atexit.register(end_workers)


def quiet_hook(kind, *rest):
    """sys.excepthook in a loader worker: a ConnectionError (its run was stopped) says nothing."""
    if not issubclass(kind, ConnectionError):
        sys.__excepthook__(kind, *rest)


# -----------------------------------------------------------------------------
# Fashion-MNIST: its IDX files found (--data-dir, torchvision's folder, Debian's), read by torchvision's readers

FASHION_MNIST_SYSTEM_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                       't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
# label -> name, as torchvision.datasets.FashionMNIST.classes names them
FASHION_MNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot']


# the most bytes an IDX file's header may declare (Fashion-MNIST's largest: 47 MB): more is no such file
IDX_MOST = 2 ** 32


def read_idx(path, ndim):
    """The uint8 tensor of ndim dimensions in an IDX file (MNIST's format: two zero bytes, the type 0x08 (unsigned
    bytes), the number of dimensions, each one's size as a big-endian 32-bit integer, then the values), gzipped
    (Debian's) or not: images (N, H, W), labels (N,). One that is not such a file, or holds more or fewer values than
    its header says, is a DataError naming it."""
    def refuse(why):
        return DataError(f'{path} cannot be read ({why}): replace it with the original file')
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            head = f.read(4)
            if len(head) < 4 or head[:3] != bytes([0, 0, 8]) or head[3] != ndim:
                raise refuse(f'not an IDX file of {ndim}-dimensional unsigned bytes')
            shape = [int.from_bytes(f.read(4), 'big') for _ in range(ndim)]
            size = math.prod(shape)
            if size > IDX_MOST:
                raise refuse(f'its header declares {size:,} values')
            data = f.read(size + 1)
    except (OSError, EOFError) as e:   # a cut .gz, or no gzip at all (BadGzipFile is an OSError)
        raise refuse(repr(e)) from None
    if len(data) != size:
        raise refuse(f'its header declares {size:,} values, it holds {len(data) if len(data) <= size else "more"}')
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(shape)


def fashion_mnist(data_dir, train, transform, cfg=None):
    """One split of Fashion-MNIST from the first folder with its four files (each gzipped or not): --data-dir, its
    FashionMNIST/raw, Debian's dataset-fashion-mnist; else downloaded by torchvision. A folder holding only some is
    a DataError naming it, never completed from another's (test images from one, training images from another)."""
    dirs = [data_dir, os.path.join(data_dir, 'FashionMNIST', 'raw'), FASHION_MNIST_SYSTEM_DIR]
    for d in dirs:
        found = {stem: path for stem in FASHION_MNIST_FILES   # stem, else stem.gz
                 for path in (os.path.join(d, stem + '.gz'), os.path.join(d, stem))
                 if os.path.isfile(path)}
        if len(found) == 4:
            break
        if found:
            raise DataError(f"{d} holds only some of Fashion-MNIST's files: put all four there "
                            f"({', '.join(FASHION_MNIST_FILES)}, each [.gz]), or remove them")
    else:
        try:   # last resort: torchvision's download (needs the internet)
            import torchvision
            torchvision.datasets.FashionMNIST(data_dir, train=train, download=True)
        except Exception:
            raise DataError(f"Fashion-MNIST not found in {', '.join(dirs)} and could not be downloaded; "
                            f"put its four files ({', '.join(FASHION_MNIST_FILES)}, each [.gz]) in "
                            f"--data-dir, or `apt-get install dataset-fashion-mnist`") from None
        return fashion_mnist(data_dir, train, transform)
    stem = 'train' if train else 't10k'
    images = found[f'{stem}-images-idx3-ubyte']
    labels = found[f'{stem}-labels-idx1-ubyte']
    x = read_idx(images, 3)                              # (N, H, W)
    y = read_idx(labels, 1)                              # (N,)
    if len(x) != len(y):   # else images beyond the labels are silently left out
        raise DataError(f'{images} and {labels} do not pair up ({len(x)} images, {len(y)} labels): '
                        f'replace them with the original files')
    classes = FASHION_MNIST_CLASSES
    # a label beyond the classes: trained on unnoticed, or the first evaluation's traceback after the training
    if len(y) and not 0 <= y.min() <= y.max() < len(classes):
        raise DataError(f'{labels} holds labels outside its {len(classes)} classes (0..{len(classes) - 1}; '
                        f'{int(y.min())}..{int(y.max())} here): replace it with the original file')
    return TensorImages(x[:, None], y, transform, classes, os.path.abspath(d))


# -----------------------------------------------------------------------------
# CIFAR: read by torchvision's CIFAR10 / CIFAR100 from the python version's pickled batches, each file checked
# against torchvision's md5 before any is unpickled (a pickle can run code: only the official files are read)

def cifar(root, train, transform, cfg):
    """CIFAR-10 / -100 (cfg.data) from <root>/cifar-10-batches-py (cifar-100-python); else the archive in <root>
    checked (md5) and extracted, downloaded first if absent. A corrupt archive is an error, never overwritten (a
    download cut short is one: the next run refuses it)."""
    import torchvision
    from torchvision.datasets.utils import check_integrity, download_url, extract_archive
    name = cfg.data
    kind = {'cifar10': torchvision.datasets.CIFAR10, 'cifar100': torchvision.datasets.CIFAR100}[name]
    folder = os.path.join(root, kind.base_folder)
    archive = os.path.join(root, kind.filename)
    if not os.path.isdir(folder):
        if not os.path.isfile(archive):
            try:
                download_url(kind.url, root)   # its md5 checked below
            except Exception as e:
                raise DataError(f'{kind.url} could not be downloaded ({type(e).__name__}): put '
                                f'{kind.filename} or its extracted {kind.base_folder}/ in --data-dir') from None
        if not check_integrity(archive, kind.tgz_md5):
            raise DataError(f'{archive} is corrupt (its md5 is not {kind.tgz_md5}): delete it and run '
                            f'again to download it')
        extract_archive(archive, root)
    try:
        data = kind(root, train)
    except RuntimeError:   # torchvision's: a file missing, or not the official one (by its md5)
        raise DataError(f"{folder} does not hold the official {name} files (torchvision checks each one's "
                        f"md5): delete it and run again to extract or download it anew") from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)     # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return TensorImages(images, torch.tensor(data.targets), transform, data.classes,
                        os.path.abspath(folder))


# -----------------------------------------------------------------------------
# ImageNet's layout, <split>/<class>/<image>: the classes are numbered once, from the training split (sorted,
# as torchvision's ImageFolder does), and every other split is read with those numbers, never its own: a
# val/ that lacks a class would otherwise shift each later class down by one, and score them all as wrong.

def image_folder(root, train, transform, cfg):
    """<root>/train or <root>/val as a ClassFolder. --data imagenet: ImageNet-1k's class indices
    (util/classes/imagenet.txt), so val/ reads without train/; --data folder: <root>/train's sorted class folders. A split
    may lack classes; a folder that is not a class, or holds no image, is a DataError before any training."""
    from util.folders import ClassFolder, class_folders   # torchvision's ImageFolder: imported for folders alone
    data = cfg.data
    expects = f'--data {data} expects --data-dir with train/<class>/*.jpg and val/<class>/*.jpg'
    split = os.path.join(root, 'train' if train else 'val')
    train_dir = os.path.join(root, 'train')
    for d in [split, train_dir] if data == 'folder' else [split]:
        if not os.path.isdir(d):
            raise DataError(f'no folder {d}: {expects}')
    if data == 'imagenet':
        names = read_classes('imagenet')
        unknown = 'not ImageNet-1k classes (util/classes/imagenet.txt): for other classes use --data ' \
                  'folder'
    else:
        names = class_folders(train_dir, expects)
        unknown = f'not classes of {train_dir}, which number the classes: remove them, or add them ' \
                  f'there'
    index = {c: i for i, c in enumerate(names)}
    return ClassFolder(split, index, transform, unknown)


def read_classes(name):
    """A class list of util/classes/<name>.txt, one name a line: position = class index."""
    return (pathlib.Path(__file__).parent / 'classes' / f'{name}.txt').read_text().split()


# -----------------------------------------------------------------------------
# Random images, for smoke runs: torchvision's FakeData

FAKE_HELD = 2 ** 26   # bytes: a fake split this small is made once and held in memory


def fake(root, train, transform, cfg):
    """--fake-size random images of --img-size (an eighth as many, at least 64, to evaluate), 10 classes: made once
    and held in memory where they take at most FAKE_HELD bytes (held_in_memory), else made image by image."""
    import torchvision
    from torchvision.transforms.v2.functional import pil_to_tensor
    n = cfg.fake_size if train else max(cfg.fake_size // 8, 64)
    images = torchvision.datasets.FakeData(n, (3, cfg.img_size, cfg.img_size), 10,
                                           random_offset=0 if train else 10 ** 6)
    if not held_in_memory(cfg):
        images.transform = transform
        return images
    pictures, labels = zip(*(images[i] for i in range(n)))
    pictures = torch.stack([pil_to_tensor(x) for x in pictures])
    return TensorImages(pictures, torch.tensor(labels), transform, None, None)


# -----------------------------------------------------------------------------
# Each data set, declared once: util/config.py offers their names to --data, data.py builds and normalises them,
# util/launch.py's --compile auto counts their training images. A new data set is a row here and its reader.


class DataSet(NamedTuple):
    size: int                      # native image size (px)
    classes: Optional[int]         # None: a folder's, counted from its class folders
    stats: tuple                   # (mean, std) of each channel, in [0, 1]
    train_images: Optional[int]    # the training split's images (None: known once read)
    held: bool                     # held in memory and batched on the device (fake: where small, held_in_memory)
    read: Callable                 # read(data_dir, train, transform, cfg) -> the split


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = {
    'cifar10': DataSet(32, 10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), 50000, True, cifar),
    'cifar100': DataSet(32, 100, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), 50000, True, cifar),
    'fashion-mnist': DataSet(28, 10, ((0.2860,) * 3, (0.3530,) * 3), 60000, True, fashion_mnist),
    'imagenet': DataSet(224, 1000, IMAGENET_STATS, 1281167, False, image_folder),
    'folder': DataSet(224, None, IMAGENET_STATS, None, False, image_folder),
    'fake': DataSet(32, 10, ((0.5,) * 3, (0.5,) * 3), None, True, fake),
}


def held_in_memory(cfg):
    """Whether cfg's data set is held in memory and batched on the device (data.py's BatchTransform), rather than
    read an image at a time by loader workers (its build_transform): its row says, a fake one by its size."""
    if cfg.data == 'fake':
        return cfg.fake_size * 3 * cfg.img_size ** 2 <= FAKE_HELD
    return DATASETS[cfg.data].held
