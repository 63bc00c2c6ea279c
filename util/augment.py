"""
Augmentation policies by name: the authors' RandAugment, torchvision's, and random erasing with noise.

    --randaug rand-m9-mstd0.5-inc1   timm's RandAugment as the authors' release and MAE fine-tuning use it
    --randaug torchvision-m9         torchvision's RandAugment(num_ops=2, magnitude=9)
    --randaug ''                     off
    --reprob 0.25                    one box of per-pixel noise, after normalisation (timm's mode 'pixel')

The two RandAugments differ in strength. timm's magnitude runs 0-10: m9 rotates by up to 27 degrees;
each of its 2 ops is applied with probability 0.5, at a magnitude drawn anew from N(9, 0.5). torchvision's
runs over 31 bins: 9 rotates by 9 degrees, and both ops are always applied. The timm policy is written out
here from timm's auto_augment.py (op list, level-to-argument formulas, fill), on
torchvision.transforms.v2.functional ops. On PIL images every op gives timm's pixels exactly (bicubic
resampling, fill = the dataset mean); on tensors the geometric ops resample bilinearly, the only kind
torchvision's tensor kernels have.
"""
import dataclasses
import math
import re

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


# -----------------------------------------------------------------------------
# The ops: what a magnitude (0-10) means for each, and how it is applied


def signed(scale):
    """The argument of a geometric op: m / 10 x scale, turned either way by the sign (timm's _randomly_negate)."""
    return lambda m, s: s * m / 10 * scale


ENHANCE = ('Color', 'Contrast', 'Brightness', 'Sharpness')   # PIL's ImageEnhance ops: a factor

# name: (level, sign) -> argument. The level is the magnitude on timm's 0-10 scale; sign is +-1, drawn
# per application: the signed ops turn either way. The ops without an argument are not listed.
LEVELS = {
    'Rotate': signed(30.0),                                                       # degrees
    'ShearX': signed(0.3),                                                        # shear factor
    'ShearY': signed(0.3),
    'TranslateXRel': signed(0.45),                                                # fraction of the width
    'TranslateYRel': signed(0.45),
    'Posterize': lambda m, s: int(m / 10 * 4),                                    # bits kept: 0..4
    'PosterizeIncreasing': lambda m, s: 4 - int(m / 10 * 4),                      # 4..0
    'Solarize': lambda m, s: min(256, int(m / 10 * 256)),                         # threshold 0..256
    'SolarizeIncreasing': lambda m, s: 256 - min(256, int(m / 10 * 256)),         # 256..0
    'SolarizeAdd': lambda m, s: min(128, int(m / 10 * 110)),                      # added below 128
    **{op: lambda m, s: m / 10 * 1.8 + 0.1 for op in ENHANCE},
    **{op + 'Increasing': lambda m, s: max(0.1, 1.0 + s * m / 10 * 0.9) for op in ENHANCE},   # 1 = unchanged
}


def point(img, table):
    """Map every 8-bit value v of img (a PIL image or a uint8 tensor) to table[v].
    Posterize, Solarize and SolarizeAdd are such tables: one path for both image types, and the
    extremes timm reaches (0 bits kept, threshold 256) that Pillow and torchvision refuse."""
    if isinstance(img, Image.Image):
        return img.point(table * len(img.getbands()))
    return torch.tensor(table, dtype=torch.uint8)[img.long()]


def apply(img, op, argument, fill):
    """img after the op `op` at `argument` (None for AutoContrast, Equalize and Invert), as timm's NAME_TO_OP does
    it; an increasing variant is its op. The geometric ops fill with `fill` and resample bicubically on PIL images
    (timm's), bilinearly on tensors (the only kind torchvision's tensor kernels have).
    Shears and translations are PIL's affine transform about the top-left corner, as timm calls it: a shear
    factor s moves row y by s * y pixels; a translation of dx, dy pixels moves the content left / up
    (torchvision's translate moves it right / down, hence -dx, -dy)."""
    def affine(img, shear_x=0.0, shear_y=0.0, dx=0.0, dy=0.0):
        return F.affine(img, angle=0.0, translate=[-dx, -dy], scale=1.0, center=[0, 0],
                        shear=[math.degrees(math.atan(shear_x)), math.degrees(math.atan(shear_y))],
                        interpolation=interpolation, fill=fill)
    interpolation = v2.InterpolationMode.BICUBIC if isinstance(img, Image.Image) else v2.InterpolationMode.BILINEAR
    h, w = F.get_size(img)
    ops = {   # name: (img, *argument) -> img
        'AutoContrast': F.autocontrast,
        'Equalize': F.equalize,
        'Invert': F.invert,
        'Rotate': lambda img, a: F.rotate(img, a, interpolation=interpolation, fill=fill),
        'ShearX': lambda img, a: affine(img, shear_x=a),
        'ShearY': lambda img, a: affine(img, shear_y=a),
        'TranslateXRel': lambda img, a: affine(img, dx=a * w),
        'TranslateYRel': lambda img, a: affine(img, dy=a * h),
        'Posterize': lambda img, bits: point(img, [v >> (8 - bits) << (8 - bits) for v in range(256)]),
        'Solarize': lambda img, threshold: point(img, [255 - v if v >= threshold else v for v in range(256)]),
        'SolarizeAdd': lambda img, add: point(img, [min(255, v + add) if v < 128 else v for v in range(256)]),
        'Color': F.adjust_saturation,
        'Contrast': F.adjust_contrast,
        'Brightness': F.adjust_brightness,
        'Sharpness': F.adjust_sharpness,
    }
    return ops[op.removesuffix('Increasing')](img, *([] if argument is None else [argument]))


# timm's _RAND_TRANSFORMS; 'inc1' swaps in the variants whose strength increases with the magnitude
OPS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast',
       'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']

# -----------------------------------------------------------------------------
# The policy


@dataclasses.dataclass
class RandAugment:
    """timm's RandAugment: per image, num_ops ops drawn uniformly with replacement; each is applied
    with probability prob, at a magnitude drawn from N(magnitude, std) (std inf: uniform on
    [0, magnitude]) clipped to [0, mmax]. All randomness is torch's (util.engine.SeededDataset seeds it).
    fill: the dataset's mean colour (0-255)."""
    num_ops: int = 2              # timm's defaults, where its policy string gives no value
    magnitude: float = 10.0
    std: float = 0.0
    prob: float = 0.5
    mmax: float = 10.0
    increasing: bool = False
    fill: tuple = (128, 128, 128)

    def __post_init__(self):
        self.ops = [op + 'Increasing' if self.increasing and op + 'Increasing' in LEVELS else op for op in OPS]

    def sample(self):
        """[(op, magnitude, sign)] for one image, one entry per op drawn; magnitude None: not applied."""
        n = self.num_ops
        ops, applied = torch.randint(len(self.ops), (n,)).tolist(), (torch.rand(n) < self.prob).tolist()
        if self.std == math.inf:
            m = self.magnitude * torch.rand(n, dtype=torch.float64)
        else:
            m = self.magnitude + self.std * torch.randn(n, dtype=torch.float64)
        m = m.clamp(0.0, self.mmax).tolist()
        signs = (torch.randint(2, (n,)) * 2 - 1).tolist()
        return [(self.ops[o], m_i if a else None, s) for o, a, m_i, s in zip(ops, applied, m, signs)]

    def __call__(self, img):
        for op, m, sign in self.sample():
            if m is not None:
                img = apply(img, op, LEVELS[op](m, sign) if op in LEVELS else None, self.fill)
        return img

# -----------------------------------------------------------------------------
# Policies by name


def parse_policy(spec):
    """'rand-m9-mstd0.5-inc1' -> the RandAugment keywords it gives, as timm reads its strings: m (magnitude,
    default 10), n (ops, 2), p (probability per op, 0.5), mstd (magnitude std, 0; above 100: uniform), mmax (upper
    clip, 10), inc (0/1: the increasing op variants). The defaults are RandAugment's."""
    kw = {}
    keys = {'m': ('magnitude', float), 'n': ('num_ops', int), 'p': ('prob', float),
            'mstd': ('std', lambda v: math.inf if float(v) > 100 else float(v)),
            'mmax': ('mmax', float), 'inc': ('increasing', lambda v: bool(int(v)))}
    for part in spec.split('-')[1:]:
        found = re.fullmatch(r'([a-z]+)(\d+(?:\.\d*)?)', part)
        if not found or found[1] not in keys:
            raise ValueError(f"--randaug {spec}: cannot read '{part}' (use m, n, p, mstd, mmax, inc, e.g. "
                              f"rand-m9-mstd0.5-inc1)")
        name, convert = keys[found[1]]
        kw[name] = convert(found[2])
    return kw


def randaugment(spec, fill=(128, 128, 128)):
    """The transform a --randaug string names, or None for ''. fill: the dataset's mean colour (0-255)."""
    if not spec:
        return None
    if spec.startswith('rand-'):
        return RandAugment(**parse_policy(spec), fill=fill)
    found = re.fullmatch(r'torchvision-m(\d+)(?:-n(\d+))?', spec)
    if found:
        return v2.RandAugment(num_ops=int(found[2] or 2), magnitude=int(found[1]))
    raise ValueError(f"--randaug '{spec}': use timm's policy string (rand-m9-mstd0.5-inc1), torchvision-m9 "
                      f"(torchvision's RandAugment, magnitude 9 of 31), or '' for none")


def random_erasing(prob):
    """timm's RandomErasing(mode='pixel', max_count=1), which torchvision's is step for step once given
    timm's ranges: with probability prob one box of 2%-1/3 of the image, aspect ratio log-uniform in
    [0.3, 1/0.3], filled with standard normal noise (the image is normalised by then)."""
    return v2.RandomErasing(p=prob, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), value='random')
