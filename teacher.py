"""
The frozen teacher of attention transfer, and the student built to fit it.

Shared by attention_copy.py and attention_distill.py. The teacher lives outside the student: it is
frozen (requires_grad False), kept in eval mode (no stochastic depth: the student's drop-path masks
never reach it), run under no_grad only as deep as the last transferred layer, and never wrapped in
DDP, averaged into the EMA, or saved in the student's checkpoint (which records where it came from).
"""
import hashlib
import os
from dataclasses import dataclass

import torch

from checkpoints import build_from_checkpoint
from config import ConfigError, TrainConfig, readable
from vit import SIZES, model_arch

WHAT = ('attn', 'q', 'k', 'v')   # what the teacher hands over: its attention map, or its q, k or v
# vit.py's components that some families add to the plain ViT (pretrained.py), with their plain values
PLAIN = dict(init_values=None, norm_pre=False, act='gelu', reg_tokens=0, norm_eps=1e-6)


@dataclass
class TransferConfig(TrainConfig):
    teacher: str = ''               # a checkpoint file or a name (mae_vit_large, torchvision_vit_b_16, ...)
    model: str = 'teacher'          # the student's size: 'teacher' = the teacher's shape, or vit_tiny, ...
    patch_size: int = 0             # 0 = the teacher's
    layers: str = 'all'             # transferred layers: all | 0-17 | 0,2,5 | 0-3,8
    heads: str = 'all'              # transferred heads, same syntax
    transfer: str = 'attn'          # attn (the map) | q | k | v
    student_arch: str = 'plain'     # plain ViT | teacher: the teacher's components (layer scale, ...), random init
    new_teacher: bool = False       # --resume with a teacher file other than the saved run's (sha256), on purpose

    # the teacher's path may change on resume: its file is compared by sha256 instead (resume_conflicts)
    RESUMABLE = (*TrainConfig.RESUMABLE, 'teacher', 'new_teacher')

    def checks(self):
        return [r for r in super().checks() if r[0] not in ('model', 'patch_size')] + [
            ('model', self.model == 'teacher' or self.model in SIZES, f"choose teacher or one of {', '.join(SIZES)}"),
            ('patch_size', self.patch_size >= 0, "must be 0 (the teacher's) or more"),
            ('teacher', self.teacher != '', 'is required: a checkpoint (e.g. runs/finetune/checkpoint.pt from '
                                            'finetune.py or mae_pretrain.py) or a name such as mae_vit_large'),
            ('transfer', self.transfer in WHAT, f"choose one of {', '.join(WHAT)}"),
            ('student_arch', self.student_arch in ('plain', 'teacher'), 'choose plain or teacher'),
            *[(k, index_syntax_ok(getattr(self, k)), 'use all, 3, 0-17, 0,2,5 or 0-3,8') for k in ('layers', 'heads')]]

    def resume_conflicts(self, ckpt, world):
        """config.py's conflicts, and a teacher other than the saved run's (unless --new-teacher true)."""
        record = ckpt.get('teacher') or ckpt.get('distilled_from') or {}
        other = None if self.new_teacher else teacher_mismatch(self.teacher, record)
        return super().resume_conflicts(ckpt, world) + ([other + ' (--new-teacher true if meant)'] if other else [])


def parse_index(spec, n, what):
    """'all' | '3' | '0-17' | '0,2,5' | '0-3,8' -> sorted list of indices in [0, n)."""
    if spec == 'all':
        return list(range(n))
    try:
        out = set()
        for part in spec.split(','):
            a, dash, b = part.partition('-')
            out.update(range(int(a), int(b if dash else a) + 1))
    except ValueError:
        raise ConfigError(f"--{what} '{spec}': use all, 3, 0-17, 0,2,5 or 0-3,8") from None
    if not out or min(out) < 0 or max(out) >= n:
        raise ConfigError(f'--{what} {spec}: the teacher has {what} 0..{n - 1}')
    return sorted(out)


def index_syntax_ok(spec):
    """Whether parse_index can read spec (whatever the teacher's size)."""
    return readable(lambda s: s == 'all' or parse_index(s, 10 ** 6, ''), spec)


def load_teacher(cfg, device, dtype=None):
    """The frozen teacher, resized to cfg.img_size, and the transferred layers and heads.
    dtype: the autocast dtype it will run under (None: fp32), see cast_matmul_weights."""
    teacher = build_from_checkpoint(cfg.teacher, img_size=cfg.img_size, num_classes=0, drop_path_rate=0.0)
    teacher.requires_grad_(False).eval().to(device)
    if dtype is not None:
        cast_matmul_weights(teacher, dtype)
    layers = parse_index(cfg.layers, teacher.depth, 'layers')
    heads = parse_index(cfg.heads, teacher.num_heads, 'heads')
    return teacher, layers, (None if len(heads) == teacher.num_heads else heads)


def cast_matmul_weights(model, dtype):
    """Store a frozen model's linear and convolution weights in the autocast dtype, once.

    Autocast casts every such weight to `dtype` on every forward pass, unless it is a parameter that
    requires grad (those casts are cached). A frozen teacher would be re-cast on each step (ViT-L:
    300M numbers); stored cast, it computes exactly the same numbers under autocast. Norms, tokens and
    position embeddings stay fp32, as autocast keeps them. Run it under autocast only.
    """
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.to(dtype)
    return model


def student_presets(presets):
    """finetune.py's recipes for a student shaped like its teacher: model 'teacher', the teacher's patch, and
    none of the recipe's size fields (its width would otherwise silently replace the teacher's)."""
    return {k: {**{f: x for f, x in v.items() if f not in ('embed_dim', 'depth', 'num_heads')},
                'model': 'teacher', 'patch_size': 0} for k, v in presets.items()}


def build_student(cfg, teacher, num_classes, layers, no_qk=False):
    """A randomly initialised ViT with the teacher's depth, heads and token grid (checked).
    no_qk: the transferred layers get no query/key projections (a copy student never uses them).
    cfg.student_arch: 'plain' (a plain ViT) or 'teacher' (the teacher's components, e.g. DINOv2's layer scale)."""
    if cfg.student_arch not in ('plain', 'teacher'):
        raise ConfigError(f"--student-arch must be plain or teacher, not '{cfg.student_arch}'")
    t = teacher.arch
    arch = dict(t) if cfg.model == 'teacher' else model_arch(cfg.model)
    arch.update(PLAIN if cfg.student_arch == 'plain' else {k: t[k] for k in PLAIN})
    arch.update(img_size=cfg.img_size, patch_size=cfg.patch_size or t['patch_size'], num_classes=num_classes,
                global_pool=cfg.global_pool, drop_path_rate=cfg.drop_path, no_qk_layers=layers if no_qk else ())
    arch.update({k: v for k, v in (('embed_dim', cfg.embed_dim), ('depth', cfg.depth),
                                   ('num_heads', cfg.num_heads)) if v is not None})
    if arch['reg_tokens'] != t['reg_tokens']:   # the maps would not cover the same tokens
        raise ConfigError(f"the teacher has {t['reg_tokens']} register tokens: its maps fit only a student "
                          f"with them, --student-arch teacher")
    if arch['num_heads'] != t['num_heads'] or arch['patch_size'] != t['patch_size'] or \
            (cfg.transfer != 'attn' and arch['embed_dim'] != t['embed_dim']) or arch['depth'] <= max(layers):
        raise ConfigError(f"student (depth {arch['depth']}, {arch['num_heads']} heads, patch {arch['patch_size']}, "
                          f"dim {arch['embed_dim']}) does not fit the teacher (depth {t['depth']}, "
                          f"{t['num_heads']} heads, patch {t['patch_size']}, dim {t['embed_dim']}): "
                          f"heads and patch must match, and dim too for --transfer q/k/v")
    return type(teacher)(**arch)


def teacher_record(cfg, layers, heads):
    """What a student checkpoint stores about its teacher (never the teacher's weights)."""
    return {'source': cfg.teacher, 'sha256': sha256_of(cfg.teacher), 'img_size': cfg.img_size, 'layers': layers,
            'heads': heads, 'transfer': cfg.transfer,
            'student_arch': cfg.student_arch}


def sha256_of(path):
    """The file's SHA-256 (hex), or None for a name such as mae_vit_large."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(2 ** 20), b''):
            digest.update(block)
    return digest.hexdigest()


def teacher_mismatch(source, record):
    """Why `source` is not the teacher a student checkpoint recorded (None if it is): another file's
    contents (both SHA-256 shown), or another name. A moved file with the same contents is the same teacher."""
    if not record:
        return None
    if record.get('sha256') is None:
        return None if source == record['source'] else f"the teacher {record['source']} -> {source}"
    digest = sha256_of(source)
    if digest == record['sha256'] or (digest is None and source == record['source']):   # missing: loading says so
        return None
    return (f"the teacher {source} has sha256 {digest or '(not a file)'}, the one recorded ({record['source']}) "
            f"had {record['sha256']}")


@torch.no_grad()
def teacher_outputs(teacher, x, layers, transfer):
    """{layer: tensor}: the teacher's attention logits (B, H, N, N) for 'attn', else its q, k or v."""
    return teacher.attention(x, layers, 'logits' if transfer == 'attn' else transfer)
