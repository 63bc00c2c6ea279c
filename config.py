"""
One typed config per script: a dataclass holds every hyper-parameter with its default, the command
line is derived from it (`--key-name value`), and `--data` picks a preset applied before your flags.
Unknown keys and wrong types are errors; the config is saved in every run directory and checkpoint.
"""
import argparse
import dataclasses
import sys
import typing
from dataclasses import asdict, dataclass

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
    compile: bool = False
    seed: int = 0
    num_workers: int = 2
    fake_size: int = 2048           # images in --data fake's train split
    log_every: int = 50             # steps between progress lines
    save_every: int = 0             # steps between checkpoints (besides each epoch); 0 = epochs only
    max_steps: int = 0              # stop after this many steps (smoke runs); 0 = no limit


class ConfigError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):     # one line, non-zero exit, no usage dump
        sys.exit(f'{self.prog}: error: {message} (see --help)')


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


def parse_config(cls, presets=None, argv=None):
    """cls's defaults < presets[--data] < command line. Unknown keys and bad values are errors."""
    presets, hints = presets or {}, typing.get_type_hints(cls)
    defaults = asdict(cls())
    p = _Parser(allow_abbrev=False, description=(sys.modules['__main__'].__doc__ or '').strip().split('\n')[0],
                epilog='presets (applied by --data, before your flags): ' +
                '; '.join(f'{k}: ' + ' '.join(f'{a}={b}' for a, b in v.items()) for k, v in presets.items()))
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        many = typing.get_origin(tp) is list    # list[X]: --key a b c
        p.add_argument('--' + f.name.replace('_', '-'), dest=f.name, nargs='+' if many else None,
                       type=_converter(typing.get_args(tp)[0] if many else tp), default=argparse.SUPPRESS,
                       metavar=_metavar(tp), help=f'(default: {defaults[f.name]})')
    given = vars(p.parse_args(argv))
    preset = presets.get(given.get('data', defaults.get('data')), {})
    for k in preset:
        assert k in defaults, f'preset key {k} is not a config field'
    return cls(**{**defaults, **preset, **given})


