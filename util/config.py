"""
One typed config per script: a dataclass holds every hyper-parameter with its default, the command
line is derived from it (`--key-name value`), and `--data` picks a preset applied before your flags.
Unknown keys and wrong types are errors, and so are values out of range: each config lists its rules in
`checks()`, run by parse_config before anything is made or loaded. The config is saved in every run
directory and checkpoint; `RESUMABLE` names the fields a resumed run may change. `--help` lists every flag with
the value that command line runs with (`--data X --help`: under X's preset), where it comes from, and the
comment the dataclass gives the field.
"""
import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import textwrap
import typing
from dataclasses import asdict, dataclass

from data import INFO
from util.augment import randaugment
from vit import IMPLEMENTATIONS, SIZES

AMP = ('auto', 'bf16', 'fp16', 'off')

# -----------------------------------------------------------------------------
# The fields every training script shares


@dataclass
class TrainConfig:
    """Fields shared by every training script. Defaults are the small (Fashion-MNIST) recipe."""
    data: str = 'fashion-mnist'     # cifar10 | cifar100 | fashion-mnist | imagenet | folder | fake
    data_dir: str = './data'
    val_size: int = 0               # hold out this many training images and evaluate on them, not on test
    out_dir: str = 'runs/default'   # run directory: config, log, metrics, checkpoint
    resume: bool = False            # continue from <out_dir>/checkpoint.pt
    overwrite: bool = False         # start afresh in an --out-dir that holds a run (finished or not): deletes it
    # model (vit.py's sizes; None keeps the size's own value)
    model: str = 'vit_tiny'
    img_size: int = 28
    patch_size: int = 4
    embed_dim: typing.Optional[int] = None
    depth: typing.Optional[int] = None
    num_heads: typing.Optional[int] = None
    global_pool: bool = False
    drop_path: float = 0.0
    # augmentation
    hflip: float = 0.5
    crop_pad: int = 2               # small images: random crop after reflect-padding this much
    min_scale: float = 0.08         # large images: RandomResizedCrop's smallest area
    randaug: str = ''               # RandAugment: rand-m9-mstd0.5-inc1 (timm's policy) | torchvision-m9 | '' = off
    reprob: float = 0.0             # random erasing probability (one box of noise, timm's mode 'pixel')
    mixup: float = 0.0
    cutmix: float = 0.0
    smoothing: float = 0.1
    # optimisation: lr = blr * batch_size * accum_steps * world_size / 256
    epochs: int = 10
    warmup_epochs: float = 1.0
    batch_size: int = 128           # per process
    accum_steps: int = 1
    blr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 1.0        # lr of layer l (0 embedding, i + 1 block i) scales by layer_decay ** (L - l)
    layer_decay_offset: int = 1     # L = depth + this (the head at L): 1 as MAE counts, 0 as the release's copy
    beta2: float = 0.999
    clip_grad: float = 0.0          # max grad norm; 0 = off
    ema: float = 0.0                # EMA decay per step; 0 = no EMA
    # system
    amp: str = 'auto'               # auto | bf16 | fp16 | off
    attn_implementation: str = 'auto'   # eager (explicit maps) | sdpa (fused, no map stored) | auto: per device
    compile: bool = False
    seed: int = 0
    num_workers: int = 2
    fake_size: int = 2048           # images in --data fake's train split
    log_every: int = 50             # steps between progress lines
    save_every: int = 0             # steps between checkpoints (besides each epoch); 0 = epochs only
    max_steps: int = 0              # only cuts the run short after this many steps (0 = no limit): the lr schedule
                                    # stays the whole --epochs one, so a run cut by it and resumed without it ends
                                    # exactly as the uncut run. A short complete run: fewer --epochs, --warmup-epochs
    dist_timeout: int = 1800        # seconds a process waits for the others (torchrun) before every one stops

    # what --resume true may change: where and how the run goes, never what it computes (README, "resume")
    RESUMABLE: typing.ClassVar[tuple] = ('resume', 'overwrite', 'out_dir', 'data_dir', 'num_workers', 'log_every',
                                         'save_every', 'max_steps', 'compile', 'dist_timeout', 'attn_implementation')
    # the script whose runs this config makes: a run directory is continued only by the script that made it
    SCRIPT: typing.ClassVar[str] = ''
    # the fields naming files a run reads (a teacher, --init weights): never one its run directory replaces
    INPUTS: typing.ClassVar[tuple] = ()

    def checks(self):
        """(field, holds, what is allowed): parse_config refuses the first row that does not hold.
        A subclass adds its own rows: `return super().checks() + [...]`."""
        size = SIZES.get(self.model, {})
        dim, heads = self.embed_dim or size.get('embed_dim'), self.num_heads or size.get('num_heads')
        depth = self.depth or size.get('depth') or 0    # a transfer student's may be the teacher's, known later
        return [
            ('data', self.data in INFO, f"choose one of {', '.join(INFO)}"),
            ('out_dir', self.out_dir != '', 'must name a directory'),
            ('val_size', self.val_size >= 0, 'must be 0 (off) or more'),
            ('model', self.model in SIZES, f"choose one of {', '.join(SIZES)}"),
            ('img_size', self.img_size >= 1, 'must be at least 1'),
            ('patch_size', self.patch_size >= 1, 'must be at least 1'),
            ('img_size', self.patch_size < 1 or self.img_size % self.patch_size == 0,
             f'must be a multiple of --patch-size {self.patch_size}'),
            ('embed_dim', self.embed_dim is None or self.embed_dim >= 1, 'must be at least 1 (or none)'),
            ('depth', self.depth is None or self.depth >= 1, 'must be at least 1 (or none)'),
            ('num_heads', self.num_heads is None or self.num_heads >= 1, 'must be at least 1 (or none)'),
            ('num_heads' if self.num_heads else 'embed_dim', not (dim and heads) or heads < 1 or dim % heads == 0,
             f'the width {dim} must be a multiple of the number of heads {heads} (--embed-dim, --num-heads)'),
            ('drop_path', 0 <= self.drop_path < 1, 'must be in [0, 1)'),
            ('hflip', 0 <= self.hflip <= 1, 'is a probability: [0, 1]'),
            ('crop_pad', self.crop_pad >= 0, 'must be 0 (off) or more'),
            ('min_scale', 0 < self.min_scale <= 1, 'is a fraction of the area: (0, 1]'),
            ('randaug', readable(randaugment, self.randaug),
             "use timm's policy string (rand-m9-mstd0.5-inc1), torchvision-m9, or '' for none"),
            ('reprob', 0 <= self.reprob <= 1, 'is a probability: [0, 1]'),
            ('mixup', self.mixup >= 0, 'must be 0 (off) or more'),
            ('cutmix', self.cutmix >= 0, 'must be 0 (off) or more'),
            ('smoothing', 0 <= self.smoothing < 1, 'must be in [0, 1)'),
            ('epochs', self.epochs >= 1, 'must be at least 1'),
            ('warmup_epochs', self.warmup_epochs >= 0, 'must be 0 or more'),
            ('batch_size', self.batch_size >= 1, 'must be at least 1'),
            ('accum_steps', self.accum_steps >= 1, 'must be at least 1'),
            ('blr', self.blr >= 0, 'must be 0 or more'),
            ('min_lr', self.min_lr >= 0, 'must be 0 or more'),
            ('weight_decay', self.weight_decay >= 0, 'must be 0 or more'),
            ('layer_decay', 0 < self.layer_decay <= 1, 'must be in (0, 1]'),
            ('layer_decay_offset', self.layer_decay_offset >= 0, 'must be 0 (the release) or 1 (MAE), or more'),
            ('layer_decay_offset', self.layer_decay ** (depth + min(max(self.layer_decay_offset, 0), 2 ** 20)) > 0,
             f'gives the embedding an lr scale of --layer-decay {self.layer_decay} ** ({depth} blocks + '
             f'{self.layer_decay_offset}), which is 0 in floating point: use 0 or 1 (or raise --layer-decay)'),
            ('beta2', 0 <= self.beta2 < 1, 'must be in [0, 1)'),
            ('clip_grad', self.clip_grad >= 0, 'must be 0 (off) or more'),
            ('ema', 0 <= self.ema < 1, 'is a decay per step: [0, 1), 0 = off'),
            ('amp', self.amp in AMP, f"choose one of {', '.join(AMP)}"),
            ('attn_implementation', self.attn_implementation in ('auto', *IMPLEMENTATIONS),
             f"choose auto or one of {', '.join(IMPLEMENTATIONS)}"),
            ('seed', 0 <= self.seed < 2 ** 63, 'must be in [0, 2**63): torch seeds its generators with 64 bits'),
            ('num_workers', self.num_workers >= 0, 'must be 0 (load in the main process) or more'),
            ('fake_size', self.fake_size >= 1, 'must be at least 1'),
            ('log_every', self.log_every >= 1, 'must be at least 1'),
            ('save_every', self.save_every >= 0, 'must be 0 (each epoch only) or more'),
            ('max_steps', self.max_steps >= 0, 'must be 0 (no limit) or more'),
            ('dist_timeout', self.dist_timeout >= 1, 'must be at least 1 (seconds)'),
            ('fake_size', self.fake_size * SAMPLER_BYTES <= machine_memory(),
             f'images would take {self.fake_size * SAMPLER_BYTES / 1e9:,.0f} GB to shuffle ({SAMPLER_BYTES} bytes each'
             f' in the sampler), more than the {machine_memory() / 1e9:,.0f} GB here: choose fewer'),
            *too_big(self, dim, depth, self.patch_size, (size.get('mlp_ratio', 4.0))),
        ]

    def resume_conflicts(self, ckpt, world, free=()):
        """Why this config cannot continue the run saved in checkpoint `ckpt` on `world` processes:
        ['--flag old -> new', ...], empty if it can. Fields missing from the saved config count as their
        default; batch size and accumulation steps may change if the global batch stays the same; so may the
        fields `free` (the lr after the run diverged: resume.AFTER_DIVERGENCE)."""
        saved, default = ckpt['config'], asdict(type(self)())
        out = [f'{flag(k)} {show(saved.get(k, default[k]))} -> {show(v)}' for k, v in asdict(self).items()
               if k not in (*self.RESUMABLE, *free, 'batch_size', 'accum_steps') and saved.get(k, default[k]) != v]
        old_world = ckpt.get('world_size', len(ckpt['rng']))
        old = (*(saved.get(k, default[k]) for k in ('batch_size', 'accum_steps')), old_world)
        if math.prod(old) != self.batch_size * self.accum_steps * world:
            out.append(f'global batch {math.prod(old)} (--batch-size {old[0]} x --accum-steps {old[1]} x {old[2]} '
                       f'process(es)) -> {self.batch_size * self.accum_steps * world} ({self.batch_size} x '
                       f'{self.accum_steps} x {world}): keep it, e.g. with --accum-steps')
        return out


class ConfigError(ValueError):
    pass

# -----------------------------------------------------------------------------
# Sizes that cannot fit: refused before anything is built (a ViT of a million blocks took minutes to build, then
# failed; a million-pixel image, an allocator's traceback)


SAMPLER_BYTES = 100    # an image's index in a shuffled epoch (the permutation, the list of (epoch, index) keys)


def machine_memory():
    """Bytes of memory a process trains in: the GPU's when there is one, else the machine's RAM."""
    import torch   # only here: the command line is parsed without it
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def memory_needed(dim, depth, img_size, patch_size, batch_size, mlp_ratio=4.0, training=True):
    """A lower bound of the bytes a ViT needs for one step, in fp32: its parameters (the blocks' attention and MLP
    weights, the position embeddings), 4 bytes each, 16 when training (gradients and AdamW's two moments too), and
    one batch of tokens (B x N x D numbers) per block when training, once without (the blocks' inputs kept for the
    backward pass). Attention maps, which some paths never build, are not counted."""
    tokens = (img_size // max(patch_size, 1)) ** 2 + 1
    params = depth * (4 + 2 * mlp_ratio) * dim ** 2 + tokens * dim + 3 * patch_size ** 2 * dim
    return (16 if training else 4) * params + 4 * batch_size * tokens * dim * (depth if training else 1)


def too_big(cfg, dim, depth, patch_size, mlp_ratio=4.0, training=True, what='a ViT'):
    """[] if a ViT of these sizes fits this machine's memory (memory_needed), else one checks() row naming the flag
    furthest above a usual value (ViT-L/16 at 224 px, batch 256) and every size that went into the estimate."""
    if not (dim and depth and patch_size and cfg.img_size > 0):
        return []       # a size not known yet (a transfer student's is its teacher's): checked once it is
    need, have = memory_needed(dim, depth, cfg.img_size, patch_size, cfg.batch_size, mlp_ratio, training), \
        machine_memory()
    if need <= have:
        return []
    usual = {'img_size': cfg.img_size / patch_size / 14, 'depth': depth / 24, 'embed_dim': dim / 1024,
             'batch_size': cfg.batch_size / 256}
    return [(max(usual, key=usual.get), False,
             f"makes {what} of {depth} blocks {dim} wide on {cfg.img_size} px images in {patch_size} px patches, "
             f"batch {cfg.batch_size}: at least {need / 1e9:,.0f} GB {'to train' if training else 'to run'}, more "
             f"than the {have / 1e9:,.0f} GB here (--img-size, --depth, --embed-dim, --batch-size)")]


def flag(name):
    return '--' + name.replace('_', '-')


def show(value):
    return ' '.join(map(str, value)) if isinstance(value, list) else str(value)


def readable(parse, value):
    """Whether parse(value) reads it (a ValueError says not)."""
    try:
        parse(value)
    except ValueError:
        return False
    return True


def check(cfg):
    """Every number finite, then cfg.checks(): raise ConfigError naming the first flag that fails."""
    for name, value in asdict(cfg).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f'{flag(name)} {show(value)}: must be a finite number')
    return refuse(cfg, cfg.checks() if hasattr(cfg, 'checks') else [])


def refuse(cfg, rows):
    """Raise ConfigError naming the flag of the first (field, holds, what is allowed) row that does not hold."""
    for name, holds, allowed in rows:
        if not holds:
            value = show(getattr(cfg, name))
            raise ConfigError(f'{flag(name)} {value}: {allowed}' if value else f'{flag(name)} {allowed}')
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, non-zero exit, no usage dump
        sys.exit(f'{self.prog}: error: {message} (see --help)')


class _Help(argparse.HelpFormatter):
    """argparse's layout, with room for the longest flags and no line broken inside a --flag-name."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=30)

    def _split_lines(self, text, width):
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(' '.join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def _converter(tp):
    if typing.get_origin(tp) is typing.Union:   # Optional[X]
        inner = _converter(typing.get_args(tp)[0])
        return lambda s: None if s.lower() == 'none' else inner(s)
    if tp is bool:
        def to_bool(s):
            if s.lower() in ('1', 'true', 'yes', 'on'):
                return True
            if s.lower() in ('0', 'false', 'no', 'off'):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got '{s}'")
        return to_bool
    return tp


def _metavar(tp):
    return _metavar(typing.get_args(tp)[0]) if typing.get_origin(tp) in (typing.Union, list) else tp.__name__.upper()


def parse_config(cls, presets=None, argv=None, preset_label='preset of --data {}'):
    """cls's defaults < presets[--data] < command line. Unknown keys and bad values are errors:
    wrong types exit at once, values out of range raise ConfigError (check), before anything is made.
    --help prints every flag's value for this command line (preset_label names where a preset's come from)."""
    presets, defaults = presets or {}, asdict(cls())
    given = vars(parser(cls, presets).parse_args(argv))
    data = given.get('data', defaults.get('data'))
    preset = presets.get(data, {})
    for k in preset:
        assert k in defaults, f'preset key {k} is not a config field'
    if given.pop('help', False):   # before check(): the help of a line that would be refused is still shown
        notes, label = field_notes(cls), preset_label.format(data)
        source = {k: 'your flag' if k in given else label if k in preset else 'default' for k in defaults}
        values = {**defaults, **preset, **given}
        helps = {k: f"{word(v)} ({source[k]}){'; ' + notes[k] if k in notes else ''}" for k, v in values.items()}
        print(parser(cls, presets, helps).format_help())
        sys.exit(0)
    return check(cls(**{**defaults, **preset, **given}))


def parser(cls, presets, helps=None):
    """The command line of a config: --key-name VALUE for each field, typed by its annotation; helps: {field: its
    line in --help} ('%' escaped: argparse formats help strings)."""
    hints, helps = typing.get_type_hints(cls), helps or {}
    doc = ' '.join((sys.modules[cls.__module__].__doc__ or '').strip().split('\n\n')[0].split())
    epilog = f"--data picks a preset ({', '.join(presets)}), applied before your flags: `--data X --help` shows the " \
             f"values under X's." if presets else None
    p = _Parser(allow_abbrev=False, add_help=False, description=doc, usage='%(prog)s [--flag value ...]',
                formatter_class=_Help, epilog=epilog)
    p.add_argument('-h', '--help', action='store_true', default=argparse.SUPPRESS,
                   help="show each flag's value for this command line, where it comes from, and what it means")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        many = typing.get_origin(tp) is list    # list[X]: --key a b c
        p.add_argument(flag(f.name), dest=f.name, nargs='+' if many else None,
                       type=_converter(typing.get_args(tp)[0] if many else tp), default=argparse.SUPPRESS,
                       metavar=_metavar(tp), help=helps.get(f.name, '').replace('%', '%%'))
    return p


def without_help(argv=None):
    """argv (None: sys.argv[1:]) without -h / --help: for a parse that only picks the presets, before the one that
    prints the help with them (finetune.py's --scratch, reproduce.py's --quick)."""
    return [a for a in (sys.argv[1:] if argv is None else argv) if a not in ('-h', '--help')]

# -----------------------------------------------------------------------------
# --help: each flag's value written as on the command line, and the field's comment


def word(value):
    """A value as it is written on the command line: true / false, none, '' for an empty string."""
    if isinstance(value, bool):
        return str(value).lower()
    return 'none' if value is None else "''" if value == '' else show(value)


def field_notes(cls):
    """{field: the comment beside it in the dataclass source, with its continuation lines}: the fields are
    documented once, where they are declared. A subclass's comment replaces its base's; none keeps it."""
    names, notes = {f.name for f in dataclasses.fields(cls)}, {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):    # no source (an interactive session): no comments
            continue
        last = None
        for line in lines:
            field = re.match(r' {4}(\w+)\s*:[^#]*(?:#\s?(.*))?$', line)
            more = re.match(r' {5,}#\s?(.*)$', line)      # a comment indented past the fields continues the last's
            if field and field[1] in names:
                last = field[1]
                notes[last] = field[2].strip() if field[2] else notes.get(last, '')
            elif more and last:
                notes[last] = f'{notes[last]} {more[1].strip()}'.strip()
            else:
                last = None
    return {k: v for k, v in notes.items() if v}

# -----------------------------------------------------------------------------
# The small data sets' recipe, which every script starts from (each adds its own fields; the sources of
# every value: RECIPES.md). The ImageNet recipes are each script's own.

SMALL_PRESETS = {
    # Fashion-MNIST: a recipe that trains in minutes on a CPU: 6 blocks of 64 wide (2.7x faster than 128 wide, which
    # transfer did not need), 8 heads of 8 (every transfer method closed more of the gap than with 4 heads
    # of 16: results/fashion-mnist/VALIDATION.md), 28x28 with 4x4 patches, average-pooled patch tokens,
    # flips only (random crops slowed learning too much for 9 epochs)
    'fashion-mnist': dict(model='vit_tiny', embed_dim=64, depth=6, num_heads=8, img_size=28, patch_size=4,
                          global_pool=True, epochs=9, batch_size=128, blr=2e-3, warmup_epochs=1, weight_decay=0.05,
                          crop_pad=0, num_workers=1, log_every=100),
    'cifar10': dict(model='vit_tiny', depth=9, img_size=32, patch_size=4, epochs=100, batch_size=256,
                    warmup_epochs=5, crop_pad=4, randaug='torchvision-m9', reprob=0.25, drop_path=0.1),
    'cifar100': dict(model='vit_tiny', depth=9, img_size=32, patch_size=4, epochs=100, batch_size=256,
                     warmup_epochs=5, crop_pad=4, randaug='torchvision-m9', reprob=0.25, drop_path=0.1),
    'fake': dict(model='vit_tiny', depth=2, img_size=32, patch_size=8, epochs=1, batch_size=32, num_workers=0,
                 log_every=5),
}
