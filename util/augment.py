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
torchvision's tensor kernels have. torchvision is imported by the functions that call it, when a run asks for
them: importing it imports torch's compiler (torch._dynamo), which a run without these ops never needs.
"""
import dataclasses
import math
import re

import torch
from PIL import Image


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
    # bits kept: 0..4 (a magnitude above 10: up to 8, the image unchanged, as timm)
    'Posterize': lambda m, s: min(8, int(m / 10 * 4)),
    'PosterizeIncreasing': lambda m, s: max(0, 4 - int(m / 10 * 4)),             # 4..0
    'Solarize': lambda m, s: min(256, int(m / 10 * 256)),                         # threshold 0..256
    'SolarizeIncreasing': lambda m, s: 256 - min(256, int(m / 10 * 256)),         # 256..0
    'SolarizeAdd': lambda m, s: min(128, int(m / 10 * 110)),                      # added below 128
    **{op: lambda m, s: m / 10 * 1.8 + 0.1 for op in ENHANCE},
    **{op + 'Increasing': lambda m, s: max(0.1, 1.0 + s * m / 10 * 0.9)        # 1 = unchanged
       for op in ENHANCE},
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
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

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
    [0, magnitude]) clipped to [0, mmax]. All randomness is torch's (util.datafiles.SeededDataset seeds it).
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

    def draw(self, shape, generator=None):
        """(op index, applied, magnitude, sign) tensors of `shape`: each entry one op drawn for
        one image."""
        ops = torch.randint(len(self.ops), shape, generator=generator)
        applied = torch.rand(shape, generator=generator) < self.prob
        if self.std == math.inf:
            m = self.magnitude * torch.rand(shape, dtype=torch.float64, generator=generator)
        else:
            m = self.magnitude + self.std * torch.randn(shape, dtype=torch.float64,
                                                        generator=generator)
        signs = torch.randint(2, shape, generator=generator) * 2 - 1
        return ops, applied, m.clamp(0.0, self.mmax), signs

    def __call__(self, img):
        ops, applied, m, signs = (t.tolist() for t in self.draw((self.num_ops,)))
        for o, a, m_i, sign in zip(ops, applied, m, signs):
            if a:   # the op drawn is applied
                op = self.ops[o]
                img = apply(img, op, LEVELS[op](m_i, sign) if op in LEVELS else None, self.fill)
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
            raise ValueError(f"--randaug '{spec}': cannot read '{part}' (use m, n, p, mstd, "
                             f"mmax, inc, e.g. rand-m9-mstd0.5-inc1)")
        name, convert = keys[found[1]]
        kw[name] = convert(found[2])
    return kw


# the most ops an image may take in a row (each is a pass over the batch)
MOST_OPS = 16


def randaugment(spec, fill=(128, 128, 128)):
    """The transform a --randaug string names, or None for ''. fill: the dataset's mean colour (0-255). A
    ValueError naming the fix for a string it cannot run (more than MOST_OPS ops, a torchvision magnitude beyond its
    31 bins): util/launch.parse_config refuses it so, before anything is written."""
    if not spec:
        return None
    found = re.fullmatch(r'torchvision-m(\d+)(?:-n(\d+))?', spec)
    policy = None
    if spec.startswith('rand-'):
        policy = RandAugment(**parse_policy(spec), fill=fill)
    elif found and int(found[1]) < 31:
        from torchvision.transforms import v2
        policy = v2.RandAugment(num_ops=int(found[2] or 2), magnitude=int(found[1]))
    if policy and policy.num_ops <= MOST_OPS:
        return policy
    raise ValueError(f"--randaug '{spec}': use timm's policy string (rand-m9-mstd0.5-inc1), "
                     f"torchvision-m9 (torchvision's RandAugment, magnitude 9 of 0 to 30), at most "
                     f"n{MOST_OPS} ops, or '' for none")


# timm's RandomErasing ranges: a box's share of the image, its aspect ratio (drawn log-uniform)
ERASE_SCALE = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)


def random_erasing(prob):
    """timm's RandomErasing(mode='pixel', max_count=1), which torchvision's is step for step once given
    timm's ranges: with probability prob one box of 2%-1/3 of the image, aspect ratio log-uniform in
    [0.3, 1/0.3], filled with standard normal noise (the image is normalised by then)."""
    from torchvision.transforms import v2
    return v2.RandomErasing(p=prob, scale=ERASE_SCALE, ratio=ERASE_RATIO, value='random')

# -----------------------------------------------------------------------------
# The same augmentation on a whole batch of uint8 images (n, 3, H, W) on their device (data.py's
# data sets held in memory). Each image draws its own ops and arguments on the host, from a CPU
# generator (a few numbers an image, drawn for the whole batch at once, the same on every device),
# so the host knows which images drew which op without asking the device. Each op then runs once,
# on the images that drew it, each at its own argument; every geometric op is one affine
# resampling. The pixels are the per-image tensor ops' above (torchvision's for its own policy),
# but for a level where float rounding differs.

BATCH_OPS = ('Identity', 'Affine', 'AutoContrast', 'Equalize', 'Invert', 'Posterize', 'Solarize',
             'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness')


class BatchRandAugment:
    """A RandAugment policy (RandAugment above, or torchvision's v2.RandAugment as randaugment()
    builds it: nearest, black fill) per image over a batch of size x size images: draw() on the
    host, then __call__ on the device."""

    def __init__(self, policy, size):
        self.policy = policy
        self.size = size
        # outside the image: timm's fill, or torchvision's black
        self.fill = torch.tensor(policy.fill or [0], dtype=torch.float32).view(1, -1, 1, 1)
        if isinstance(policy, RandAugment):
            self.mode = 'bilinear'
        else:   # torchvision's table: each op's magnitudes, and whether a sign is drawn
            self.mode = 'nearest'
            self.space = [(name, fn(policy.num_magnitude_bins, size, size), signed)
                          for name, (fn, signed) in policy._AUGMENTATION_SPACE.items()]

    def to(self, device):
        """Its fill colour on device (made there once, not at every batch)."""
        self.fill = self.fill.to(device)
        return self

    def draw(self, n, generator):
        """Per op slot, group()'s (groups, order, rows) of the op each of n images applies (an index
        of BATCH_OPS) and its argument, a row of 6 float64 numbers (a geometric op's inverse affine
        matrix; else the op's number, in the first column)."""
        slots = []
        for _ in range(self.policy.num_ops):
            ids = torch.zeros(n, dtype=torch.long)
            rows = torch.zeros(n, 6, dtype=torch.float64)
            if isinstance(self.policy, RandAugment):
                ops, applied, m, signs = self.policy.draw((n,), generator)
                for i, op in enumerate(self.policy.ops):
                    picked = (ops == i) & applied
                    arg = None
                    if op in LEVELS:   # each image's, as the per-image policy computes it
                        drawn = zip(m[picked].tolist(), signs[picked].tolist())
                        arg = [LEVELS[op](m_i, s) for m_i, s in drawn]
                    self.put(ids, rows, picked, op.removesuffix('Increasing'), arg)
            else:   # torchvision's draws: an op of its table, then for a signed one its sign
                ops = torch.randint(len(self.space), (n,), generator=generator)
                negative = torch.rand(n, generator=generator) <= 0.5
                for i, (op, magnitudes, signed) in enumerate(self.space):
                    picked = ops == i
                    m = None if magnitudes is None else float(magnitudes[self.policy.magnitude])
                    if m is not None and signed:   # exactly -m or m
                        m = m * (1.0 - 2.0 * negative[picked].double())
                    self.put(ids, rows, picked, op, m, torchvision=True)
            slots.append(group(ids, rows))
        return slots

    def put(self, ids, rows, picked, op, arg, torchvision=False):
        """Write op `op` at its argument `arg` (one per picked image, or one for all, broadcast; None:
        none) into ids and rows, as the per-image op computes it: apply() above, or torchvision's
        _apply_image_or_video_transform."""
        if arg is not None:
            arg = torch.as_tensor(arg, dtype=torch.float64)
        theta = self.geometry(op, arg)
        ids[picked] = BATCH_OPS.index(op if theta is None else 'Affine')
        if theta is not None:
            rows[picked] = theta
        elif op == 'Posterize':                        # the bits kept, as a mask
            rows[picked, 0] = ((0xFF << (8 - arg.long())) & 0xFF).double()
        elif arg is not None:
            if torchvision:   # its threshold: a fraction of 255; its factors: 1 + magnitude
                arg = 255.0 * arg if op == 'Solarize' else 1.0 + arg
            rows[picked, 0] = arg

    def geometry(self, op, arg):
        """The inverse affine rows (k, 6) of a geometric op at arguments arg (k,) (one row (6,) at one
        argument ()), or None for another op: torchvision's _get_inverse_affine_matrix at scale 1
        (output x, y, 1 -> input x, y, the image's centre at 0), written out for the one angle, shear
        or shift each op has, with the same float64 roundings."""
        if arg is None:
            return None
        c = -0.5 * self.size                           # F.affine's center=[0, 0]: the corner
        zero, one = torch.zeros_like(arg), torch.ones_like(arg)
        row = [one, zero, zero, zero, one, zero]       # the identity
        shear = torch.atan(arg).rad2deg().deg2rad()    # a shear's angle, to degrees and back
        if op == 'Rotate':                             # F.rotate: mod 360, turned the other way
            r = (-(arg % 360)).deg2rad()
            row = [r.cos(), r.sin(), zero, -r.sin(), r.cos(), zero]
        elif op == 'ShearX':
            row[1:3] = shear.tan(), -(shear.tan() * c)
        elif op == 'ShearY':
            row[3] = shear.sin() / shear.cos()
            row[5] = c - row[3] * c - c
        elif op == 'TranslateX':                       # torchvision's: whole pixels, right
            row[2] = -arg.trunc()
        elif op == 'TranslateY':                       # down
            row[5] = -arg.trunc()
        elif op == 'TranslateXRel':                    # timm's, as apply(): a fraction, left, up
            row[2] = c - (c - arg * self.size)
        elif op == 'TranslateYRel':
            row[5] = c - (c - arg * self.size)
        else:
            return None
        return torch.stack(row, -1)

    def __call__(self, x, slots):
        """x (n, 3, H, W) uint8 on the device; slots: per op slot (groups, order, rows), order
        and rows on the device, groups [(op, count)] on the host: order lists the images that
        apply an op, grouped by op."""
        for groups, order, rows in slots:
            if groups:
                counts = [count for _, count in groups]
                parts = zip(groups, x[order].split(counts), rows.split(counts))
                outs = [batch_op(sub, op, r, self.fill, self.mode) for (op, _), sub, r in parts]
                x = x.index_copy(0, order, torch.cat(outs))
        return x


def group(ids, rows):
    """(groups [(op, count)], order (m,), rows (m, 6)) of a slot's draws: the images that apply
    an op (not Identity), grouped by op."""
    counts = torch.bincount(ids, minlength=len(BATCH_OPS)).tolist()
    order = torch.argsort(ids, stable=True)[counts[0]:]    # Identity's (id 0) first: left out
    groups = [(op, c) for op, c in zip(BATCH_OPS, counts) if c and op != 'Identity']
    return groups, order, rows[order]


def batch_op(x, op, rows, fill, mode):
    """Op `op` (of BATCH_OPS) on uint8 images x (n, 3, H, W), each at its row's argument
    (rows (n, 6))."""
    from torchvision.transforms.v2 import functional as F
    if op == 'Affine':
        return affine(x, rows.float().view(-1, 2, 3), fill, mode)
    if op == 'AutoContrast':
        return autocontrast(x)
    if op == 'Equalize':
        return F.equalize(x)
    if op == 'Invert':
        return F.invert(x)
    arg = rows[:, 0].float().view(-1, 1, 1, 1)
    if op == 'Posterize':
        return x & arg.to(torch.uint8)
    if op == 'Solarize':
        return torch.where(x >= arg, 255 - x, x)
    if op == 'SolarizeAdd':
        return torch.where(x < 128, (x + arg.to(torch.int16)).clamp(max=255), x).to(torch.uint8)
    other = (1.0 - rows[:, 0]).float().view(-1, 1, 1, 1)   # 1 - the factor, in float64
    img = x.float()
    if op == 'Sharpness':   # the interior moves toward its 3x3 blur (rounded); the border stays
        img[..., 1:-1, 1:-1] += other * (sharpness_blur(img) - img[..., 1:-1, 1:-1])
        return img.clamp(0, 255).to(torch.uint8)
    if op == 'Brightness':   # toward black
        degenerate = 0.0
    else:   # Color: toward grey; Contrast: toward the grey image's mean (grey levels floored)
        degenerate = F.rgb_to_grayscale(x).float()
        if op == 'Contrast':
            degenerate = degenerate.mean((-3, -2, -1), keepdim=True)
    return (img * arg + degenerate * other).clamp(0, 255).to(torch.uint8)


def affine(x, theta, fill, mode):
    """uint8 images x (n, C, S, S) (BatchRandAugment's, square), each resampled by its inverse
    affine matrix theta (n, 2, 3) as torchvision's tensor kernel does (_affine_grid,
    _apply_grid_transform); outside the image: fill (1, C or 1, 1, 1)."""
    n, _, h, w = x.shape
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=x.device)   # rows' too (square)
    base = torch.stack([*torch.meshgrid(xs, xs, indexing='xy'),
                        torch.ones(h, w, device=x.device)], -1)                      # (H, W, 3)
    scale = torch.full((1, 1, 2), 0.5 * w, device=x.device)   # on the device: no copy from the host
    grid = base.view(1, h * w, 3) @ (theta.mT / scale)                             # (n, H * W, 2)
    img = x.float()
    img = torch.cat([img, torch.ones_like(img[:, :1])], 1)   # ones mark where the image was
    img = torch.nn.functional.grid_sample(img, grid.view(n, h, w, 2), mode=mode,
                                          padding_mode='zeros', align_corners=False)
    img, mask = img[:, :-1], img[:, -1:]
    if mode == 'nearest':
        img = torch.where(mask < 0.5, fill, img)
    else:
        img = (img - fill) * mask + fill
    return img.round().to(torch.uint8)


def autocontrast(x):
    """torchvision's autocontrast on uint8 images (n, C, H, W), each channel stretched to 0-255;
    without its boolean-mask assignments, which wait for the device."""
    x = x.float()
    low, high = x.amin((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return ((x - torch.where(flat, 0.0, low)) / scale).clamp(0, 255).to(torch.uint8)


def sharpness_blur(img):
    """The interior (n, 3, H - 2, W - 2) of torchvision's sharpness blur of images (n, 3, H, W) of
    whole numbers in float32: 3x3, 5 at the centre and 1 around, over 13, rounded."""
    kernel = torch.full((3, 3), 1 / 13, device=img.device)
    kernel[1, 1].fill_(5 / 13)   # in place: an assigned number is copied from the host
    return torch.nn.functional.conv2d(img, kernel.expand(3, 1, 3, 3), groups=3).round()


def erasing_boxes(n, size, prob, generator):
    """random_erasing(prob)'s boxes for n images of size x size, drawn as v2.RandomErasing draws
    one (up to 10 tries at an area of 2%-1/3 and a log-uniform aspect ratio, its sides rounded; the
    first that fits): (n, 4) float64 rows of top, left, height, width; height and width 0 where an
    image is not erased."""
    hit = torch.rand(n, generator=generator) < prob
    scale = torch.empty(n, 10).uniform_(*ERASE_SCALE, generator=generator).double()
    log_ratio = torch.empty(n, 10).uniform_(*map(math.log, ERASE_RATIO), generator=generator)
    area, ratio = size ** 2 * scale, log_ratio.exp().double()
    sides = torch.stack([(area * ratio).sqrt(), (area / ratio).sqrt()]).round()   # (2, n, 10)
    fits = (sides < size).all(0)
    first = fits.double().argmax(1, keepdim=True)                      # the first try that fits
    sides = torch.where(hit & fits.any(1), sides.gather(2, first.expand(2, -1, -1))[..., 0], 0.0)
    # each box's top-left corner: top, then left (one draw of 2n numbers, as two of n)
    corner = torch.rand(2, n, dtype=torch.float64, generator=generator)
    corner = (corner * (size - sides + 1)).floor()
    return torch.cat([corner, sides]).T


def erase(x, boxes, generator):
    """Normalised images x (n, C, S, S), each one's box (boxes (n, 4) on x's device) filled with
    standard normal noise drawn on the device (timm's mode 'pixel')."""
    top, left, h, w = boxes.float().T.reshape(4, -1, 1, 1, 1)            # (n, 1, 1, 1) each
    cols = torch.arange(x.shape[-1], device=x.device)                  # the rows' too (square)
    rows = cols.view(-1, 1)
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)   # (n, 1, S, S)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    return torch.where(inside, noise, x)
