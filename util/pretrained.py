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

A student built with `--student-arch teacher` gets these components (randomly initialised). No tensor shape says
how many attention heads a ViT has: a family's files are read with its models' head counts (HEADS), a file of no
known family only with the count its record holds or its user states (util/checkpoints.heads_of).

Off its native image size (DINOv2: 518 px, the others 224 px) a family's official code interpolates its
position embeddings its own way; FAMILIES records how, and resize_pos_embed (at the end) does the same once.
"""
import math
from collections import namedtuple

import torch
import torch.nn.functional as F
from einops import rearrange


# How a family's official code resizes its (1, 1 + g*g, D) position embeddings to another grid of patches: the class
# token kept, the g x g grid bicubic (align_corners False), either to the new size or, with an offset, by the scale
# factor (new + offset) / g (DINO's guard against rounding, facebookresearch/dino#8, which the output size rounds down
# back to new), with or without antialiasing; `like`: whose code it is
PosEmbedResize = namedtuple('PosEmbedResize', 'offset antialias like', defaults=(0.0, False,
                                                                                 "DeiT's and MAE's fine-tuning"))


def resize_words(how):
    """A PosEmbedResize in words, for the log."""
    step = f'by the scale factor (new + {how.offset:g}) / old' if how.offset else 'to the new size'
    return f"bicubic {step}{', antialiased' if how.antialias else ''}, as {how.like} does"


AS_DEIT = PosEmbedResize()   # DeiT main.py and MAE util/pos_embed.py: F.interpolate(size=new, bicubic)
# family -> (its name, how its official code resizes position embeddings off its native size). DINO and
# DINOv2 interpolate on every forward pass from the input's grid (interpolate_pos_encoding); done once to
# the grid of the image size asked for, the same call gives the same numbers.
FAMILIES = {
    'mae': ('MAE', AS_DEIT),
    'deit': ('DeiT', AS_DEIT),
    'dino': ('DINO', PosEmbedResize(offset=0.1, like='DINO')),             # dino vision_transformer.py
    # dinov2 hub/backbones.py: interpolate_offset 0.1, no antialias; *_reg models: offset 0, antialias
    'dinov2': ('DINOv2', PosEmbedResize(offset=0.1, like='DINOv2')),
    'dinov2_reg': ('DINOv2 with registers', PosEmbedResize(antialias=True, like='DINOv2 with registers')),
    # MoCo v3's and OpenAI CLIP's code load these weights at 224 only, torchvision's model at their size
    'mocov3': ('MoCo v3', AS_DEIT),
    'clip': ('CLIP', AS_DEIT),
    'torchvision': ('torchvision', AS_DEIT),
}

DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{0}14/dinov2_vit{0}14{1}_pretrain.pth'
TEACHERS = {   # name -> (url, num_heads, family); heads are 64-dimensional in all of these
    'deit_small': ('https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth', 6, 'deit'),
    'deit_base': ('https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth', 12, 'deit'),
    'dino_vits16': ('https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth',
                    6, 'dino'),
    'dino_vitb16': ('https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth',
                    12, 'dino'),
    'mocov3_vitb16': ('https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar', 12, 'mocov3'),
    **{f'dinov2_vit{s}14{tag}': (DINOV2_URL.format(s, reg), h, 'dinov2' + tag)
       for s, h in (('s', 6), ('b', 12), ('l', 16)) for tag, reg in (('', ''), ('_reg', '_reg4'))},
    'clip_vitb16': ('https://openaipublic.azureedge.net/clip/models/'
                    '5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt', 12, 'clip'),
}
# CLIP's architecture differs from a plain ViT in more than names; nothing in its tensors says so
CLIP_COMPONENTS = dict(norm_pre=True, act='quick_gelu', norm_eps=1e-5)


# family -> its models' heads, from each family's model code: a number is the width of every head (OpenAI CLIP's
# build_model: vision_heads = vision_width // 64; DeiT's, DINO's and DINOv2's ViT-Ti/S/B/L/g: heads of 64), a dict
# the heads of each width it has (MoCo v3's vits.py: ViT-S and ViT-B both 12 heads; MAE's and torchvision's ViT-H:
# 16 heads of 80)
HEADS = {'clip': 64, 'deit': 64, 'dino': 64, 'dinov2': 64, 'dinov2_reg': 64, 'mocov3': {384: 12, 768: 12},
         'mae': {768: 12, 1024: 16, 1280: 16}, 'torchvision': {768: 12, 1024: 16, 1280: 16}}


def unwrap(ckpt):
    """(the state dict a checkpoint holds, how it was found there, '' when plainly), or (None, '') if it holds none:
    its 'model' (this project, MAE, DeiT) or 'state_dict' (MoCo v3), else a training checkpoint's 'teacher' weights
    (DINO's and iBOT's: the ones their evaluation loads), else the dict itself; then the wrappers' key prefixes
    removed: `module.` (DistributedDataParallel), `teacher.` beside `student.` (both models in one dict: the
    teacher's kept, as above), `backbone.` (a ViT under a projection head, DINO's: the ViT's keys kept)."""
    how = []
    sd = ckpt.get('model', ckpt.get('state_dict', ckpt)) if isinstance(ckpt, dict) else None
    if sd is ckpt and isinstance(ckpt, dict) and is_state_dict(ckpt.get('teacher')):
        sd, how = ckpt['teacher'], ["its 'teacher' weights"]
    if not is_state_dict(sd):
        return None, ''
    if all(k.startswith('module.') for k in sd):
        sd = under(sd, 'module.')
    if all(k.startswith(('teacher.', 'student.')) for k in sd):
        which = 'teacher.' if any(k.startswith('teacher.') for k in sd) else 'student.'
        sd, how = under(sd, which), how + [f"the keys under '{which}'"]
    if any(k.startswith('backbone.') for k in sd):
        sd, how = under(sd, 'backbone.'), how + ["the keys under 'backbone.'"]
    return sd, ', '.join(how)


def under(sd, prefix):
    """The entries of sd whose keys start with prefix, the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def is_state_dict(sd):
    return isinstance(sd, dict) and len(sd) > 0 and all(torch.is_tensor(v) for v in sd.values())


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


def convert(sd):
    """A state dict of any family above (or torchvision's) -> (timm/vit.py names, extra VisionTransformer kwargs)."""
    family = family_of(sd)
    if family == 'torchvision':
        return from_torchvision(sd), {}
    if family == 'clip':
        return from_clip(sd), dict(CLIP_COMPONENTS)
    if family == 'mocov3':
        sd = from_moco_v3(sd)
    if 'register_tokens' in sd:   # DINOv2 with registers (its mask_token is dropped with MAE's)
        sd = {('reg_token' if k == 'register_tokens' else k): v for k, v in sd.items()}
    extra = {}
    if 'blocks.0.ls1.gamma' in sd:
        extra['init_values'] = 1e-5      # DINOv2's initial layer scale (for a student built like it)
    if 'reg_token' in sd:
        extra['reg_tokens'] = sd['reg_token'].shape[1]
    return sd, extra


def from_moco_v3(sd):
    """MoCo v3's training checkpoint -> its base encoder, without the projection MLP in `head`
    (as MoCo v3's main_lincls.py keeps it); the momentum encoder and predictor are dropped."""
    prefix = 'base_encoder.'
    return {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not k.startswith(prefix + 'head.')}


def from_clip(sd):
    """OpenAI CLIP's image tower (visual.*) -> timm names. The text tower and the image projection
    into the joint embedding (visual.proj) are not part of the ViT and are dropped."""
    p = 'visual.'
    conv = sd[p + 'conv1.weight']
    out = {'cls_token': sd[p + 'class_embedding'].reshape(1, 1, -1),
           'pos_embed': sd[p + 'positional_embedding'].unsqueeze(0),
           'patch_embed.proj.weight': conv,
           'patch_embed.proj.bias': conv.new_zeros(conv.shape[0]),   # CLIP's patch conv has no bias
           'norm_pre.weight': sd[p + 'ln_pre.weight'], 'norm_pre.bias': sd[p + 'ln_pre.bias'],
           'norm.weight': sd[p + 'ln_post.weight'], 'norm.bias': sd[p + 'ln_post.bias']}
    rename = {'ln_1': 'norm1', 'ln_2': 'norm2', 'attn.in_proj_weight': 'attn.qkv.weight',
              'attn.in_proj_bias': 'attn.qkv.bias', 'attn.out_proj': 'attn.proj',
              'mlp.c_fc': 'mlp.fc1', 'mlp.c_proj': 'mlp.fc2'}
    blocks = p + 'transformer.resblocks.'
    for k, v in sd.items():
        if k.startswith(blocks):
            i, rest = k[len(blocks):].split('.', 1)
            for old, new in rename.items():
                rest = new + rest[len(old):] if rest.startswith(old) else rest
            out[f'blocks.{i}.{rest}'] = v
    return out


def from_torchvision(sd):
    """torchvision.models.VisionTransformer names -> timm/MAE names (same maths, eps 1e-6 LayerNorm)."""
    out = {'cls_token': sd['class_token'], 'pos_embed': sd['encoder.pos_embedding'],
           'patch_embed.proj.weight': sd['conv_proj.weight'], 'patch_embed.proj.bias': sd['conv_proj.bias'],
           'norm.weight': sd['encoder.ln.weight'], 'norm.bias': sd['encoder.ln.bias']}
    if 'heads.head.weight' in sd:
        out['head.weight'], out['head.bias'] = sd['heads.head.weight'], sd['heads.head.bias']
    rename = {'ln_1': 'norm1', 'ln_2': 'norm2', 'self_attention.in_proj_weight': 'attn.qkv.weight',
              'self_attention.in_proj_bias': 'attn.qkv.bias', 'self_attention.out_proj': 'attn.proj',
              'mlp.0': 'mlp.fc1', 'mlp.3': 'mlp.fc2'}
    for k, v in sd.items():
        if k.startswith('encoder.layers.encoder_layer_'):
            i, rest = k[len('encoder.layers.encoder_layer_'):].split('.', 1)
            for old, new in rename.items():
                rest = rest.replace(old, new) if rest.startswith(old) else rest
            out[f'blocks.{i}.{rest}'] = v
    return out


def resize_pos_embed(pos_embed, grid, how=AS_DEIT):
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the class token kept, the g x g patch positions interpolated
    bicubic as `how` says (a family's official code: pretrained.PosEmbedResize), in float32."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old == grid:
        return pos_embed
    patches = rearrange(patches, '1 (h w) d -> 1 d h w', h=old).float()                  # (1, D, g, g)
    to = dict(scale_factor=(grid + how.offset) / old) if how.offset else dict(size=(grid, grid))
    patches = F.interpolate(patches, mode='bicubic', align_corners=False, antialias=how.antialias, **to)
    assert patches.shape[-2:] == (grid, grid), patches.shape                              # (1, D, grid, grid)
    return torch.cat([cls, rearrange(patches, '1 d h w -> 1 (h w) d').to(cls.dtype)], dim=1)
