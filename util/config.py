"""
One typed config per script: a dataclass whose fields are the script's flags (`--key-name value`), each declared once
with option(default, help, rule): its value, the sentence `--help` shows, and its range. `--data` picks a preset
applied before your flags. Out of range is refused in one line (each field's rule, then checks(): rules across
fields) before anything is made. Saved in every run directory and checkpoint; RESUMABLE: what a resume may change.
The fields every training script shares: TrainConfig; every script that scores trained models: ModelsConfig.
"""
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field

from util.datafiles import DATASETS
from util.errors import ConfigError, flag, show
from vit import ACTS, IMPLEMENTATIONS, MOST, SIZES

AMP = ('auto', 'bf16', 'fp16', 'off')
COMPILE = ('auto', 'true', 'false')
COMPILE_REPAID = 4000   # steps: --compile auto's least run on a GPU (util/launch.py says why)
DATA = tuple(DATASETS)   # each one's size, classes, statistics, training images, where it is held, its reader
# the data sets --compile auto may compile for: held in memory, their training images known before they are read
COMPILED_DATA = [name for name, row in DATASETS.items() if row.held and row.train_images]

# -----------------------------------------------------------------------------
# A field declared once


def option(default=MISSING, help='', rule=None, factory=MISSING, choices=None):
    """A config field: its default (or factory, for a list), the sentence --help shows, and its rule, a pair
    (holds(value) -> bool, what is allowed) that check() applies before anything is built; or the values it
    may take (choices), which argparse refuses others of as it parses."""
    return field(default=default, default_factory=factory,
                 metadata={'help': help, 'rule': rule, 'choices': choices})


def at_least(n, note='', most=math.inf):
    """The rule n <= value (<= most): 'must be at least 1', 'must be at least 0 (off), at most 256' (note: what the
    lower bound means). Sizes, counts, workers and timeouts have a most: what a machine can hold or wait for."""
    allowed = f'must be at least {n}'
    if note:
        allowed += f' ({note})'
    if most < math.inf:
        allowed += f', at most {most:,}'
    return (lambda v: n <= v <= most), allowed


# the most a machine can hold or wait for
SIZE = MOST['img_size']      # pixels or channels
DEPTH = MOST['depth']        # blocks or heads
BATCH = 2 ** 20     # images a batch
WORKERS = 256       # loader workers
EPOCHS = 10 ** 6
STEPS = 2 ** 40     # steps, or images
SECONDS = 10 ** 7


def declared(cls):
    """{field: {'help': ..., 'rule': ...}}: a field declared again in a subclass keeps its base class's help and
    rule where it gives none of its own."""
    out = {}
    for klass in reversed(cls.__mro__):
        for f in getattr(klass, '__dataclass_fields__', {}).values():
            out.setdefault(f.name, {}).update({k: v for k, v in f.metadata.items() if v})
    return out

# -----------------------------------------------------------------------------
# The fields every training script shares


def names_a_folder(path):
    """Whether a path names something, in one line (a line break in it would cut every line that names it)."""
    return bool(path) and '\n' not in path and '\r' not in path


PROBABILITY = (lambda v: 0 <= v <= 1, 'is a probability: [0, 1]')
UNIT = (lambda v: 0 <= v < 1, 'must be in [0, 1)')
FRACTION = (lambda v: 0 < v <= 1, 'must be in (0, 1]')


@dataclass
class TrainConfig:
    """Fields shared by every training script. Defaults are the small (Fashion-MNIST) recipe."""
    data: str = option('fashion-mnist', ' | '.join(DATA), choices=DATA)
    data_dir: str = './data'
    val_size: int = option(0, 'hold out this many training images and evaluate on them, not on '
                              'test', at_least(0, 'off', STEPS))
    out_dir: str = option('runs/default', 'run directory: config, log, metrics, checkpoint',
                          (names_a_folder, 'must name a directory, in one line (no newline: '
                                           'every line naming it would be cut)'))
    resume: bool = option(False, 'continue from <out_dir>/checkpoint.pt')
    overwrite: bool = option(False, 'start afresh in an --out-dir that holds a run (finished or '
                                    'not): deletes it')
    new_data: bool = option(False, "--resume on a training split other than the saved run's (its "
                                   "files, sizes or times changed), on purpose")
    # model (vit.py's sizes; none keeps the size's own value)
    model: str = option('vit_tiny', choices=tuple(SIZES))
    img_size: int = option(28, rule=at_least(1, most=MOST['img_size']))
    patch_size: int = option(4, rule=at_least(1, most=MOST['patch_size']))
    embed_dim: typing.Optional[int] = option(None, rule=at_least(1, most=MOST['embed_dim']))
    depth: typing.Optional[int] = option(None, rule=at_least(1, most=MOST['depth']))
    num_heads: typing.Optional[int] = option(None, rule=at_least(1, most=MOST['num_heads']))
    global_pool: bool = option(False, 'classify the mean of the patch tokens (false: the class '
                                      'token)')
    drop_path: float = option(0.0, rule=UNIT)
    # augmentation
    hflip: float = option(0.5, rule=PROBABILITY)
    crop_pad: int = option(2, 'small images: random crop after reflect-padding this much',
                           at_least(0, 'off', SIZE))
    min_scale: float = option(0.08, "large images: RandomResizedCrop's smallest area", FRACTION)
    # read where parse_config checks it, by the augmentation that runs it (util/augment.randaugment)
    randaug: str = option('', "RandAugment: rand-m9-mstd0.5-inc1 (timm's policy) | torchvision-m9 "
                              "| '' = off")
    reprob: float = option(0.0, "random erasing probability (one box of noise, timm's mode "
                                "'pixel')", PROBABILITY)
    mixup: float = option(0.0, rule=at_least(0, 'off'))
    cutmix: float = option(0.0, rule=at_least(0, 'off'))
    smoothing: float = option(0.1, rule=UNIT)
    # optimisation: lr = blr * batch_size * accum_steps * world_size / 256
    epochs: int = option(10, rule=at_least(1, most=EPOCHS))
    warmup_epochs: float = option(1.0, rule=at_least(0))
    batch_size: int = option(128, 'per process', at_least(1, most=BATCH))
    eval_batch_size: int = option(0, 'images an evaluation batch, per process, at least --batch-size (it keeps no '
                                     'gradients); 0 = auto: on a GPU 1,000 or --batch-size if larger, on a CPU '
                                     '--batch-size', at_least(0, 'auto', BATCH))
    accum_steps: int = option(1, rule=at_least(1, most=BATCH))
    blr: float = option(1e-3, rule=at_least(0))
    min_lr: float = option(1e-6, 'the lr the cosine ends at (absolute); see --min-lr-ratio',
                           at_least(0))
    min_lr_ratio: float = option(0.0, 'the lr the cosine ends at, as a fraction of the peak: it '
                                      'scales with the batch as the peak does; 0 = --min-lr', UNIT)
    weight_decay: float = option(0.05, rule=at_least(0))
    layer_decay: float = option(1.0, 'lr of layer l (0 embedding, i + 1 block i) scales by '
                                     'layer_decay ** (L - l)', FRACTION)
    layer_decay_offset: int = option(1, "L = depth + this (the head at L): 1 as MAE counts, 0 as "
                                        "the release's copy", at_least(0, most=DEPTH))
    beta2: float = option(0.999, rule=UNIT)
    clip_grad: float = option(0.0, 'max grad norm; 0 = off', at_least(0, 'off'))
    ema: float = option(0.0, 'EMA decay per step; 0 = no EMA', UNIT)
    # system
    amp: str = option('auto', ' | '.join(AMP), choices=AMP)
    attn_implementation: str = option('auto', 'eager (explicit maps) | sdpa (fused, no map '
                                              'stored) | auto: per device',
                                      choices=('auto', *IMPLEMENTATIONS))
    compile: str = option('auto', 'the training step compiled (torch.compile; on one GPU without --cuda-graph, '
                                  'captured as CUDA graphs by torch): true | false | auto: true on a GPU for the '
                                  f"small data sets held in memory ({', '.join(COMPILED_DATA)}) in a run of at "
                                  f'least {COMPILE_REPAID:,} steps, which repays the compilation, unless the '
                                  'step is one CUDA graph; false elsewhere', choices=COMPILE)
    cuda_graph: str = option('auto', 'the whole training step captured once as one CUDA graph (torch.cuda.graph), '
                                     'then replayed: true | false | auto: true for a data set held in memory, where '
                                     'a run allows it (one process on a GPU, --accum-steps 1, bf16 or fp32); false '
                                     'elsewhere', choices=COMPILE)
    seed: int = option(0, rule=(lambda v: 0 <= v < 2 ** 63,
                                'must be in [0, 2**63): torch seeds its generators with 64 bits'))
    num_workers: int = option(2, 'loader processes for folders (ImageNet, ImageFolder); a data set '
                                 'held in memory (Fashion-MNIST, CIFAR) is batched on the device '
                                 'without them',
                              at_least(0, 'load in the main process', WORKERS))
    fake_size: int = option(2048, "images in --data fake's train split", at_least(1, most=STEPS))
    log_every: int = option(50, 'steps between progress lines', at_least(1, most=STEPS))
    save_every: int = option(0, 'steps between checkpoints (besides each epoch); 0 = epochs only',
                             at_least(0, 'each epoch only', STEPS))
    max_steps: int = option(0, 'only cuts the run short after this many steps (0 = no limit): the '
                               'lr schedule stays the whole --epochs one, so a run cut by it and '
                               'resumed without it ends exactly as the uncut run. A short complete '
                               'run: fewer --epochs, --warmup-epochs',
                            at_least(0, 'no limit', STEPS))
    dist_timeout: int = option(1800, 'seconds a process waits for the others (torchrun) before '
                                     'every one stops', at_least(1, 'seconds', SECONDS))

    # what --resume true may change: where and how the run goes, never what it computes
    # (REFERENCE.md, "resume")
    RESUMABLE = ('resume', 'overwrite', 'new_data', 'out_dir', 'data_dir', 'num_workers', 'log_every',
                 'save_every', 'max_steps', 'compile', 'cuda_graph', 'dist_timeout', 'attn_implementation',
                 'eval_batch_size')
    # the script whose runs this config makes: a run directory is continued only by the script that made it
    SCRIPT = ''
    # the fields naming files a run reads (a teacher, --init weights) or writes once done (mae_pretrain.py's
    # --export): never one its run directory replaces
    INPUTS = ()

    def checks(self):
        """Rules across fields, (field, holds, what is allowed), checked after each field's own: the first that
        does not hold is refused. A subclass adds its own rows: `return super().checks() + [...]`."""
        size = SIZES.get(self.model, {})
        dim = self.embed_dim or size.get('embed_dim')
        heads = self.num_heads or size.get('num_heads')
        # a transfer student's depth may be the teacher's, known later
        depth = self.depth or size.get('depth') or 0
        batch = self.batch_size * self.accum_steps
        return [
            ('warmup_epochs', self.warmup_epochs <= self.epochs,
             f'must be at most --epochs {self.epochs}: the lr would never reach its peak'),
            ('crop_pad', self.crop_pad < self.img_size,
             f'must be below --img-size {self.img_size}: a reflect pad takes at most the image less '
             f'one pixel'),
            ('img_size', self.patch_size < 1 or self.img_size % self.patch_size == 0,
             f'must be a multiple of --patch-size {self.patch_size}'),
            ('num_heads' if self.num_heads else 'embed_dim',
             not (dim and heads) or dim % heads == 0,
             f'the width {dim} must be a multiple of the number of heads {heads} (--embed-dim, '
             f'--num-heads)'),
            decay_floor(self, depth),
            ('min_lr', not self.min_lr_ratio or self.min_lr == TrainConfig.min_lr,
             f'is not used while --min-lr-ratio {self.min_lr_ratio} gives the final lr: pass '
             f'--min-lr-ratio 0 to set it absolutely'),
            ('eval_batch_size', not self.eval_batch_size or self.eval_batch_size >= self.batch_size,
             f'must be 0 (auto) or at least --batch-size {self.batch_size}: the start-up check runs on '
             f'the first evaluation batch, at the size of a training batch'),
            ('fake_size', self.data != 'fake' or self.fake_size >= batch,
             f'gives no full batch of {batch} images (--batch-size x --accum-steps)'),
        ]

    def resume_conflicts(self, ckpt, world, free=(), method=None):
        """Why this config cannot continue the run saved in checkpoint `ckpt` on `world` processes:
        ['--flag old -> new', ...], empty if it can. Fields missing from the saved config count as their
        default; batch size and accumulation steps may change if the global batch stays the same; so may the
        fields `free` (the lr after the run diverged: resume.AFTER_DIVERGENCE). method: what the config's own
        resolve step settled (a transfer run's teacher: teacher.TransferConfig compares it)."""
        saved = {**asdict(type(self)()), **ckpt['config']}   # a field it lacks: the default
        may_change = (*self.RESUMABLE, *free, 'batch_size', 'accum_steps')
        out = [f'{flag(k)} {show(saved[k])} -> {show(v)}' for k, v in asdict(self).items()
               if k not in may_change and saved[k] != v]
        old = (saved['batch_size'], saved['accum_steps'], len(ckpt['rng']))   # one state a process
        new = (self.batch_size, self.accum_steps, world)
        if math.prod(old) != math.prod(new):
            out.append(f'global batch {math.prod(old)} (--batch-size {old[0]} x --accum-steps '
                       f'{old[1]} x {old[2]} process(es)) -> {math.prod(new)} ({new[0]} x '
                       f'{new[1]} x {new[2]}): keep it, e.g. with --accum-steps')
        return out


@dataclass
class ComponentsConfig(TrainConfig):
    """TrainConfig and vit.py's components of other ViT families, for a model trained here built like one
    (finetune.py, mae_pretrain.py): a teacher built like DINOv2 or CLIP, or a baseline built like its teacher's
    student (tools/reproduce.py). A file loaded with --init must have the same."""
    layer_scale: float = option(0.0, '> 0: layer scale starting at this value (CaiT, DINOv2); '
                                     '0 = none',
                                (lambda v: 0 <= v <= 100,
                                 'must be 0 (no layer scale) or a positive initial value, '
                                 'at most 100'))
    norm_pre: bool = option(False, 'a LayerNorm before the blocks (CLIP)')
    act: str = option('gelu', 'gelu | quick_gelu (CLIP)', choices=ACTS)

    def components(self):
        """The VisionTransformer keywords these flags set."""
        return dict(init_values=self.layer_scale or None, norm_pre=self.norm_pre, act=self.act)


def component_flags(components):
    """The ComponentsConfig flags that build components ({keyword: value} beyond a plain ViT, as
    teacher.components gives them); a component no flag builds (registers, a LayerNorm epsilon) is left to the
    reader of the model's --init to refuse."""
    flags = {'init_values': '--layer-scale', 'norm_pre': '--norm-pre', 'act': '--act'}
    out = []
    for k, v in components.items():
        if k in flags:
            out += [flags[k], str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def decay_floor(cfg, depth):
    """The checks() row refusing a layer decay that gives the embedding an lr scale of 0 in floating
    point."""
    return ('layer_decay_offset', cfg.layer_decay ** (depth + cfg.layer_decay_offset) > 0,
            f'gives the embedding an lr scale of --layer-decay {cfg.layer_decay} ** ({depth} '
            f'blocks + {cfg.layer_decay_offset}), which is 0 in floating point: use 0 or 1 (or '
            f'raise --layer-decay)')


def readable(parse, value):
    """Whether parse(value) reads it (a ValueError says not)."""
    try:
        parse(value)
    except ValueError:
        return False
    return True


def check(cfg):
    """Each field a finite number (every one of a list) within its rule (a field left none, as a size left to the
    model's own, passes), then cfg.checks(): raise ConfigError naming the first flag that fails."""
    notes = declared(type(cfg))
    for name, value in asdict(cfg).items():
        numbers = value if isinstance(value, list) else [value]
        finite = not any(isinstance(v, float) and not math.isfinite(v) for v in numbers)
        refuse(cfg, [(name, finite, 'must be a finite number')])
        if value is not None and 'rule' in notes[name]:
            holds, allowed = notes[name]['rule']
            refuse(cfg, [(name, holds(value), allowed)])
    return refuse(cfg, cfg.checks() if hasattr(cfg, 'checks') else [])


def refuse(cfg, rows):
    """Raise ConfigError naming the flag of the first (field, holds, what is allowed) row that does not
    hold."""
    for name, holds, allowed in rows:
        if not holds:
            # '' for an empty one: the flag alone; a line break shown as Python writes it, the message one line
            value = show(getattr(cfg, name)).replace('\n', '\\n').replace('\r', '\\r')
            raise ConfigError(f'{flag(name)} {value}: {allowed}' if value else
                              f'{flag(name)} {allowed}')
    return cfg

# -----------------------------------------------------------------------------
# The fields every script that scores trained models shares


@dataclass
class ModelsConfig:
    """The flags every scoring of trained models shares (ensemble.py, evaluate.py)."""
    models: list[str] = option(factory=list, help='checkpoint files or names: --models a.pt b.pt')
    num_heads: list[int] = option(factory=list, help='head counts of files of weights alone: '
                                  'one for every model, or one each '
                                  "(0: the file's record or family)")
    img_size: int = option(0, "0 = the models' own (they must share one)",
                           at_least(0, "the models' own", SIZE))
    batch_size: int = option(256, rule=at_least(1, most=BATCH))
    num_workers: int = option(2, rule=at_least(0, 'load in the main process', WORKERS))
    amp: str = option('auto', ' | '.join(AMP), choices=AMP)
    attn_implementation: str = option('auto', 'eager (explicit maps) | '
                                              'sdpa (fused, no map stored) | auto: per device',
                                      choices=('auto', *IMPLEMENTATIONS))
    seed: int = option(0, "seeds the loader's generator (the test split is not shuffled)",
                       (lambda v: 0 <= v < 2 ** 63,
                        'must be in [0, 2**63): torch seeds its generators with 64 bits'))

    def checks(self):   # --num-heads beside --models
        return [('num_heads', len(self.num_heads) in (0, 1, len(self.models)),
                 f'gives {len(self.num_heads)} head counts for {len(self.models)} models: '
                 f'one for all, or one each'),
                ('num_heads', all(0 <= h <= DEPTH for h in self.num_heads),
                 f"must be 0 (the file's record or family) or more, at most {DEPTH}")]

# -----------------------------------------------------------------------------
# The small data sets' recipe, which every script starts from (the sources of every value: RECIPES.md)

SMALL_PRESETS = {
    # trains in minutes on a CPU; width, heads, pooling and crops chosen on the validation split
    # (VALIDATION.md)
    'fashion-mnist': dict(model='vit_tiny', embed_dim=64, depth=6, num_heads=8, img_size=28,
                          patch_size=4, global_pool=True, epochs=9, batch_size=128, blr=2e-3,
                          warmup_epochs=1, weight_decay=0.05, crop_pad=0, log_every=100),
    **{data: dict(model='vit_tiny', depth=9, img_size=32, patch_size=4, epochs=100, batch_size=256,
                  warmup_epochs=5, crop_pad=4, randaug='torchvision-m9', reprob=0.25, drop_path=0.1)
       for data in ('cifar10', 'cifar100')},
    'fake': dict(model='vit_tiny', depth=2, img_size=32, patch_size=8, epochs=1, batch_size=32,
                 num_workers=0, log_every=5),
}
