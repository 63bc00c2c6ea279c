"""
Samplers and loaders that make a run resumable exactly: each image's augmentation is seeded by (seed, epoch,
index), and an epoch can start part-way through, so a run stopped and resumed sees the same images, augmented
the same way, as one that never stopped, whatever the number of loader workers. And the dataset of images held in
memory (Fashion-MNIST's, CIFAR's: util/datafiles.py reads them) that they load from.
"""
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (same permutation on every rank for a given seed + epoch, each rank takes
    its slice) that can start part-way through an epoch, for exact resume. Also used unsharded.
    Yields (epoch, index) keys, so that SeededDataset can seed each sample's augmentation."""
    start = 0

    def __iter__(self):
        return iter([(self.epoch, i) for i in list(super().__iter__())[self.start:]])

    def __len__(self):
        return super().__len__() - self.start


class SeededDataset(Dataset):
    """Sample i of epoch e is augmented with its own random seed f(seed, e, i): the data a run sees
    does not depend on worker processes, their number, or where a resumed run picked up. torch's global
    RNG is left as it was (fork_rng): without workers the dataset runs in the training process, whose
    drop-path, MixUp and MAE masks draw from that RNG, and a resume may change --num-workers."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 100_000_007 + i) % 2 ** 63)
            return self.dataset[i]


def build_loader(cfg, dataset, train, rank=0, world_size=1):
    if train:
        sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.seed)
    else:   # every rank evaluates a disjoint slice (results summed across ranks), as epoch 0: a shift's noise too
        sampler = [(0, i) for i in range(rank, len(dataset), world_size)]
    return DataLoader(SeededDataset(dataset, cfg.seed), batch_size=cfg.batch_size, sampler=sampler, drop_last=train,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=cfg.num_workers > 0, worker_init_fn=quiet_on_stop,
                      generator=torch.Generator().manual_seed(cfg.seed))   # leaves the global RNG alone


def quiet_on_stop(worker_id):
    """A worker ends quietly when its run is stopped: SIGTERM (a scheduler's, sent to every process of the job) ends
    it with exit 0 (torch's own handler dies of the signal, which the main process reports as a worker's failure);
    its multiprocessing sharing thread, left a closed connection mid-hand-over, reports through sys.excepthook."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    sys.excepthook = lambda kind, *rest: None if issubclass(kind, ConnectionError) else sys.__excepthook__(kind, *rest)


class TensorImages(Dataset):
    """uint8 images (N, 1 or 3, H, W) and labels (N,) held in memory; yields (3, H, W) uint8 tensors.
    classes: the class names (index = label); source: the folder the files were read from."""

    def __init__(self, images, labels, transform, classes, source):
        self.images, self.labels, self.transform = images, labels, transform
        self.classes, self.source = classes, source

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i].expand(3, -1, -1)), int(self.labels[i])
