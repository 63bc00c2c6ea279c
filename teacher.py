"""
The frozen teacher of attention transfer, and the student built to fit it (attention_copy.py, attention_distill.py):
what the teacher hands over, which teacher layer reaches which student layer, the student's shape (one with fewer
heads takes a group of the teacher's: attention_distill.to_student_heads); then the flags and their resolve step
(TransferConfig.resolve: the teacher's file inspected once, all of this settled before anything is built); the pair
built for a run (build_pair: what both transfer scripts do once the data is loaded), and the checks of a built teacher.

The teacher lives outside the student: frozen, in eval mode (the student's drop-path masks never reach it), run under
no_grad only as deep as the last transferred layer, never in DDP, the EMA or the student's checkpoint.
"""
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from util.checkpoints import (arch_of, check_weights, describe_teacher, read_checkpoint, read_hashed,
                              teacher_mismatch, vit_of)
from util.config import (DEPTH, SIZE, ConfigError, TrainConfig, at_least, decay_floor, option,
                         readable, refuse)
from util.engine import autocast, cast_matmul_weights
from util.memory import check_trainable
from vit import SIZES, VisionTransformer, attend, model_arch

# what is transferred (the attention map, or the teacher's q, k or v) -> what the teacher hands over for it
NAMES = {'attn': ('q', 'k'), 'q': ('q',), 'k': ('k',), 'v': ('v',)}
INDEX_SYNTAX = 'use all, 3, 0-17, 0,2,5 or 0-3,8'
PAIRS_SYNTAX = 'use auto or student:teacher layer pairs such as 0:0,1:4,2:8'
# the teacher this repository ships, by --data
SHIPPED = {'fashion-mnist': os.path.join(os.path.dirname(__file__), 'teachers',
                                         'fashion-mnist-mae.pt')}
# vit.py's components that some families add to the plain ViT (util/pretrained.py), with their plain values
PLAIN = dict(init_values=None, norm_pre=False, act='gelu', reg_tokens=0, norm_eps=1e-6)
# the follow-up that found the families with such components (DINOv2, CLIP, BEiTv2) failing with a plain student
FOLLOW_UP = 'arXiv 2605.07191'

# -----------------------------------------------------------------------------
# What the teacher hands over: q and k (a map is made where it is used), or its q, k or v


@torch.no_grad()
def teacher_outputs(teacher, x, layers, names):
    """{student layer: {name: tensor}}: its q and k (B, H, N, d) for copy and map-free distillation (the map is made
    where it is used), 'logits' (B, H, N, N) for eager distillation, or q, k or v; q, k and v are views of the layer's
    qkv output, as it made them. layers: {student: teacher}, or a list (the same layers)."""
    pairs = layer_pairs(layers)
    out = teacher.internals(x, pairs.values(), names)
    return {s: dict(out[t]) for s, t in pairs.items()}


def build_teacher(teacher, device, dtype=None):
    """The frozen teacher: the ViT inspect_teacher loaded (its file's weights), on device; dtype: the autocast it runs
    under (cast_matmul_weights; None: fp32). Its attention is eager until the start-up check settles it."""
    teacher.requires_grad_(False).eval().to(device)
    if dtype is not None:
        cast_matmul_weights(teacher, dtype)
    return teacher


def written_out(average_maps):
    """Why a transfer's maps must be written out, or '': an average is made of maps (--average-maps), which sdpa never
    stores. The one place this rule is decided: util/launch.attn_implementation sends auto to eager and refuses sdpa
    for it, for a run (TransferConfig.written_out) and for a copy student scored again (CopyModel.written_out)."""
    if average_maps == 'none':
        return ''
    return f'--average-maps {average_maps}: writes the maps out'


# -----------------------------------------------------------------------------
# Layer maps: which teacher layer reaches which student layer


def parse_index(spec, n, what):
    """'all' | '3' | '0-17' | '0,2,5' | '0-3,8' -> sorted list of indices in [0, n)."""
    if spec == 'all':
        return list(range(n))
    parts = [part.partition('-') for part in spec.split(',')]   # '0-3' -> ('0', '-', '3')
    try:
        ranges = [(int(a), int(b if dash else a)) for a, dash, b in parts]
    except ValueError:
        raise ConfigError(f"--{what} '{spec}': {INDEX_SYNTAX}") from None
    # an empty range inside a list would transfer less without a word (0,1-0: layer 0 alone)
    for lo, hi in ranges:
        if hi < lo:
            raise ConfigError(f'--{what} {spec}: {lo}-{hi} is an empty range (low-high, as '
                              f'{hi}-{lo})')
    # none negative: lo holds no '-', hi >= lo
    out = {i for lo, hi in ranges for i in range(lo, hi + 1)}
    if max(out) >= n:
        raise ConfigError(f'--{what} {spec}: the teacher has {what} 0..{n - 1}')
    return sorted(out)


def parse_pairs(spec):
    """'auto' -> None; '0:0,1:4,2:8' -> {0: 0, 1: 4, 2: 8} ({student layer: teacher layer})."""
    if spec == 'auto':
        return None
    try:
        pairs = [tuple(int(n) for n in p.split(':')) for p in spec.split(',')]
    except ValueError:
        pairs = []
    whole = pairs and all(len(p) == 2 and min(p) >= 0 for p in pairs)
    # malformed, negative, or a student layer twice
    if not whole or len(dict(pairs)) != spec.count(',') + 1:
        raise ConfigError(f"--layer-map '{spec}': {PAIRS_SYNTAX}, each student layer once")
    return dict(pairs)


def map_layers(spec, layers, teacher_depth, student_depth, layers_spec='all'):
    """{student layer: teacher layer} for the teacher's transferred `layers` (sorted). auto: the student transfers
    the same stretch of its depth (teacher layer l marks student layer round(l (D_s - 1) / (D_t - 1))), its k layers
    taking k of the teacher's, evenly spaced, first on first and last on last (equal depths: the identity).
    Otherwise spec names the pairs (parse_pairs), teacher layers among --layers, increasing with the student's."""
    def nearest(a, b):
        """a / b rounded half up; 0 if b is 0 (a one-layer model's only layer is first and last)."""
        return (2 * a + b) // (2 * b) if b else 0
    pairs = parse_pairs(spec)
    if pairs is None:
        student = sorted({nearest(l * (student_depth - 1), teacher_depth - 1) for l in layers})
        if len(student) == 1:   # one student layer: the teacher's last
            return {student[0]: layers[-1]}
        k = len(student)
        n = len(layers)
        return {s: layers[nearest(i * (n - 1), k - 1)] for i, s in enumerate(student)}
    pairs = dict(sorted(pairs.items()))
    if max(pairs) >= student_depth:
        raise ConfigError(f'--layer-map {spec}: the student has layers 0..{student_depth - 1}')
    if not set(pairs.values()) <= set(layers):
        raise ConfigError(f'--layer-map {spec}: teacher layers must be among --layers '
                          f'{layers_spec} (the teacher has layers 0..{teacher_depth - 1})')
    teacher = list(pairs.values())
    if teacher != sorted(set(teacher)):
        raise ConfigError(f'--layer-map {spec}: the teacher layers must increase with the student '
                          f'layers')
    return pairs


def layer_pairs(layers):
    """{student layer: teacher layer}: the map itself, or the identity on a list of layers."""
    return dict(layers) if isinstance(layers, dict) else {i: i for i in layers}


def describe_map(transfer):
    """The mapping in one line for the log: which teacher layer and heads reach which student layer and
    head."""
    teacher_heads = transfer.teacher['num_heads']
    student_heads = transfer.student['num_heads']
    g = teacher_heads // student_heads
    pairs = ' '.join(f'{s}:{t}' for s, t in transfer.layers.items())
    if g == 1:
        return f'layer map (student:teacher) {pairs}; heads one to one'
    return f"layer map (student:teacher) {pairs}; the teacher's {teacher_heads} heads in " \
           f'{student_heads} groups of {g}, maps averaged (student head j <- teacher heads ' \
           f'{g}j..{g}j+{g - 1})'

# -----------------------------------------------------------------------------
# The student built to fit


def student_presets(presets):
    """finetune.py's recipes for a student of its teacher's shape and patch: none of their size
    fields."""
    sizes = ('embed_dim', 'depth', 'num_heads')
    return {k: {**{f: x for f, x in v.items() if f not in sizes}, 'model': 'teacher',
                'patch_size': 0} for k, v in presets.items()}


def student_shape(cfg, t):
    """The student's size: the teacher's or --model's, the teacher's patch or --patch-size, --embed-dim,
    ..."""
    shape = dict(t) if cfg.model == 'teacher' else model_arch(cfg.model)
    shape['patch_size'] = cfg.patch_size or t['patch_size']
    for k in ('embed_dim', 'depth', 'num_heads'):
        if getattr(cfg, k) is not None:
            shape[k] = getattr(cfg, k)
    return shape


def build_student(student, cfg, num_classes=0):
    """The student of keywords `student` (the shape the resolve step settles), with the config's pooling and
    drop-path and num_classes outputs, built on the current device (the meta device: sized, nothing allocated) and
    randomly initialised."""
    return VisionTransformer(**{**student, 'num_classes': num_classes, 'global_pool': cfg.global_pool,
                                'drop_path_rate': cfg.drop_path})


def components(arch):
    """{keyword: value} of the components a ViT's keywords add to a plain ViT (PLAIN's that differ)."""
    return {k: arch.get(k, PLAIN[k]) for k in PLAIN if arch.get(k, PLAIN[k]) != PLAIN[k]}


def with_components(cfg, t):
    """Whether the student gets teacher t's components: --student-arch teacher, or auto where t has any. A plain
    student of a teacher with them ends below training from scratch in the follow-up (FOLLOW_UP: DINOv2, CLIP and
    BEiTv2 teachers); given them at random initialisation it transfers again. A plain teacher: a plain student."""
    if cfg.student_arch == 'auto':
        return bool(components(t))
    return cfg.student_arch == 'teacher'


def describe_components(arch):
    """'layer scale from 1e-05, 4 register tokens, ...': the components of arch in words ('none')."""
    words = {'init_values': lambda v: f'layer scale from {v:g}',
             'norm_pre': lambda v: 'a LayerNorm before the blocks',
             'act': lambda v: v,
             'reg_tokens': lambda v: f'{v} register tokens',
             'norm_eps': lambda v: f'LayerNorm eps {v:g}'}
    return ', '.join(words[k](v) for k, v in components(arch).items()) or 'none'


def describe_arch(cfg, t):
    """The student's architecture in one line for the log: which of teacher t's components it has, and why."""
    flag = f'--student-arch {cfg.student_arch}'
    extra = describe_components(t)
    if not components(t):
        return f'student: a plain ViT, as its teacher ({flag}: the teacher has nothing beyond a plain ViT)'
    if not with_components(cfg, t):
        return f"student: a plain ViT ({flag}), without its teacher's components ({extra})"
    why = ''
    if cfg.student_arch == 'auto':
        why = (', since a plain student transfers poorly from a teacher with them '
               f'({FOLLOW_UP}); --student-arch plain for a plain ViT')
    return f"student: with its teacher's components ({extra}), randomly initialised ({flag}{why})"


def student_arch(cfg, t, layers, heads):
    """The student's VisionTransformer keywords (its task's head aside) for teacher keywords t, refused in one line if
    it cannot take the transfer of `layers` ({student: teacher}) and heads: with the teacher's components or none
    (--student-arch: with_components), and for a copy student (cfg.NO_QK) no q / k projections where it is given
    whole maps."""
    s = student_shape(cfg, t)
    if with_components(cfg, t):
        s.update({k: t[k] for k in PLAIN})
    else:
        s.update(PLAIN)
    s['img_size'] = cfg.img_size
    s['no_qk_layers'] = ()
    if cfg.NO_QK and cfg.transfer == 'attn' and heads is None:   # given whole maps there
        s['no_qk_layers'] = list(layers)
    if s['reg_tokens'] != t['reg_tokens']:   # the maps would not cover the same tokens
        raise ConfigError(f"the teacher has {t['reg_tokens']} register tokens: its maps fit only a "
                          f"student with them, --student-arch auto or teacher")
    why = misfit(cfg, s, t, layers)
    if why:
        shape = "depth {depth}, {num_heads} heads, patch {patch_size}, dim {embed_dim}".format
        raise ConfigError(f'student ({shape(**s)}) does not fit the teacher ({shape(**t)}): {why}')
    refuse(cfg, [decay_floor(cfg, s['depth'])])
    return s


def misfit(cfg, s, t, layers):
    """Why a student of keywords s cannot take teacher t's transfer (None if it can). Maps are N x N: only the tokens
    must match (depth: the layer map; heads: to_student_heads); q / k / v are the teacher's: its width and heads."""
    if s['patch_size'] != t['patch_size']:
        return (f"the maps cover the teacher's tokens: --patch-size must be its {t['patch_size']} "
                f"(or 0)")
    same_width = (s['embed_dim'], s['num_heads']) == (t['embed_dim'], t['num_heads'])
    if cfg.transfer != 'attn' and not same_width:
        return (f"--transfer {cfg.transfer} hands over the teacher's own {cfg.transfer}: dim and "
                f"heads must be its (--model, --embed-dim, --num-heads), or --transfer attn")
    if t['num_heads'] % s['num_heads']:
        fits = ', '.join(str(h) for h in range(1, t['num_heads'] + 1) if t['num_heads'] % h == 0)
        return (f"each student head takes a group of the teacher's {t['num_heads']} heads, so its "
                f"head count must divide {t['num_heads']} (--model, --num-heads: {fits})")
    if s['num_heads'] != t['num_heads'] and cfg.heads != 'all':
        return (f"--heads {cfg.heads} picks heads only when the student has the teacher's head "
                f"count: --heads all")
    if max(layers) >= s['depth']:   # its deepest layer
        return f"it has no layer {max(layers)} (--depth, --layer-map)"
    return None

# -----------------------------------------------------------------------------
# The flags

INDEX_RULE = (lambda spec: readable(lambda s: s == 'all' or parse_index(s, 10 ** 6, ''), spec),
              INDEX_SYNTAX)


@dataclass
class TransferConfig(TrainConfig):
    teacher: str = option('', 'a checkpoint file or a name (mae_vit_large, torchvision_vit_b_16, '
                              '...)')
    model: str = option('teacher', "the student's size: 'teacher' = the teacher's shape, or "
                                   "vit_tiny, ...",
                        choices=('teacher', *SIZES))
    patch_size: int = option(0, "0 = the teacher's", at_least(0, "the teacher's", SIZE))
    layers: str = option('all', "the teacher's transferred layers: all | 0-17 | 0,2,5 | 0-3,8",
                         INDEX_RULE)
    layer_map: str = option('auto', 'student:teacher layers, 0:0,1:4,2:8 | auto: --layers spread '
                                    'evenly (map_layers)',
                            (lambda v: readable(parse_pairs, v), PAIRS_SYNTAX))
    heads: str = option('all', 'transferred heads, same syntax', INDEX_RULE)
    transfer: str = option('attn', 'attn (the map) | q | k | v', choices=NAMES)
    average_maps: str = option('none', "the teacher's maps averaged over a batch's images or an "
                                       "image's queries: none | batch | queries",
                               choices=('none', 'batch', 'queries'))
    student_arch: str = option('auto', "auto: the teacher's components (layer scale, registers, pre-norm, "
                                       "activation; random init) where it has any, as DINOv2 and CLIP do, else a "
                                       "plain ViT | plain: a plain ViT whatever the teacher | teacher: the "
                                       "teacher's components",
                               choices=('auto', 'plain', 'teacher'))
    teacher_num_heads: int = option(0, "the teacher's head count, for a file of weights alone (no "
                                       "record, no family)",
                                    at_least(0, "the file's record or family", DEPTH))
    new_teacher: bool = option(False, "--resume with a teacher file other than the saved run's "
                                      "(sha256), on purpose")

    # the teacher's path may change on resume: its file is compared by sha256 instead (resume_conflicts)
    RESUMABLE = (*TrainConfig.RESUMABLE, 'teacher', 'new_teacher')
    # a copy student's transferred layers have no query / key projections (attention_copy.py)
    NO_QK = False
    INPUTS = ('teacher',)

    def checks(self):
        if self.data in SHIPPED:
            which = f'--teacher {os.path.relpath(SHIPPED[self.data])} (the MAE teacher this ' \
                    f'repository ships: teachers/README.md), a checkpoint of mae_pretrain.py or ' \
                    f'finetune.py, or a name such as mae_vit_large'
        else:
            which = 'a name such as mae_vit_large (downloaded), or a checkpoint of ' \
                    'mae_pretrain.py or finetune.py (e.g. runs/mae/checkpoint.pt)'
        averaged = self.average_maps != 'none'
        return super().checks() + [
            ('teacher', self.teacher != '', f'is required: {which}'),
            ('average_maps', not averaged or self.transfer == 'attn', 'only with --transfer attn')]

    @property
    def written_out(self):
        """Why the run's maps must be written out (an eager run), or '' (written_out)."""
        return written_out(self.average_maps)

    def resume_conflicts(self, ckpt, world, free=(), method=None):
        """util/config.py's conflicts, and a teacher other than the saved run's (unless
        --new-teacher true): the SHA-256 of the bytes the teacher was loaded from (method: the
        Transfer resolve settled), compared with the recorded one."""
        # --student-arch may change where it builds the saved student (auto and plain, for a plain teacher)
        if components(ckpt['arch']) == components(method.student):
            free = (*free, 'student_arch')
        conflicts = super().resume_conflicts(ckpt, world, free)
        if self.new_teacher:
            return conflicts
        record = ckpt.get('teacher') or ckpt.get('distilled_from')   # a copy's, a distillation's
        other = teacher_mismatch(self.teacher, method.sha256, record)
        if other:
            conflicts.append(f'{other} (--new-teacher true if meant)')
        return conflicts

    def resolve(self):
        """A transfer run's resolve step: the teacher's file inspected once, the transferred layers and heads, the
        student's shape (student_arch), each refused in one line if it cannot be. Returns a Transfer."""
        ckpt, digest = read_hashed(self.teacher)   # read once: loaded and hashed from the same bytes
        teacher, description = inspect_teacher(self, ckpt)
        t = teacher.arch
        layers = parse_index(self.layers, t['depth'], 'layers')
        heads = parse_index(self.heads, t['num_heads'], 'heads')
        if len(heads) == t['num_heads']:
            heads = None   # all of them
        student_depth = student_shape(self, t)['depth']
        layers = map_layers(self.layer_map, layers, t['depth'], student_depth, self.layers)
        student = student_arch(self, t, layers, heads)
        with torch.device('meta'):   # refused where this machine cannot train it; built again by the run
            check_trainable(build_student(student, self), self.batch_size, 'a student')
        return Transfer(t, description, layers, heads, student, teacher, digest)


def inspect_teacher(cfg, ckpt=None):
    """(the teacher, its line for the log) of its checkpoint as read (util/checkpoints.read_hashed,
    once; read here if None). The teacher is a plain ViT at cfg.img_size holding the file's weights
    on the CPU (util/checkpoints.check_weights), refused if it is no ViT that could teach (heads
    unknown, weights that do not load into its shape or are not finite)."""
    if ckpt is None:
        ckpt = read_checkpoint(cfg.teacher)
    stated = (cfg.teacher_num_heads, '--teacher-num-heads')
    native = arch_of(ckpt, cfg.teacher, *stated)
    # frozen, a plain ViT; built on no memory, its record refused if it cannot be
    plain = {**native, 'num_classes': 0, 'drop_path_rate': 0.0, 'no_qk_layers': (),
             'img_size': cfg.img_size}
    # at another size than its own: --img-size named where that size is the fault
    teacher = vit_of(plain, cfg.teacher, native['img_size'])
    teacher = check_weights(teacher, cfg.teacher, ckpt, *stated)
    return teacher, describe_teacher(cfg.teacher, ckpt, native, cfg.img_size)


class Transfer(NamedTuple):
    """What TransferConfig.resolve settles: the teacher's keywords at the run's image size, its line for the log, the
    layers {student: teacher}, the transferred heads (None: all), the student's keywords, the teacher itself, its file
    read once and its weights loaded on the CPU (build_teacher places it), the SHA-256 of the bytes they were loaded
    from (None for a name): what the run records and a resume compares. The run builds the student from its keywords
    (build_student)."""
    teacher: dict
    description: str
    layers: dict
    heads: list
    student: dict
    loaded: torch.nn.Module = None
    sha256: str = None

# -----------------------------------------------------------------------------
# The pair built: what both transfer scripts do once the data is loaded


def build_pair(plan, num_classes, eval_loader, check_fused):
    """(attention implementation, teacher, student, record): the teacher and its mapping stated in the log; the frozen
    teacher (the file resolve read, on the run's device); the student of the shape resolve settled, random and seeded
    (every rank starts from the same weights); the pair settled on an attention implementation by the method's start-up
    check, check_fused(plan, teacher, student, x) -> (implementation, record); and the teacher checked (check_teacher).
    Both checks run on x, a batch of evaluation images as the run makes them, at its batch size (a kernel's grid grows
    with it)."""
    transfer = plan.method
    plan.log(transfer.description)
    plan.log(describe_map(transfer))
    plan.log(describe_arch(plan.cfg, transfer.teacher))
    teacher = build_teacher(transfer.loaded, plan.device, plan.dtype)   # frozen
    torch.manual_seed(plan.cfg.seed)
    student = build_student(transfer.student, plan.cfg, num_classes).to(plan.device)
    x = next(iter(eval_loader))[0][:plan.cfg.batch_size].to(plan.device)   # as many as a step's
    # sdpa, both ways, before anything runs on it
    attn, record = check_fused(plan, teacher, student, x)
    check_teacher(plan, attn, teacher, x[:8])
    return attn, teacher, student, record


# -----------------------------------------------------------------------------
# A built teacher that cannot teach


def check_teacher(plan, attn, teacher, x):
    """Refuse, before training, a teacher whose maps (or q / k / v) are not finite on images x (B, 3, H, W), the first
    evaluation images, under the run's autocast and attention implementation (attn): every step would hand them over,
    and the run would diverge."""
    cfg = plan.cfg
    layers = plan.method.layers
    with torch.no_grad(), autocast(plan):
        out = teacher_outputs(teacher, x, layers, NAMES[cfg.transfer])
        # the maps as the run makes them: finite q, k may give logits past fp16's range
        if cfg.transfer == 'attn':
            out = {s: {'map @ k': attend(t['q'], t['k'], t['k'], attn)}
                   for s, t in out.items()}
    bad = [layers[s] for s, t in out.items() if not all(v.isfinite().all() for v in t.values())]
    if bad:
        what = 'attention maps' if cfg.transfer == 'attn' else cfg.transfer
        hint = f' under {plan.dtype} autocast: try --amp off' if plan.dtype is not None else ''
        raise ConfigError(f'--teacher {cfg.teacher} hands over {what} that are not finite (its '
                          f'layer {bad[0]}) on the first evaluation images{hint}; it cannot be a '
                          f'teacher')
