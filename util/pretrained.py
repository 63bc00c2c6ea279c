"""
Pre-trained ViTs of other families, by name, converted to vit.py's names.

Each family's official file (torchvision's ViTs too) is read as published and renamed here; util/checkpoints.py
then loads it with its exact missing / unexpected key check. The families and what their architecture adds:

    name                     family               file format                 components (vit.py)
    deit_{small,base}        supervised (DeiT)    {'model': timm names}       none
    dino_vit{s,b}16          self-sup. (DINO)     timm names                  none
    mocov3_vitb16            self-sup. (MoCo v3)  {'state_dict': module.base_encoder.*}   none (module.: DDP's)
    dinov2_vit{s,b,l}14      self-sup. (DINOv2)   timm names + ls1/ls2.gamma  layer scale, patch 14
    dinov2_vit{s,b,l}14_reg  (with registers)     + register_tokens           + 4 registers
    clip_vitb16              language (CLIP)      TorchScript, visual.*       ln_pre, quick_gelu, eps 1e-5

CLIP's TorchScript archive is read by its records, without running any of its code (read_archive, at the end).

A student built with `--student-arch teacher` gets these components (randomly initialised). No tensor shape says
how many attention heads a ViT has: a family's files are read with its models' head counts (FAMILIES), a file of no
known family only with the count its record holds or its user states (util/checkpoints.heads_of).

Off its native image size (DINOv2: 518 px, the others 224 px) a family's official code interpolates its
position embeddings its own way; FAMILIES records how, and resize_pos_embed (at the end) does the same once.
"""
import ast
import functools
import math
import pickle
import zipfile
from collections import OrderedDict, namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange


# How a family's official code resizes its (1, 1 + g*g, D) position embeddings to another grid of patches: the class
# token kept, the g x g grid bicubic (align_corners False), either to the new size or, with an offset, by the scale
# factor (new + offset) / g (DINO's guard against rounding, facebookresearch/dino#8, which the output size rounds down
# back to new), with or without antialiasing; `like`: whose code it is
PosEmbedResize = namedtuple('PosEmbedResize', 'offset antialias like')


# DeiT's main.py, MAE's util/pos_embed.py
AS_DEIT = PosEmbedResize(0.0, False, "DeiT's and MAE's fine-tuning")

# A family: its name, how its official code resizes position embeddings off its native size, and its models' heads
# (from each family's model code). DINO and DINOv2 interpolate on every forward pass from the input's grid
# (interpolate_pos_encoding); done once to the grid of the image size asked for, the same call gives the same numbers.
# Heads: a number is the width of every head (OpenAI CLIP's build_model: vision_heads = vision_width // 64; DeiT's,
# DINO's and DINOv2's ViT-Ti/S/B/L/g: heads of 64), a dict the heads of each width it has (MoCo v3's vits.py: ViT-S
# and ViT-B both 12 heads; MAE's and torchvision's are the ViT paper's ViT-B/L/H, its ViT-H 16 heads of 80)
Family = namedtuple('Family', 'name resize heads')
VIT_PAPER_HEADS = {768: 12, 1024: 16, 1280: 16}
FAMILIES = {
    'mae': Family('MAE', AS_DEIT, VIT_PAPER_HEADS),
    'deit': Family('DeiT', AS_DEIT, 64),
    'dino': Family('DINO', PosEmbedResize(0.1, False, 'DINO'), 64),   # dino vision_transformer.py
    # dinov2 hub/backbones.py: interpolate_offset 0.1, no antialias; *_reg models: offset 0, antialias
    'dinov2': Family('DINOv2', PosEmbedResize(0.1, False, 'DINOv2'), 64),
    'dinov2_reg': Family('DINOv2 with registers', PosEmbedResize(0.0, True, 'DINOv2 with registers'), 64),
    # MoCo v3's and OpenAI CLIP's code load these weights at 224 only, torchvision's model at their size
    'mocov3': Family('MoCo v3', AS_DEIT, {384: 12, 768: 12}),
    'clip': Family('CLIP', AS_DEIT, 64),
    'torchvision': Family('torchvision', AS_DEIT, VIT_PAPER_HEADS),
}

FAIR = 'https://dl.fbaipublicfiles.com'
DINOV2_URL = FAIR + '/dinov2/dinov2_vit{0}14/dinov2_vit{0}14{1}_pretrain.pth'
TEACHERS = {   # name -> (url, family); their heads: the family's at the file's width
    'deit_small': (f'{FAIR}/deit/deit_small_patch16_224-cd65a155.pth', 'deit'),
    'deit_base': (f'{FAIR}/deit/deit_base_patch16_224-b5f2ef4d.pth', 'deit'),
    'dino_vits16': (f'{FAIR}/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth', 'dino'),
    'dino_vitb16': (f'{FAIR}/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth', 'dino'),
    'mocov3_vitb16': (f'{FAIR}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar', 'mocov3'),
    **{f'dinov2_vit{s}14{tag}': (DINOV2_URL.format(s, reg), f'dinov2{tag}')
       for s in ('s', 'b', 'l') for tag, reg in (('', ''), ('_reg', '_reg4'))},
    'clip_vitb16': ('https://openaipublic.azureedge.net/clip/models/'
                    '5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt',
                    'clip'),
}


def unwrap(ckpt):
    """The state dict a checkpoint holds, or None if it holds none: its 'model' (this project, MAE, DeiT) or
    'state_dict' (MoCo v3), else a training checkpoint's 'teacher' weights (DINO's and iBOT's: the ones their
    evaluation loads), else the dict itself. Then, in turn, where keys start with a wrapper's prefix, those keys
    without it: `module.` (DistributedDataParallel), `teacher.`, else `student.` (both models in one dict: the
    teacher's kept, as above), `backbone.` (a ViT under a projection head, DINO's: the ViT's keys)."""
    if not isinstance(ckpt, dict):
        return None
    sd = ckpt.get('model', ckpt.get('state_dict', ckpt.get('teacher', ckpt)))
    # a state dict: tensors by name
    if not (isinstance(sd, dict) and sd and all(torch.is_tensor(v) for v in sd.values())):
        return None
    for prefix in ('module.', 'teacher.', 'student.', 'backbone.'):
        if any(k.startswith(prefix) for k in sd):
            sd = under(sd, prefix)
    return sd


def under(sd, prefix):
    """The entries of sd whose keys start with prefix, the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def family_of(sd):
    """The family whose official key format a state dict is in, where the keys tell (None: timm names and
    nothing more, which DeiT, DINO, MAE and this project's files all have)."""
    if 'visual.conv1.weight' in sd:
        return 'clip'
    if any(k.startswith('base_encoder.') for k in sd):
        return 'mocov3'
    if 'register_tokens' in sd:
        return 'dinov2_reg'
    if 'blocks.0.ls1.gamma' in sd:
        return 'dinov2'
    return 'torchvision' if 'conv_proj.weight' in sd else None


# The other families' names -> timm's (the same maths), each part of a key replaced in turn: torchvision's, then
# OpenAI CLIP's image tower (visual.*), then DINOv2's registers. No part is in another family's keys.
NAMES = {
    'class_token': 'cls_token',
    'encoder.pos_embedding': 'pos_embed',
    'conv_proj': 'patch_embed.proj',
    'encoder.layers.encoder_layer_': 'blocks.',
    'encoder.ln.': 'norm.',
    'heads.head.': 'head.',
    'self_attention.in_proj_': 'attn.qkv.',
    'self_attention.out_proj': 'attn.proj',
    'mlp.0': 'mlp.fc1',
    'mlp.3': 'mlp.fc2',
    'class_embedding': 'cls_token',
    'positional_embedding': 'pos_embed',
    'conv1': 'patch_embed.proj',
    'ln_pre': 'norm_pre',
    'ln_post': 'norm',
    'transformer.resblocks': 'blocks',
    'ln_1': 'norm1',
    'ln_2': 'norm2',
    'attn.in_proj_': 'attn.qkv.',
    'attn.out_proj': 'attn.proj',
    'mlp.c_fc': 'mlp.fc1',
    'mlp.c_proj': 'mlp.fc2',
    'register_tokens': 'reg_token',
}


def convert(sd):
    """A state dict of any family above (or torchvision's) -> (timm/vit.py names, extra
    VisionTransformer kwargs)."""
    family = family_of(sd)
    extra = {}
    # CLIP: the image tower (visual.*) alone: the text tower and visual.proj (into the joint embedding) are no ViT;
    # an architecture unlike a plain ViT in more than names, which nothing in its tensors says
    if family == 'clip':
        sd = under(sd, 'visual.')
        sd.pop('proj', None)
        # its class token (D,) and positions (N, D) in timm's shapes; its patch conv has no bias
        sd['class_embedding'] = sd['class_embedding'].reshape(1, 1, -1)         # (1, 1, D)
        sd['positional_embedding'] = sd['positional_embedding'][None]           # (1, N, D)
        conv = sd['conv1.weight']
        sd['conv1.bias'] = conv.new_zeros(len(conv))
        extra = dict(norm_pre=True, act='quick_gelu', norm_eps=1e-5)
    # MoCo v3: the base encoder (its projection MLP in `head` is dropped on loading, as main_lincls.py drops it
    # and as any classifier the model has none of)
    if family == 'mocov3':
        sd = under(sd, 'base_encoder.')
    for old, new in NAMES.items():
        sd = {k.replace(old, new): v for k, v in sd.items()}
    # DINOv2's layer scale, with its initial value (for a student); its registers (its mask_token is dropped with
    # MAE's)
    if 'blocks.0.ls1.gamma' in sd:
        extra['init_values'] = 1e-5
    if 'reg_token' in sd:
        extra['reg_tokens'] = sd['reg_token'].shape[1]
    return sd, extra


def resize_pos_embed(pos_embed, grid, how):
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the class token kept, the g x g patch positions interpolated
    bicubic as `how` says (a family's official code: pretrained.PosEmbedResize), in float32."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return pos_embed
    patches = rearrange(patches, '1 (h w) d -> 1 d h w', h=old).float()      # (1, D, g, g)
    to = dict(scale_factor=(grid + how.offset) / old) if how.offset else dict(size=(grid, grid))
    # (1, D, grid, grid); with an offset, the output size floor(old * scale) is grid again
    patches = F.interpolate(patches, mode='bicubic', align_corners=False, antialias=how.antialias,
                            **to)
    return torch.cat([cls, rearrange(patches, '1 d h w -> 1 (h w) d').to(cls.dtype)], dim=1)


# -----------------------------------------------------------------------------
# CLIP's official file: a TorchScript archive's tensors, read without running it
#
# The tensors of a TorchScript archive (OpenAI ships CLIP so), read without running it. torch.jit.load builds the
# archive's objects with the archive's own compiled code: a class's __setstate__ runs as it is read, and it can write
# files (torch.from_file) or never return. This reader executes nothing, as torch.load(weights_only=True) executes
# nothing of a torch.save file:
#
#     data.pkl        unpickled by an Unpickler that knows tensors and plain containers only: each storage is the
#                     archive's record data/<key>, each TorchScript object an inert Record of the state pickled for
#                     it (a dict of its attributes), never handed to its class's code
#     code/*.py       read as text (parsed by ast, never run) for two lists each module class declares,
#                     __parameters__ and __buffers__: which of its attributes ScriptModule.state_dict() returns
#
# TorchScript builds an object of a class without __setstate__ from that dict alone, so the parameters and buffers
# found so are exactly torch.jit.load(path).state_dict()'s (tests/test_torchscript.py compares them); an archive
# with a class that has its own __setstate__ is refused (its objects are what that code makes of their state).
# Every record is read through zipfile, which checks its CRC-32: a damaged archive is refused too.


class ArchiveRefused(ValueError):
    """An archive this reader will not read: args (what it holds, the fix)."""


# the fix of an archive whose code would run
AS_WEIGHTS = 'ask for its weights saved with torch.save(model.state_dict(), path)'


class Record:
    """A TorchScript object, inert: `state` is what was pickled for it; its class (declared) says whether it is a
    module and, in TorchScript's names, which of its attributes are its __parameters__ and __buffers__."""
    state = None
    __parameters__ = []
    __buffers__ = []

    def __setstate__(self, state):   # pickle's BUILD: kept, given to no code
        self.state = state


def rebuild_tensor(storage, offset, size, stride, *flags):
    """torch._utils._rebuild_tensor_v2's tensor: a view of its storage (a 1-D tensor of the storage's
    dtype)."""
    return storage.as_strided(size, stride, offset)


def same(value, *type_tag):
    """What torch.jit._pickle's helpers return for a list or a type tag: the value itself."""
    return value


# every global the unpickler may name: each one plain data or a function of this file
GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): same,
    ('collections', 'OrderedDict'): OrderedDict,
    **{('torch.jit._pickle', name): same
       for name in ('build_intlist', 'build_doublelist', 'build_boollist', 'build_tensorlist',
                    'restore_type_tag')},
    # a storage type's dtype, as torch.load gives it (its StorageType)
    **{('torch', name): torch.serialization.StorageType(name).dtype
       for name in ('FloatStorage', 'DoubleStorage', 'HalfStorage', 'BFloat16Storage',
                    'ComplexFloatStorage', 'ComplexDoubleStorage', 'ByteStorage', 'CharStorage',
                    'ShortStorage', 'IntStorage', 'LongStorage', 'BoolStorage')},
}


def declared(archive, root, qualname):
    """The Record class of a TorchScript class: whether it is a module, its __parameters__ and its __buffers__, as
    the code record of its module declares them (read as text, never run). A record that is missing, does not parse
    or lacks the class is refused in zipfile's, ast's or Python's words (util/checkpoints.read_file)."""
    module, name = qualname.rsplit('.', 1)
    code = ast.parse(archive.read(f"{root}/code/{module.replace('.', '/')}.py"))
    cls = next(n for n in code.body if isinstance(n, ast.ClassDef) and n.name == name)
    if any(isinstance(n, ast.FunctionDef) and n.name == '__setstate__' for n in cls.body):
        raise ArchiveRefused(f'it is a TorchScript archive whose class {qualname} has its own '
                             f'__setstate__, code that torch.jit.load would run to read it: '
                             f'refused unread', AS_WEIGHTS)
    # literal_eval reads constants only (a ValueError for anything else)
    lists = {t.id: ast.literal_eval(n.value) for n in cls.body if isinstance(n, ast.Assign)
             for t in n.targets
             if isinstance(t, ast.Name) and t.id in ('__parameters__', '__buffers__')}
    if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in lists.values()):
        raise ArchiveRefused(f'it is a TorchScript archive whose class {qualname} lists its parameters or buffers '
                             f'as no list of names, as TorchScript writes them', 'copy or download it again')
    is_module = any(isinstance(b, ast.Name) and b.id == 'Module' for b in cls.bases)
    return type(name, (Record,), {'is_module': is_module, **lists})


class ArchiveUnpickler(pickle.Unpickler):
    """data.pkl's objects: tensors from the archive's storages, TorchScript objects as Records, nothing
    else."""

    def __init__(self, file, archive, root):
        super().__init__(file)
        self.archive = archive
        self.root = root
        self.classes = functools.cache(functools.partial(declared, archive, root))   # read once
        self.storages = {}        # a storage's key -> its tensor, read once

    def find_class(self, module, name):
        if module.startswith('__torch__'):   # a class compiled into the archive
            return self.classes(f'{module}.{name}')   # refused if it has its own __setstate__
        if (module, name) not in GLOBALS:
            raise ArchiveRefused(f'it is a TorchScript archive that names {module}.{name}, not a '
                                 f'tensor or plain data: refused unread', AS_WEIGHTS)
        return GLOBALS[module, name]

    def persistent_load(self, pid):
        """A storage, ('storage', its dtype, key, device, number of elements): the record data/<key>,
        read once, whole (zipfile checks its CRC-32); one too short for its tensors is refused in torch's
        words where they are made (as_strided)."""
        _, dtype, key, _, _ = pid
        if key not in self.storages:
            raw = np.frombuffer(bytearray(self.archive.read(f'{self.root}/data/{key}')), np.uint8)
            self.storages[key] = torch.from_numpy(raw).view(dtype)
        return self.storages[key]


def read_archive(path):
    """A TorchScript archive's parameters and buffers by dotted name, as torch.jit.load(path).state_dict() gives
    them, read without running any of its code (path: a file's name, or its bytes in a file object). ArchiveRefused
    where it holds code that would run."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        # no data.pkl: zipfile's KeyError names the record it lacks
        root = next((n for n in names if n.endswith('/data.pkl')), '/').rpartition('/')[0]
        if f'{root}/byteorder' in names and archive.read(f'{root}/byteorder').strip() != b'little':
            raise ArchiveRefused('it is a TorchScript archive written on a big-endian machine',
                                 'save it again on a little-endian one (x86, ARM)')
        with archive.open(f'{root}/data.pkl') as f:
            top = ArchiveUnpickler(f, archive, root).load()
    state = {}
    collect(top, '', state)   # none if it is no module: no state dict, refused where it is read
    return state


def collect(module, prefix, state):
    """Add a module's parameters, then its buffers, then its submodules' (each in its attributes' order), as
    nn.Module.state_dict does; an unset one (None: a Linear without bias) is left out there too. One that is no
    tensor is refused where the state dict is read (util/checkpoints.py: it holds no state dict). A value that is
    no module adds nothing."""
    if not (isinstance(module, Record) and module.is_module and isinstance(module.state, dict)):
        return
    for names in (module.__parameters__, module.__buffers__):
        for name, value in module.state.items():
            if name in names and value is not None:
                state[prefix + name] = value
    for name, value in module.state.items():
        collect(value, f'{prefix}{name}.', state)
