"""util/augment.py against timm, the library the authors' release augments with: each op's argument at a
magnitude, each op's pixels, the policy strings, the sampling of ops and magnitudes, random erasing."""
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data.random_erasing import RandomErasing as TimmRandomErasing
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from util.augment import LEVELS, OPS, BatchRandAugment, RandAugment, apply, group, parse_policy, randaugment, random_erasing

FILL = (124, 116, 104)          # ImageNet's mean colour, as timm's create_transform passes it
HPARAMS = dict(translate_const=100, img_mean=FILL)
AUTHORS = 'rand-m9-mstd0.5-inc1'


def picture(h=40, w=48):
    """A smooth image with texture, so that every op changes it visibly."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) % 256 + np.random.default_rng(0).integers(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def timm_argument(op, level, sign, monkeypatch):
    """timm's own level-to-argument function, its random sign fixed to `sign`."""
    monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v: sign * v)
    fn = timm_aa.LEVEL_TO_ARG[op]
    return None if fn is None else fn(level, HPARAMS)[0]


ALL_OPS = sorted(set(OPS) | set(LEVELS))   # every op the policy draws, the increasing variants too

# -----------------------------------------------------------------------------
# 1. The ops: arguments and pixels


@pytest.mark.parametrize('op', ALL_OPS)
def test_argument_at_each_magnitude_is_timms(op, monkeypatch):
    for level in [i / 4 for i in range(41)] + [8.73, 9.51, 12.0]:    # 12: above 10, reachable with mmax
        for sign in (1, -1):
            ours = LEVELS[op](level, sign) if op in LEVELS else None
            assert ours == timm_argument(op, level, sign, monkeypatch), (op, level, sign)
    assert (op in LEVELS) == (timm_aa.LEVEL_TO_ARG[op] is not None)


def test_arguments_at_magnitude_9():
    """What m9 means, written out: the strength the issue measured (timm's scale: 9 of 10)."""
    assert LEVELS['Rotate'](9, 1) == pytest.approx(27.0) and LEVELS['ShearX'](9, -1) == pytest.approx(-0.27)
    assert LEVELS['TranslateXRel'](9, 1) == pytest.approx(0.405) and LEVELS['PosterizeIncreasing'](9, 1) == 1
    assert LEVELS['SolarizeIncreasing'](9, 1) == 26 and LEVELS['SolarizeAdd'](9, 1) == 99
    assert LEVELS['ColorIncreasing'](9, 1) == pytest.approx(1.81)
    assert LEVELS['ContrastIncreasing'](9, -1) == pytest.approx(0.19)


# timm's level-to-argument formulas (auto_augment.py, _LEVEL_DENOM = 10) evaluated by hand at magnitudes 0, 5,
# 9 and 10, for a positive sign; the signed ops (rotate, shear, translate, the increasing enhancements) turn
# the other way with sign -1. Written out, so that a change of timm's formulas or of ours cannot pass unseen.
SIGNED = {'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel', 'ColorIncreasing', 'ContrastIncreasing',
          'BrightnessIncreasing', 'SharpnessIncreasing'}
FORMULA = {                     # op: (formula, {magnitude: argument})
    'Rotate': ('m / 10 x 30 degrees', {0: 0.0, 5: 15.0, 9: 27.0, 10: 30.0}),
    'ShearX': ('m / 10 x 0.3', {0: 0.0, 5: 0.15, 9: 0.27, 10: 0.3}),
    'ShearY': ('m / 10 x 0.3', {0: 0.0, 5: 0.15, 9: 0.27, 10: 0.3}),
    'TranslateXRel': ('m / 10 x 0.45 of the width', {0: 0.0, 5: 0.225, 9: 0.405, 10: 0.45}),
    'TranslateYRel': ('m / 10 x 0.45 of the height', {0: 0.0, 5: 0.225, 9: 0.405, 10: 0.45}),
    'Posterize': ('int(m / 10 x 4) bits', {0: 0, 5: 2, 9: 3, 10: 4}),
    'PosterizeIncreasing': ('4 - int(m / 10 x 4) bits', {0: 4, 5: 2, 9: 1, 10: 0}),
    'Solarize': ('min(256, int(m / 10 x 256))', {0: 0, 5: 128, 9: 230, 10: 256}),
    'SolarizeIncreasing': ('256 - min(256, int(m / 10 x 256))', {0: 256, 5: 128, 9: 26, 10: 0}),
    'SolarizeAdd': ('min(128, int(m / 10 x 110))', {0: 0, 5: 55, 9: 99, 10: 110}),
    **{op: ('m / 10 x 1.8 + 0.1', {0: 0.1, 5: 1.0, 9: 1.72, 10: 1.9})
       for op in ('Color', 'Contrast', 'Brightness', 'Sharpness')},
    **{op + 'Increasing': ('max(0.1, 1 + sign x m / 10 x 0.9)', {0: 1.0, 5: 1.45, 9: 1.81, 10: 1.9})
       for op in ('Color', 'Contrast', 'Brightness', 'Sharpness')},
    **{op: ('no argument', {0: None, 5: None, 9: None, 10: None}) for op in ('AutoContrast', 'Equalize', 'Invert')},
}


@pytest.mark.parametrize('op', ALL_OPS)
def test_argument_is_timms_formula_written_out(op):
    _, table = FORMULA[op]
    for m, want in table.items():
        assert (LEVELS[op](float(m), 1) if op in LEVELS else None) == pytest.approx(want), (op, m)
        if op in SIGNED:
            negative = max(0.1, 1.0 - (want - 1.0)) if op.endswith('Increasing') else -want
            assert LEVELS[op](float(m), -1) == pytest.approx(negative), (op, m)
        elif op in LEVELS:
            assert LEVELS[op](float(m), -1) == LEVELS[op](float(m), 1)      # no sign: the same either way
    assert set(FORMULA) == set(ALL_OPS)                                 # every op of the policy has its row


@pytest.mark.parametrize('op', ALL_OPS)
@pytest.mark.parametrize('sign', [1, -1])
def test_pixels_on_a_pil_image_are_timms(op, sign, monkeypatch):
    img = picture()
    arg = timm_argument(op, 9.0, sign, monkeypatch)
    theirs = timm_aa.NAME_TO_OP[op](img, *([] if arg is None else [arg]), fillcolor=FILL, resample=Image.BICUBIC)
    ours = apply(img, op, arg, list(FILL))
    assert isinstance(ours, Image.Image)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs)), op
    assert not np.array_equal(np.asarray(ours), np.asarray(img)) or op in ('AutoContrast',)   # it did something


@pytest.mark.parametrize('op', ALL_OPS)
def test_pixels_on_a_tensor_are_timms_up_to_resampling(op, monkeypatch):
    """uint8 tensors (Fashion-MNIST, CIFAR): the pixel ops agree to within 1 level (torchvision's grey
    weights round differently); the geometric ones resample bilinearly, not bicubically, so they agree
    on average, far closer than the op moves the image (a wrong sign or axis would not)."""
    img = picture()
    arg = timm_argument(op, 9.0, -1, monkeypatch)
    theirs = np.asarray(timm_aa.NAME_TO_OP[op](img, *([] if arg is None else [arg]), fillcolor=FILL,
                                               resample=Image.BICUBIC), dtype=np.int64)
    ours = apply(F.pil_to_tensor(img), op, arg, list(FILL))
    assert ours.dtype == torch.uint8
    diff = np.abs(ours.permute(1, 2, 0).numpy().astype(np.int64) - theirs)
    if op in ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'):
        moved = np.abs(theirs - np.asarray(img, dtype=np.int64)).mean()
        assert diff.mean() < 0.15 * moved, (op, diff.mean(), moved)
    else:
        assert diff.max() <= 1, op


def test_extremes_timm_reaches():
    """Magnitude 10 (clipped noise reaches it ~2% of the time): posterize keeps 0 bits, a black image
    (Pillow >= 11 refuses 0 bits, so timm itself fails there); magnitude 0: solarize at 256, no change."""
    img = picture()
    black = apply(img, 'PosterizeIncreasing', LEVELS['PosterizeIncreasing'](10.0, 1), list(FILL))
    assert LEVELS['PosterizeIncreasing'](10.0, 1) == 0 and not np.asarray(black).any()
    same = apply(F.pil_to_tensor(img), 'SolarizeIncreasing', LEVELS['SolarizeIncreasing'](0.0, 1), list(FILL))
    assert LEVELS['SolarizeIncreasing'](0.0, 1) == 256 and torch.equal(same, F.pil_to_tensor(img))

# -----------------------------------------------------------------------------
# 2. Policy strings


def timm_policy(spec):
    """timm's RandAugment, its posterize to 0 bits a black image as under the Pillow of the release's day
    (Pillow >= 11 raises instead, see test_extremes_timm_reaches)."""
    policy = timm_aa.rand_augment_transform(spec, dict(HPARAMS))
    for op in policy.ops:
        if op.name.startswith('Posterize'):
            op.aug_fn = lambda img, bits, **kw: Image.new(img.mode, img.size) if bits == 0 else \
                timm_aa.posterize(img, bits)
    return policy


@pytest.mark.parametrize('spec', [AUTHORS, 'rand-m9-mstd0.5', 'rand-m7-n3-p0.3-mstd1.0-mmax15-inc1', 'rand-m9',
                                  'rand-m5-mstd101'])
def test_policy_string_reads_as_timm_reads_it(spec):
    ours, theirs = RandAugment(**parse_policy(spec)), timm_policy(spec)
    op = theirs.ops[0]
    assert ours.ops == [o.name for o in theirs.ops]
    assert (ours.num_ops, ours.magnitude, ours.prob) == (theirs.num_layers, op.magnitude, op.prob)
    assert ours.std == op.magnitude_std and ours.mmax == (op.magnitude_max or 10)


def test_policy_names_and_errors():
    authors = randaugment(AUTHORS)
    assert isinstance(authors, RandAugment)
    assert authors.ops[4:7] == ['PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd']
    assert len(authors.ops) == len(OPS) == 15 and 'Invert' in authors.ops
    tv = randaugment('torchvision-m9')
    assert isinstance(tv, v2.RandAugment) and (tv.num_ops, tv.magnitude, tv.num_magnitude_bins) == (2, 9, 31)
    assert randaugment('torchvision-m5-n3').num_ops == 3 and randaugment('') is None
    for bad in ('9', 'rand-x9', 'rand-m9-tweights', 'augmix-m5', 'torchvision-9'):
        with pytest.raises(ValueError, match="randaug"):
            randaugment(bad)

# -----------------------------------------------------------------------------
# 3. Sampling: 2 ops with replacement, each applied with p 0.5, magnitude N(9, 0.5) clipped to [0, 10]


def test_sampling_statistics():
    ra, n = randaugment(AUTHORS), 20000
    ops, applied, m, signs = ra.draw((n, ra.num_ops), torch.Generator().manual_seed(0))   # (n, 2) each
    assert ra.num_ops == 2
    assert abs(applied.double().mean() - 0.5) < 0.01                        # 4 sigma = 0.01
    m = m[applied]
    assert m.min() >= 0 and m.max() == 10.0                                  # clipped, and the clip is reached
    assert abs((m == 10).double().mean() - 0.0228) < 0.004                   # P(N(9, 0.5) > 10) = P(z > 2)
    assert abs(m.mean() - 9.0) < 0.01 and abs(m.std() - 0.49) < 0.01        # the clip trims the std a little
    counts = torch.bincount(ops.flatten(), minlength=15)
    assert len(counts) == 15                                                 # the 15 ops, no other index
    assert ((counts - 2 * n / 15).abs() < 5 * math.sqrt(2 * n / 15)).all()  # uniform over the 15 ops
    same = (ops[:, 0] == ops[:, 1]).double().mean()
    assert abs(same - 1 / 15) < 0.01                                         # drawn with replacement
    assert set(signs.unique().tolist()) == {-1, 1} and abs(signs.double().mean()) < 0.02   # balanced


def applied_ops(policy, img, n, monkeypatch):
    """[(op, argument)] that policy applies in n calls on img, in order (apply() recorded, not run)."""
    import util.augment
    seen = []

    def record(img, op, argument, fill):
        seen.append((op, argument))
        return img
    monkeypatch.setattr(util.augment, 'apply', record)
    for _ in range(n):
        policy(img)
    return seen


def test_sampling_matches_timms(monkeypatch):
    """The two implementations side by side: how often an op is applied, and the distribution of the
    rotation angle it gets (magnitude noise, clipping and sign together)."""
    img, n = Image.new('RGB', (8, 8)), 6000

    def record(name, log):
        return lambda img, *args, **kw: log.append((name, args[0] if args else None)) or img
    theirs, log = timm_policy(AUTHORS), []
    for op in theirs.ops:
        op.aug_fn = record(op.name, log)
    random.seed(0), np.random.seed(0)
    for _ in range(n):
        theirs(img)
    torch.manual_seed(0)
    mine = applied_ops(randaugment(AUTHORS), img, n, monkeypatch)
    assert abs(len(log) - len(mine)) / (2 * n) < 0.02
    for name in ('Rotate', 'ShearX', 'TranslateYRel'):
        a = torch.tensor([v for o, v in log if o == name], dtype=torch.float64)
        b = torch.tensor([v for o, v in mine if o == name], dtype=torch.float64)
        assert abs(a.abs().mean() - b.abs().mean()) < 0.02 * b.abs().mean(), name
        assert abs(a.abs().std() - b.abs().std()) < 0.15 * b.abs().std(), name
        assert abs((a > 0).double().mean() - (b > 0).double().mean()) < 0.1, name


def test_policy_changes_images_as_timms_does_on_average():
    """Whole policy on one image, many times: the mean absolute change per pixel is timm's, and the
    plain torchvision RandAugment(2, 9) is the weaker one the issue measured."""
    img = picture()
    base = np.asarray(img, dtype=np.float64)

    def mean_change(policy, n=300):
        return np.mean([np.abs(np.asarray(policy(img), dtype=np.float64) - base).mean() for _ in range(n)])
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    theirs, ours = mean_change(timm_policy(AUTHORS)), mean_change(randaugment(AUTHORS))
    weaker = mean_change(randaugment('torchvision-m9'))
    assert abs(ours - theirs) < 0.15 * theirs, (ours, theirs)
    assert weaker < ours

# -----------------------------------------------------------------------------
# 4. Random erasing: timm's mode 'pixel', one box


def boxes(erase, n, shape=(3, 64, 48)):
    """(fraction of images erased, their box areas / image area, box h / w, the noise values)."""
    areas, aspects, values = [], [], []
    for _ in range(n):
        out = erase(torch.zeros(shape))
        hit = out.ne(0).any(0)                                                 # (H, W)
        if hit.any():
            rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert hit.sum() == h * w                                          # one solid rectangle
            areas.append(h * w / (shape[1] * shape[2]))
            aspects.append(h / w)
            values.append(out[:, hit])
    return len(areas) / n, torch.tensor(areas), torch.tensor(aspects), torch.cat(values, 1)


def test_random_erasing_is_timms_pixel_mode():
    torch.manual_seed(0), random.seed(0)
    ours = boxes(random_erasing(0.25), 4000)
    theirs = boxes(TimmRandomErasing(0.25, mode='pixel', max_count=1, device='cpu'), 4000)
    for (p, areas, aspects, values) in (ours, theirs):
        assert abs(p - 0.25) < 0.03
        assert areas.min() >= 0.015 and areas.max() <= 0.35                   # 2% .. 1/3, rounded to pixels
        assert aspects.min() >= 0.25 and aspects.max() <= 4.0                  # 0.3 .. 1/0.3, likewise
        assert abs(values.mean()) < 0.02 and abs(values.std() - 1) < 0.02      # N(0, 1) per pixel, not zeros
    assert abs(ours[1].mean() - theirs[1].mean()) < 0.012                      # mean area ~0.17
    assert abs(ours[2].log().mean() - theirs[2].log().mean()) < 0.1            # log aspect, symmetric
    assert abs(ours[2].log().std() - theirs[2].log().std()) < 0.05

# -----------------------------------------------------------------------------
# 5. On a batch (data sets held in memory): each image its own argument, the per-image op's pixels


def batch_images(n=24, size=32):
    """n textured uint8 images (n, 3, size, size), each its own noise."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    noise = torch.randint(0, 40, (n, 3, size, size), generator=torch.Generator().manual_seed(0))
    return (torch.stack([xx * 7, yy * 5, (xx + yy) * 3]) % 256 + noise).clamp(0, 255).to(torch.uint8)


def on_batch(batch, images, op, args, torchvision=False):
    """Op `op` on every image of a batch at its own argument (args (n,), or None), as BatchRandAugment applies it."""
    n = len(images)
    ids, rows = torch.zeros(n, dtype=torch.long), torch.zeros(n, 6, dtype=torch.float64)
    batch.put(ids, rows, torch.ones(n, dtype=torch.bool), op, args, torchvision)
    return batch(images, [group(ids, rows)])


def assert_same_pixels(ours, theirs, op):
    """Equal, but for a level on at most 0.5% of the pixels (a blend's rounding: fused multiply-add or not)."""
    diff = (ours.int() - theirs.int()).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() <= 0.005, (op, diff.max(), (diff > 0).double().mean())


@pytest.mark.parametrize('op', ALL_OPS)
def test_timms_ops_on_a_batch_are_applys_per_image(op):
    images, g = batch_images(), torch.Generator().manual_seed(3)
    m = (9 + 0.5 * torch.randn(len(images), dtype=torch.float64, generator=g)).clamp(0, 10)
    signs = torch.randint(2, (len(images),), generator=g) * 2 - 1
    args = [LEVELS[op](m_i, s) if op in LEVELS else None for m_i, s in zip(m.tolist(), signs.tolist())]
    ours = on_batch(BatchRandAugment(randaugment(AUTHORS, fill=FILL), 32), images, op.removesuffix('Increasing'),
                    None if op not in LEVELS else args)
    theirs = torch.stack([apply(x, op, a, FILL) for x, a in zip(images, args)])
    assert_same_pixels(ours, theirs, op)
    assert not torch.equal(ours, images)


@pytest.mark.parametrize('op', list(v2.RandAugment._AUGMENTATION_SPACE))
def test_torchvisions_ops_on_a_batch_are_its_own_per_image(op):
    """torchvision's RandAugment (the CIFAR preset's): each op at its magnitude, signed per image."""
    images, policy = batch_images(), randaugment('torchvision-m9')
    fn, signed = policy._AUGMENTATION_SPACE[op]
    magnitudes = fn(policy.num_magnitude_bins, 32, 32)
    m = None if magnitudes is None else float(magnitudes[policy.magnitude])
    if m is not None:
        negative = torch.rand(len(images), generator=torch.Generator().manual_seed(4)) <= 0.5
        m = m * (1.0 - 2.0 * negative.double()) if signed else torch.full((len(images),), m, dtype=torch.float64)
    ours = on_batch(BatchRandAugment(policy, 32), images, op, m, torchvision=True)
    theirs = torch.stack([policy._apply_image_or_video_transform(x, op, 0.0 if m is None else m_i,
                                                                 interpolation=policy.interpolation, fill=policy._fill)
                          for x, m_i in zip(images, [None] * len(images) if m is None else m.tolist())])
    assert_same_pixels(ours, theirs, op)
    assert torch.equal(ours, images) == (op == 'Identity')


@pytest.mark.parametrize('op', ['Posterize', 'PosterizeIncreasing'])
def test_posterize_beyond_8_bits_is_timms_identity_on_both_paths(op, monkeypatch):
    """rand-mmax30-m30: Posterize at 12 bits; the batch mask was 0 (every image black) and the per-image path
    raised ValueError; timm leaves the image unchanged. Its increasing variant there keeps 0 bits on both paths
    (timm's own raises)."""
    img = picture()
    if op == 'Posterize':
        theirs = timm_aa.NAME_TO_OP[op](img, timm_argument(op, 30.0, 1, monkeypatch))
        assert np.array_equal(np.asarray(apply(img, op, LEVELS[op](30.0, 1), list(FILL))), np.asarray(theirs))
    images = batch_images()
    ours = on_batch(BatchRandAugment(randaugment(AUTHORS, fill=FILL), 32), images, 'Posterize',
                    [LEVELS[op](30.0, 1)] * len(images))
    theirs = torch.stack([apply(x, op, LEVELS[op](30.0, 1), FILL) for x in images])
    assert torch.equal(ours, theirs) and torch.equal(ours, images) == (op == 'Posterize')
    assert op == 'Posterize' or not ours.any()


@pytest.mark.parametrize('args, says', [
    (['--randaug', 'torchvision-m31'], "--randaug 'torchvision-m31': "),     # IndexError: 31 bins
    (['--randaug', 'rand-n1000000'], "--randaug 'rand-n1000000': "),        # no step in 120 s
    (['--crop-pad', '32'], '--crop-pad 32: must be below --img-size 32'),   # the reflect pad raised
])
def test_augmentation_the_batch_path_cannot_run_is_refused_before_anything_is_written(tmp_path, monkeypatch, args,
                                                                                      says):
    """Each failed after config.json and log.txt were written."""
    import finetune
    from conftest import TINY, run_in_process
    msg = run_in_process(monkeypatch, finetune, *TINY, *args, '--out-dir', tmp_path / 'out', '--max-steps', '1')
    assert msg and says in msg, msg
    assert not (tmp_path / 'out').exists()
