"""
Load ViT weights from anywhere into vit.py's VisionTransformer.

Sources: a name from PRETRAINED (downloaded once into the torch hub cache), or a file holding
  - one of this project's checkpoints  {'model': state_dict, 'arch': VisionTransformer kwargs, ...}
  - an MAE checkpoint                  {'model': state_dict}  (pre-trained or fine-tuned)
  - a plain state dict with timm/MAE names, or torchvision's VisionTransformer names
  - the official files of DeiT, DINO, MoCo v3, DINOv2 and CLIP (converted in pretrained.py).

    model = build_from_checkpoint('mae_vit_large', num_classes=0)    # a teacher
    load_weights(model, 'runs/teacher/checkpoint.pt')                # into a model you built

After loading, the exact sets of missing and unexpected keys are checked (as MAE does): only the
classifier (head, fc_norm) may be missing, only MAE's decoder and the unused final norm may be
unexpected; anything else is an architecture mismatch and an error.
"""
import math
import os
import urllib.parse

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from einops import rearrange

from pretrained import TEACHERS, convert, download
from vit import VisionTransformer

MAE_URL = 'https://dl.fbaipublicfiles.com/mae/{}/mae_{}_vit_{}.pth'   # the MAE README's links
PRETRAINED = {   # name -> (url, num_heads)
    **{f'mae_vit_{s}': (MAE_URL.format('pretrain', 'pretrain', s), h)
       for s, h in (('base', 12), ('large', 16), ('huge', 16))},
    **{f'mae_vit_{s}_ft': (MAE_URL.format('finetune', 'finetuned', s), h)    # fine-tuned on IN-1k
       for s, h in (('base', 12), ('large', 16), ('huge', 16))},
    **{f'torchvision_{n}': (w.DEFAULT.url, h) for n, w, h in (
        ('vit_b_16', tvm.ViT_B_16_Weights, 12), ('vit_b_32', tvm.ViT_B_32_Weights, 12),
        ('vit_l_16', tvm.ViT_L_16_Weights, 16), ('vit_l_32', tvm.ViT_L_32_Weights, 16),
        ('vit_h_14', tvm.ViT_H_14_Weights, 16))},
    **TEACHERS,   # DeiT, DINO, MoCo v3, DINOv2, CLIP: pretrained.py
}


class CheckpointError(RuntimeError):
    pass


def read_checkpoint(source):
    """Return the raw checkpoint dict of a file path or a PRETRAINED name."""
    if source in PRETRAINED:   # TEACHERS included
        url = PRETRAINED[source][0]
        path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(urllib.parse.urlparse(url).path))
        try:
            if source in TEACHERS:   # other families' formats (CLIP: TorchScript)
                return download(source)
            return torch.hub.load_state_dict_from_url(url, map_location='cpu', weights_only=True, check_hash=False)
        except Exception as e:   # offline, or a damaged download in the cache
            raise CheckpointError(f"'{source}' could not be downloaded or read ({type(e).__name__}): put the file "
                                  f"{url} at {path} by hand") from None
    if not os.path.isfile(source):
        raise CheckpointError(f"no checkpoint '{source}': give a file path or one of "
                              f"{', '.join(PRETRAINED)}")
    try:
        return torch.load(source, map_location='cpu', weights_only=True)
    except Exception as e:   # not a torch file, truncated, or pickled objects we refuse to run
        raise CheckpointError(f"'{source}' is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None


def state_dict_of(ckpt):
    """The ViT state dict inside a checkpoint, converted to timm/MAE names."""
    return _converted(ckpt)[0]


def _converted(ckpt):
    """(state dict in timm/MAE names, the VisionTransformer components its family needs)."""
    sd = ckpt.get('model', ckpt.get('state_dict', ckpt)) if isinstance(ckpt, dict) else None   # MoCo: state_dict
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError('checkpoint holds no state dict (expected tensors, or a dict with key "model")')
    if 'conv_proj.weight' in sd:
        sd = from_torchvision(sd)
    sd, components = convert(sd)
    if 'patch_embed.proj.weight' not in sd:
        raise CheckpointError('checkpoint is not a ViT: no patch_embed.proj.weight / conv_proj.weight')
    # MAE pre-training keeps its decoder and mask token next to the encoder; a classifier needs neither
    return {k: v for k, v in sd.items() if not k.startswith(('decoder', 'mask_token'))}, components


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


def arch_of(ckpt, source=''):
    """VisionTransformer kwargs that fit a checkpoint: stored ones, else read off the tensors."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get('arch'), dict):   # MoCo v3 stores a name there
        return dict(ckpt['arch'])
    sd, components = _converted(ckpt)
    dim = sd['pos_embed'].shape[-1]
    patch = sd['patch_embed.proj.weight'].shape[-1]
    grid = math.isqrt(sd['pos_embed'].shape[1] - 1)
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    heads = PRETRAINED[source][1] if source in PRETRAINED else dim // 64   # ViTs use 64-dim heads
    return dict(img_size=grid * patch, patch_size=patch, in_chans=sd['patch_embed.proj.weight'].shape[1],
                num_classes=sd['head.weight'].shape[0] if 'head.weight' in sd else 0, embed_dim=dim,
                depth=depth, num_heads=heads, mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / dim,
                qkv_bias='blocks.0.attn.qkv.bias' in sd, global_pool='fc_norm.weight' in sd, **components)


FREE_ARCH = ('img_size', 'num_classes', 'global_pool', 'drop_path_rate')   # what loading adapts or ignores


def arch_mismatch(arch, saved, free=FREE_ARCH):
    """['num_heads 4 (here 3)', ...]: the fields of a recorded architecture that differ from a model's,
    outside `free`. Heads matter though no tensor shape shows them."""
    return [f'{k} {v} (here {arch.get(k)})' for k, v in saved.items() if k not in free and arch.get(k) != v]


def check_arch(model, ckpt, source):
    """Refuse a checkpoint whose recorded 'arch' (this project's checkpoints have one) is another model's."""
    saved = ckpt.get('arch') if isinstance(ckpt, dict) and isinstance(ckpt.get('arch'), dict) else None
    if saved and saved.get('no_qk_layers') and not model.arch.get('no_qk_layers'):
        raise CheckpointError(f"'{source}' is an attention-copy student: it has no attention of its own in layers "
                              f"{saved['no_qk_layers']} and runs only with its teacher "
                              f"(attention_copy.load_copy_model); it cannot be a teacher or an --init")
    diff = arch_mismatch(model.arch, saved or {})
    if diff:
        raise CheckpointError(f"architecture mismatch loading '{source}': the checkpoint has {', '.join(diff)}")


def vit_of(arch, source, given=None):
    """VisionTransformer(**arch, **given), or CheckpointError saying which cannot be built: the architecture
    a checkpoint records, or it with the fields `given` by the caller (another image size, say)."""
    try:
        return VisionTransformer(**{**arch, **(given or {})})
    except (TypeError, ValueError, AssertionError) as e:
        if given:
            vit_of(arch, source)   # the recorded one builds (else that is the error): what was given does not fit
            raise CheckpointError(f"'{source}' cannot be built with "
                                  f"{', '.join(f'{k} {v}' for k, v in given.items())} ({e})") from None
        raise CheckpointError(f"'{source}' records an architecture that cannot be built ({e}): {arch}") from None


def load_weights(model, source, ckpt=None):
    """Load `source` into `model`: resize position embeddings, drop a classifier of the wrong size,
    and raise CheckpointError on any other difference of recorded architecture, or missing/unexpected
    key or shape beyond the allowed ones."""
    ckpt = read_checkpoint(source) if ckpt is None else ckpt
    check_arch(model, ckpt, source)
    sd = dict(state_dict_of(ckpt))
    own = model.state_dict()
    if 'pos_embed' in sd and sd['pos_embed'].shape != own['pos_embed'].shape:
        sd['pos_embed'] = resize_pos_embed(sd['pos_embed'], model.patch_embed.grid)
    for k in ('head.weight', 'head.bias'):    # a new task: keep our freshly initialised classifier
        if k in sd and (k not in own or sd[k].shape != own[k].shape):
            del sd[k]
    bad = [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in sd.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"architecture mismatch loading '{source}': {'; '.join(bad[:4])}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(('head.', 'fc_norm.'))]
    # a global-pool model has no `norm`; a class-token model only lacks `fc_norm`
    unexpected = [k for k in unexpected if not (k.startswith('norm.') and model.global_pool)
                  and not k.startswith('fc_norm.')]
    if missing or unexpected:
        raise CheckpointError(f"architecture mismatch loading '{source}': missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    return model


def build_from_checkpoint(source, ckpt=None, **overrides):
    """A VisionTransformer shaped like the checkpoint (overrides applied), with its weights.
    ckpt: the checkpoint already read from source."""
    ckpt = read_checkpoint(source) if ckpt is None else ckpt
    # always a plain ViT: a copy student (no q/k in some layers) cannot run without its teacher
    arch = {**arch_of(ckpt, source), 'no_qk_layers': ()}
    return load_weights(vit_of(arch, source, {k: v for k, v in overrides.items() if v is not None}), source, ckpt)


def resize_pos_embed(pos_embed, grid):
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): bicubic interpolation of the patch positions."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(math.isqrt(patches.shape[1]))
    if old == grid:
        return pos_embed
    patches = rearrange(patches, '1 (h w) d -> 1 d h w', h=old)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode='bicubic', align_corners=False)
    return torch.cat([cls, rearrange(patches, '1 d h w -> 1 (h w) d').to(cls.dtype)], dim=1)
