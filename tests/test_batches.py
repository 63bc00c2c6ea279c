"""Data sets held in memory, batched where they are held (util/datafiles.py's TensorBatches,
data.py's BatchTransform), against the per-image pipeline they had before (each image through
build_transform in a DataLoader: PerImage below, timed in results/benchmark/INPUT.md): Fashion-MNIST's batches
are its batches element for element; CIFAR's augmentation is its augmentation in distribution (crop
offsets, flip rate, each RandAugment op's frequency and argument, erasing's rate and box) over at
least 10,000 draws; a resume mid-epoch is bit for bit; nothing in a batch's device work waits for
the device; a CIFAR-10 run on files in the official format runs end to end."""
import gzip
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset
from torchvision.transforms import v2

from conftest import run_in_process
from test_data import write_cifar
from data import SHIFTS, BatchTransform, build_eval_set, build_splits, build_transform, data_device
from data import held_on
from finetune import PRESETS, FinetuneConfig
from util.augment import BatchRandAugment, RandAugment, erasing_boxes
from util.datafiles import FASHION_MNIST_SYSTEM_DIR, build_loader, first_uniform, image_seed, read_idx, unwrap


N = 10_000                 # draws each distribution is compared over
DEBIAN = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_SYSTEM_DIR),
                            reason='apt-get install dataset-fashion-mnist')


def config(preset, **kw):
    """The preset of --data `preset`, no loader worker, kw over it."""
    return FinetuneConfig(**{**PRESETS[preset], 'data': preset, 'num_workers': 0, **kw})


class PerImage(Dataset):
    """A data set held in memory, read as the small data sets were before they were batched where
    they are held: each image (grey repeated to 3 channels) through build_transform's transforms."""

    def __init__(self, held, transform):
        self.images = held.images
        self.labels = held.labels
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i].expand(3, -1, -1)), int(self.labels[i])


def per_image_loader(cfg, train=True, rank=0, world=1):
    """The training (or test) split of cfg's in-memory data set in the per-image loader it had
    before: SeededDataset and --num-workers processes (build_loader on a data set not held in
    memory)."""
    data = build_splits(cfg)
    split = unwrap(data.train if train else data.eval)
    return build_loader(cfg, PerImage(split, build_transform(cfg, train)), train, rank, world)


def first_batch(loader, epoch, start_batch):
    """The first batch a training loader gives in `epoch` when it starts at batch `start_batch`
    (as a resume does)."""
    loader.sampler.set_epoch(epoch)
    loader.sampler.start = start_batch * loader.batch_size
    return next(iter(loader))


def test_first_uniform_is_torchs_first_draw():
    """Each image's flip is the first number torch's generator gives after manual_seed(its seed):
    computed for a whole epoch at once, it must be that number exactly, for low seeds, high ones
    and the formula's own."""
    seeds = np.concatenate([np.arange(300, dtype=np.uint64),
                            np.array([2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1], np.uint64),
                            image_seed(12345, 7, np.arange(0, 60000, 97, dtype=np.uint64))])
    ours = first_uniform(seeds)
    for s, u in zip(seeds.tolist(), ours.tolist()):
        torch.manual_seed(s)
        assert torch.rand(1).item() == u, s
    formula = ((3 * 1_000_003 + 2) * 100_000_007 + 5) % 2 ** 63     # SeededDataset's, as it was
    assert image_seed(3, 2, np.array([5], np.uint64))[0] == image_seed(3, 2, 5) == formula

# -----------------------------------------------------------------------------
# Fashion-MNIST: the same batches, element for element


def write_slice(folder, n_train, n_test):
    """The first n_train training and n_test test images of Debian's Fashion-MNIST as IDX files in
    `folder` (the notebook's quick mode runs on such a slice)."""
    for split, n in (('train', n_train), ('t10k', n_test)):
        for kind in ('images-idx3', 'labels-idx1'):
            path = os.path.join(FASHION_MNIST_SYSTEM_DIR, f'{split}-{kind}-ubyte.gz')
            data = read_idx(path, 3 if kind == 'images-idx3' else 1)[:n].numpy()
            header = bytes([0, 0, 8, data.ndim]) + np.array(data.shape, '>u4').tobytes()
            with gzip.open(folder / f'{split}-{kind}-ubyte.gz', 'wb') as f:
                f.write(header + data.tobytes())
    return str(folder)


# the budgets the committed numbers were made with: (training and test images; None: the whole
# splits), batch size, seed, epochs (the last one is checked too)
BUDGETS = {'preset': (None, 128, 0, 9),                       # the scripts' Fashion-MNIST preset
           'reproduction, seed 2': (None, 128, 2, 3),         # tools.reproduce --data fashion-mnist
           'quick command': (None, 64, 0, 1),                 # ... --quick true
           'notebook quick mode': ((4096, 2000), 64, 0, 2)}   # tutorial.ipynb's slices


@DEBIAN
@pytest.mark.parametrize('budget', BUDGETS)
def test_fashion_mnist_batches_are_the_per_image_pipelines(budget, tmp_path):
    sizes, batch, seed, epochs = BUDGETS[budget]
    data_dir = write_slice(tmp_path, *sizes) if sizes else str(tmp_path)   # empty: Debian's files
    cfg = config('fashion-mnist', data_dir=data_dir, batch_size=batch, seed=seed)
    assert cfg.hflip == 0.5 and not (cfg.crop_pad or cfg.randaug or cfg.reprob)   # flips only
    new, old = build_loader(cfg, build_splits(cfg).train, True), per_image_loader(cfg)
    last = len(new) - 1
    for epoch in (0, epochs - 1):
        for start in (0, 1, last // 2, last):   # the first batches, a resume mid-epoch, the last
            (x, y), (x_old, y_old) = first_batch(new, epoch, start), first_batch(old, epoch, start)
            assert torch.equal(x, x_old) and torch.equal(y, y_old), (budget, epoch, start)
            assert x.dtype == torch.float32 and x.shape == (batch, 3, 28, 28)
    new = build_loader(cfg, build_splits(cfg).eval, False)
    old = per_image_loader(cfg, train=False)
    (x, y), (x_old, y_old) = next(iter(new)), next(iter(old))
    assert torch.equal(x, x_old) and torch.equal(y, y_old)


@DEBIAN
def test_each_rank_takes_its_own_batches_as_before(tmp_path):
    cfg = config('fashion-mnist', data_dir=write_slice(tmp_path, 1024, 64))
    train = build_splits(cfg).train
    seen = []
    for rank in (0, 1):
        new, old = build_loader(cfg, train, True, rank, 2), per_image_loader(cfg, True, rank, 2)
        (x, y), (x_old, y_old) = first_batch(new, 1, 2), first_batch(old, 1, 2)
        assert torch.equal(x, x_old) and torch.equal(y, y_old), rank
        seen.append(x)
    assert not torch.equal(*seen)

# -----------------------------------------------------------------------------
# CIFAR: the same augmentation in distribution


def cifar(**kw):
    """The CIFAR preset's augmentation on 32 x 32 images (fake ones: the draws do not look at the
    pixels)."""
    return config('cifar10', **{'data': 'fake', 'fake_size': 512, **kw})


def per_image(cfg, kind):
    """The per-image training pipeline's transform of type `kind`."""
    return next(t for t in build_transform(cfg, True).transforms if isinstance(t, kind))


def close(a, b, n, what):
    """Two frequencies from n draws each agree to within 5 standard errors of their difference."""
    p = (a + b) / 2
    assert abs(a - b) <= 5 * math.sqrt(2 * p * (1 - p) / n) + 1e-12, (what, a, b)


def test_crop_offsets_and_flip_rate_are_the_per_image_pipelines():
    cfg = cifar()
    draws, _ = BatchTransform(cfg, True).draw(N, torch.Generator().manual_seed(0))
    corners = draws['corners']                                              # (N, 2): top, left
    crop = per_image(cfg, v2.RandomCrop)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    torch.manual_seed(0)
    params = [crop.make_params([image]) for _ in range(N)]
    theirs = torch.tensor([[p['top'], p['left']] for p in params])
    for axis in (0, 1):
        ours, old = (torch.bincount(t[:, axis].long(), minlength=9) / N for t in (corners, theirs))
        assert len(ours) == len(old) == 9                                 # 0..8: padding 4 a side
        for k in range(9):
            close(ours[k].item(), old[k].item(), N, f'crop offset {k}')
    seeds = image_seed(0, 1, np.arange(N, dtype=np.uint64))
    flips = (first_uniform(seeds) < cfg.hflip).double().mean().item()
    flip, pair = per_image(cfg, v2.RandomHorizontalFlip), torch.arange(2).view(1, 1, 2)
    old = sum(flip(pair)[0, 0, 0].item() == 1 for _ in range(N)) / N
    close(flips, old, N, 'flip rate')
    assert abs(flips - 0.5) < 0.02


def test_the_padded_crop_and_the_scaling_are_torchvisions():
    """Each image of a CIFAR batch, cropped at its drawn corner, is torchvision's reflect padding (v2.functional.pad)
    cropped there, scaled to [0, 1] (v2.functional.to_dtype) and normalised, bit for bit."""
    transform = BatchTransform(cifar(randaug='', reprob=0.0, hflip=0.0), True)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    draws, groups = transform.draw(6, torch.Generator().manual_seed(1))
    out = transform.apply(x, draws, groups)
    assert len(set(map(tuple, draws['corners'].tolist()))) > 1                  # more than one corner
    for i, (top, left) in enumerate(draws['corners'].tolist()):
        padded = v2.functional.pad(x[i], [4], padding_mode='reflect')[:, top:top + 32, left:left + 32]
        theirs = v2.functional.to_dtype(padded, torch.float32, scale=True)
        assert torch.equal(out[i], (theirs - transform.mean[0]) / transform.std[0]), i


def batch_arguments(policy, n):
    """[(op, argument)] that BatchRandAugment draws for n images (every op slot), recorded where it
    hands them on: the op's name as the per-image op has it, its argument (None: none)."""
    batch, seen = BatchRandAugment(policy, 32), []
    put = batch.put

    def record(ids, rows, picked, op, arg, torchvision=False):
        k = int(picked.sum())
        values = [None] * k
        if arg is not None:
            values = torch.as_tensor(arg, dtype=torch.float64).expand(k).tolist()
        seen.extend((op, v) for v in values)
        put(ids, rows, picked, op, arg, torchvision)
    batch.put = record
    batch.draw(n, torch.Generator().manual_seed(1))
    return seen


def compare_ops(ours, theirs, draws):
    """Each op's frequency among `draws` draws, and its arguments: each value's share where they
    are few (torchvision's fixed magnitudes, the bits kept), else the same mean and spread."""
    for op in sorted({o for o, _ in theirs} | {o for o, _ in ours}):
        a, b = ([v for o, v in pairs if o == op] for pairs in (ours, theirs))
        close(len(a) / draws, len(b) / draws, draws, op)
        if None in a + b:
            assert set(a) == set(b) == {None}, op
            continue
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        if len(set(b.tolist())) <= 16:                                 # a few values: their shares
            for v in set(a.tolist()) | set(b.tolist()):
                share_a, share_b = (a == v).double().mean().item(), (b == v).double().mean().item()
                close(share_a, share_b, min(len(a), len(b)), op)
        else:
            spread = math.sqrt(a.var() / len(a) + b.var() / len(b))
            assert abs(a.mean() - b.mean()) < 5 * spread, (op, a.mean(), b.mean())
            assert abs(a.std() - b.std()) < 0.1 * b.std(), (op, a.std(), b.std())


def test_torchvisions_randaugment_draws_as_per_image():
    """The CIFAR preset's policy (torchvision-m9): each op as often, at the same magnitude with the
    same sign balance, as v2.RandAugment draws it per image (its ops recorded, not run)."""
    policy = per_image(cifar(), v2.RandAugment)
    theirs = []

    def record(img, op, magnitude, **_):
        theirs.append((op, None if op in ('Identity', 'AutoContrast', 'Equalize') else magnitude))
        return img
    policy._apply_image_or_video_transform = record
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for _ in range(N):
        policy(image)
    ours = batch_arguments(policy, N)
    assert len(ours) == len(theirs) == 2 * N                           # every image, every slot
    compare_ops(ours, theirs, 2 * N)


def test_timms_randaugment_draws_as_per_image(monkeypatch):
    """The authors' policy (rand-m9-mstd0.5-inc1): each op applied as often, at arguments of the
    same distribution, as RandAugment applies them per image."""
    from test_augment import applied_ops
    policy = per_image(cifar(randaug='rand-m9-mstd0.5-inc1'), RandAugment)
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    theirs = [(op.removesuffix('Increasing'), a) for op, a in applied_ops(policy, image, N, monkeypatch)]
    compare_ops(batch_arguments(policy, N), theirs, 2 * N)


def test_erasing_rate_and_box_are_the_per_image_pipelines():
    cfg = cifar()
    ours = erasing_boxes(N, 32, cfg.reprob, torch.Generator().manual_seed(2))   # (N, 4)
    erase = per_image(cfg, v2.RandomErasing)
    torch.manual_seed(2)
    boxes = []
    for _ in range(N):
        hit = erase(torch.zeros(3, 32, 32)).ne(0).any(0)
        rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
        if not hit.any():
            boxes.append((0, 0))
            continue
        boxes.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)))
    theirs, mine = torch.tensor(boxes, dtype=torch.float64), ours[:, 2:]
    hit_ours, hit_theirs = mine[:, 0] > 0, theirs[:, 0] > 0
    rate = hit_ours.double().mean().item()
    close(rate, hit_theirs.double().mean().item(), N, 'erasing rate')
    assert abs(rate - 0.25) < 0.02
    hits = ((mine, hit_ours), (theirs, hit_theirs))
    area_ours, area_theirs = (b[h].prod(1) / 1024 for b, h in hits)
    assert abs(area_ours.mean() - area_theirs.mean()) < 0.01
    assert abs(area_ours.std() - area_theirs.std()) < 0.01
    aspect_ours, aspect_theirs = ((b[h, 0] / b[h, 1]).log() for b, h in hits)
    assert abs(aspect_ours.mean() - aspect_theirs.mean()) < 0.05
    assert abs(aspect_ours.std() - aspect_theirs.std()) < 0.05
    top, left, h, w = ours[hit_ours].T
    assert (top >= 0).all() and (top + h <= 32).all()
    assert (left >= 0).all() and (left + w <= 32).all()
    assert ((top == 0) | (top + h == 32)).any()                         # boxes reach both edges


def test_the_batch_is_erased_where_its_box_says_with_noise():
    transform = BatchTransform(cifar(randaug='', crop_pad=0, hflip=0.0, reprob=1.0), True)
    draws, groups = transform.draw(64, torch.Generator().manual_seed(3))
    black = torch.zeros(64, 3, 32, 32, dtype=torch.uint8)
    x = transform.apply(black, draws, groups, torch.Generator())
    clean = (0 - 0.5) / 0.5                                              # fake's normalised 0
    for (top, left, h, w), image in zip(draws['boxes'].long().tolist(), x):
        changed = (image != clean).any(0)
        assert changed[top:top + h, left:left + w].all() and changed.sum() == h * w

# -----------------------------------------------------------------------------
# Resume, the device's work, evaluation, a data set too large for the device


def test_a_resume_mid_epoch_gives_the_same_batches_bit_for_bit():
    """CIFAR's whole augmentation (crop, flip, RandAugment, erasing): an epoch started at batch 3
    gives the uninterrupted epoch's batches from batch 3, and another seed other batches."""
    for policy in ('torchvision-m9', 'rand-m9-mstd0.5-inc1'):
        cfg = cifar(randaug=policy, batch_size=64)
        train = build_splits(cfg).train
        loader = build_loader(cfg, train, True)
        loader.sampler.set_epoch(2)
        whole = list(loader)
        for k in (3, 5):
            x, y = first_batch(build_loader(cfg, train, True), 2, k)
            assert torch.equal(x, whole[k][0]) and torch.equal(y, whole[k][1]), (policy, k)
        other = build_loader(cifar(randaug=policy, batch_size=64, seed=1), train, True)
        assert not torch.equal(first_batch(other, 2, 3)[0], whole[3][0])


SYNCS = ('lift_fresh', '_local_scalar_dense', 'nonzero', 'index_put', 'masked_select', 'item',
         'equal')


def test_a_batchs_device_work_never_waits_for_the_device():
    """Every op of a batch's device work (gather, crop, flip, RandAugment, erasing, normalisation),
    traced: none that copies a host number in (a tensor literal) or reads one back (item, nonzero,
    a boolean mask), each of which would stop the host until the device caught up, every step."""
    for policy in ('torchvision-m9', 'rand-m9-mstd0.5-inc1'):
        cfg = cifar(randaug=policy)
        loader = build_loader(cfg, build_splits(cfg).train, True)
        seeds = image_seed(0, 0, np.arange(256, dtype=np.uint64))
        transform, host = loader.transform, torch.Generator().manual_seed(0)
        draws, groups = transform.draw(256, host, first_uniform(seeds), seeds)
        ops = []

        class Trace(TorchDispatchMode):
            def __torch_dispatch__(self, op, types, args=(), kwargs=None):
                ops.append(str(op))
                return op(*args, **(kwargs or {}))
        with Trace():
            images = loader.images[torch.arange(256)]
            x = transform.apply(images, draws, groups, torch.Generator().manual_seed(0))
        assert x.shape == (256, 3, 32, 32) and len(ops) > 50
        assert not [op for op in ops if any(s in op for s in SYNCS)], policy


def test_every_shift_is_the_per_image_pipelines():
    """evaluate.py --shift on a data set held in memory: each shifted test batch equals the
    per-image pipeline's (the noise drawn per image from its seed, as before: bit for bit)."""
    cfg = SimpleNamespace(data='fake', data_dir='./data', img_size=32, val_size=0, fake_size=512,
                          batch_size=16, num_workers=0, seed=3)
    held = unwrap(build_eval_set(cfg)[0])
    for shift in SHIFTS:
        new = build_loader(cfg, build_eval_set(cfg, shift)[0], False)
        old = build_loader(cfg, PerImage(held, build_transform(cfg, False, shift)), False)
        (x, y), (x_old, y_old) = next(iter(new)), next(iter(old))
        assert torch.equal(y, y_old) and torch.allclose(x, x_old, atol=1e-6), shift
        assert shift != 'noise' or torch.equal(x, x_old)


def test_a_data_set_too_large_for_the_devices_free_memory_stays_on_the_host():
    lines, cuda, mib = [], torch.device('cuda'), 2 ** 20
    assert data_device(cuda, 100 * mib, 1000 * mib, lines.append) == cuda
    assert 'held on cuda' in lines.pop()
    assert data_device(cuda, 600 * mib, 1000 * mib, lines.append) == torch.device('cpu')
    assert len(lines) == 1 and '600 MiB' in lines[0] and '1,000 MiB free' in lines[0]
    assert "held in the host's memory" in lines[0]
    assert data_device(torch.device('cpu'), 2 ** 40, None, lines.append) == torch.device('cpu')
    assert len(lines) == 1


def test_a_held_out_split_shares_the_training_splits_images():
    data = build_splits(cifar(val_size=64))
    moved = held_on(torch.device('cpu'), train=data.train, eval=data.eval)
    train, held_out = unwrap(moved['train']), unwrap(moved['eval'])
    assert train.images is held_out.images and train.transform is not held_out.transform


def test_a_split_moved_to_a_device_has_its_transform_there():
    """An item of a split held on a GPU (the start-up checks' sample images) was transformed with
    the host's mean and std: the transform's constants move with the images (meta stands in for
    the GPU here)."""
    data = build_splits(cifar(val_size=64))
    moved = held_on(torch.device('meta'), train=data.train, eval=data.eval)
    for split in moved.values():
        held = unwrap(split)
        transform = held.transform
        constants = [transform.mean, transform.std]
        if transform.randaug:
            constants += [t for t in vars(transform.randaug).values() if isinstance(t, torch.Tensor)]
        assert held.images.device.type == 'meta'
        assert {t.device.type for t in constants} == {'meta'}

# -----------------------------------------------------------------------------
# A CIFAR-10 run on the official files


def test_a_cifar10_run_on_official_files_runs_end_to_end(monkeypatch, tmp_path):
    """cifar-10-batches-py as the archive holds it: five training batches and a test batch (each
    image a row of its red, green and blue planes); the preset's augmentation (crop, flip,
    RandAugment, erasing) on them."""
    import finetune
    write_cifar(tmp_path, 'cifar10', np.random.default_rng(0), monkeypatch, per_file=40)
    msg = run_in_process(monkeypatch, finetune, '--data', 'cifar10', '--data-dir', tmp_path,
                         '--depth', '1', '--embed-dim', '32', '--num-heads', '2', '--batch-size', '32',
                         '--epochs', '1', '--warmup-epochs', '0.2', '--max-steps', '3', '--amp', 'off',
                         '--out-dir', tmp_path / 'run')
    assert msg is None, msg
    log = (tmp_path / 'run' / 'log.txt').read_text()
    assert 'data: cifar10, 200 training and 40 test images of 10 classes' in log
    assert 'step 3/3' in log
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert (cfg['randaug'], cfg['reprob'], cfg['crop_pad']) == ('torchvision-m9', 0.25, 4)

# -----------------------------------------------------------------------------
# On a GPU


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.gpu)])
def test_batches_held_on_the_device_are_the_hosts_and_never_wait(device):
    """Fashion-MNIST-like batches (flips only) made where the set is held equal the host's bit for bit; CIFAR's
    whole augmentation runs there, on a GPU without one synchronisation (torch's sync debug mode raises on any)."""
    device = torch.device(device)
    for policy in ('', 'torchvision-m9', 'rand-m9-mstd0.5-inc1'):
        cfg = cifar(randaug=policy, **({} if policy else dict(crop_pad=0, reprob=0.0)))
        data = build_splits(cfg)
        held = build_loader(cfg, held_on(device, train=data.train)['train'], True, device=device)
        on_host = build_loader(cfg, data.train, True)
        assert len(held) == 2
        first_batch(held, 1, 1)                                 # kernels chosen, memory pooled
        if device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('error')
        try:
            x, y = first_batch(held, 1, 1)
        finally:
            if device.type == 'cuda':
                torch.cuda.set_sync_debug_mode(0)
        assert x.device.type == device.type and x.shape == (256, 3, 32, 32)
        if not policy:
            x_host, y_host = first_batch(on_host, 1, 1)
            assert torch.equal(x.cpu(), x_host) and torch.equal(y.cpu(), y_host)
