"""Named teachers of other families: each official key format, written here with random values,
loads into vit.py's model (exact key check) and computes what timm computes from the same file."""
import os
import urllib.error
from functools import partial

import pytest
from timm.models.vision_transformer import checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer as TimmViT
import torch
import torch.nn as nn

import attention_distill
from conftest import TINY, run_in_process
from util.checkpoints import PRETRAINED, CheckpointError, build_from_checkpoint
from util.pretrained import TEACHERS
from vit import VisionTransformer

D, DEPTH, HEADS = 128, 2, 2          # 64-dimensional heads, as in every named teacher


def randomise(sd):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in sd.items()}


def official_dinov2(grid, patch, reg):
    """DINOv2's hub checkpoint layout (dinov2/models/vision_transformer.py, block_chunks=0)."""
    shapes = {'cls_token': (1, 1, D), 'pos_embed': (1, 1 + grid * grid, D), 'mask_token': (1, D),
              'patch_embed.proj.weight': (D, 3, patch, patch), 'patch_embed.proj.bias': (D,),
              'norm.weight': (D,), 'norm.bias': (D,)}
    if reg:
        shapes['register_tokens'] = (1, reg, D)
    for i in range(DEPTH):
        b = f'blocks.{i}.'
        shapes.update({b + 'norm1.weight': (D,), b + 'norm1.bias': (D,), b + 'attn.qkv.weight': (3 * D, D),
                       b + 'attn.qkv.bias': (3 * D,), b + 'attn.proj.weight': (D, D), b + 'attn.proj.bias': (D,),
                       b + 'ls1.gamma': (D,), b + 'norm2.weight': (D,), b + 'norm2.bias': (D,),
                       b + 'mlp.fc1.weight': (4 * D, D), b + 'mlp.fc1.bias': (4 * D,),
                       b + 'mlp.fc2.weight': (D, 4 * D), b + 'mlp.fc2.bias': (D,), b + 'ls2.gamma': (D,)})
    return randomise({k: torch.empty(s) for k, s in shapes.items()})


def official_clip(grid, patch, embed=24):
    """OpenAI CLIP's state dict (clip/model.py): the image tower under visual.*, and a text tower."""
    v = 'visual.'
    shapes = {v + 'class_embedding': (D,), v + 'positional_embedding': (1 + grid * grid, D),
              v + 'proj': (D, embed), v + 'conv1.weight': (D, 3, patch, patch),
              v + 'ln_pre.weight': (D,), v + 'ln_pre.bias': (D,), v + 'ln_post.weight': (D,), v + 'ln_post.bias': (D,),
              'positional_embedding': (77, 32), 'text_projection': (32, embed), 'logit_scale': (),
              'token_embedding.weight': (100, 32), 'ln_final.weight': (32,), 'ln_final.bias': (32,),
              'transformer.resblocks.0.attn.in_proj_weight': (96, 32)}
    for i in range(DEPTH):
        b = f'{v}transformer.resblocks.{i}.'
        shapes.update({b + 'attn.in_proj_weight': (3 * D, D), b + 'attn.in_proj_bias': (3 * D,),
                       b + 'attn.out_proj.weight': (D, D), b + 'attn.out_proj.bias': (D,),
                       b + 'ln_1.weight': (D,), b + 'ln_1.bias': (D,), b + 'ln_2.weight': (D,), b + 'ln_2.bias': (D,),
                       b + 'mlp.c_fc.weight': (4 * D, D), b + 'mlp.c_fc.bias': (4 * D,),
                       b + 'mlp.c_proj.weight': (D, 4 * D), b + 'mlp.c_proj.bias': (D,)})
    return randomise({k: torch.empty(s) for k, s in shapes.items()})


def timm_features(model, x):
    """timm's normalised class token (before any classifier)."""
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def ours(path, x, **overrides):
    """Our model of a file, its heads stated as its user states them (timm's names alone do not say them)."""
    model = build_from_checkpoint(str(path), num_heads=HEADS, **overrides).eval()
    with torch.no_grad():
        return model, model(x)


def plain_timm(num_classes, img=32, patch=8):
    torch.manual_seed(0)
    m = TimmViT(img_size=img, patch_size=patch, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=num_classes,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    m.load_state_dict(randomise(m.state_dict()))
    return m.eval()


def test_named_teachers_listed():
    for name in ('deit_small', 'deit_base', 'dino_vits16', 'dino_vitb16', 'mocov3_vitb16', 'clip_vitb16',
                 *(f'dinov2_vit{s}14{r}' for s in 'sbl' for r in ('', '_reg'))):
        assert name in PRETRAINED and TEACHERS[name][0].startswith('https://')
    assert TEACHERS['dinov2_vitl14_reg'][0].endswith('dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth')


def test_torchvision_names_are_its_default_weights():
    """The URLs written out for torchvision's ViTs are the ones torchvision itself names as each model's DEFAULT."""
    import torchvision.models as tvm
    named = {n[len('torchvision_'):]: url for n, (url, family) in PRETRAINED.items() if family == 'torchvision'}
    assert set(named) == {'vit_b_16', 'vit_b_32', 'vit_l_16', 'vit_l_32', 'vit_h_14'}
    for n, url in named.items():
        assert url == tvm.get_model_weights(n).DEFAULT.url, n


def test_deit_checkpoint_gives_timm_logits(tmp_path):
    """DeiT's files are {'model': timm's VisionTransformer state dict}, classifier included."""
    t = plain_timm(num_classes=7)
    torch.save({'model': t.state_dict()}, tmp_path / 'deit.pth')
    x = torch.randn(2, 3, 32, 32)
    _, y = ours(tmp_path / 'deit.pth', x)
    assert torch.allclose(y, t(x), atol=1e-4)


def test_dino_checkpoint_gives_timm_features(tmp_path):
    """DINO's files are a bare backbone state dict with timm names and no head."""
    t = plain_timm(num_classes=0)
    torch.save(t.state_dict(), tmp_path / 'dino.pth')
    x = torch.randn(2, 3, 32, 32)
    _, y = ours(tmp_path / 'dino.pth', x)
    assert torch.allclose(y, timm_features(t, x), atol=1e-4)


def test_moco_v3_checkpoint_keeps_the_base_encoder(tmp_path):
    """MoCo v3 saves {'state_dict': module.base_encoder.* with a projection MLP as head,
    module.momentum_encoder.*, module.predictor.*}; main_lincls keeps the encoder without head."""
    t = plain_timm(num_classes=0)
    enc = t.state_dict()
    mlp = {'head.0.weight': torch.randn(64, D), 'head.1.weight': torch.randn(64), 'head.1.bias': torch.randn(64),
           'head.1.running_mean': torch.randn(64), 'head.1.running_var': torch.rand(64),
           'head.1.num_batches_tracked': torch.tensor(3), 'head.3.weight': torch.randn(16, 64)}
    sd = {**{f'module.base_encoder.{k}': v for k, v in {**enc, **mlp}.items()},
          **{f'module.momentum_encoder.{k}': v + 1 for k, v in {**enc, **mlp}.items()},
          'module.predictor.0.weight': torch.randn(64, 16)}
    torch.save({'epoch': 300, 'arch': 'vit_base', 'state_dict': sd, 'optimizer': {}}, tmp_path / 'moco.pth.tar')
    x = torch.randn(2, 3, 32, 32)
    _, y = ours(tmp_path / 'moco.pth.tar', x)
    assert torch.allclose(y, timm_features(t, x), atol=1e-4)


@pytest.mark.parametrize('reg', [0, 4])
def test_dinov2_checkpoint_gives_timm_features(tmp_path, reg):
    """Layer scale, patch 14, and (reg=4) registers, via timm's own DINOv2 conversion."""
    sd = official_dinov2(grid=2, patch=14, reg=reg)
    torch.save(sd, tmp_path / 'dinov2.pth')
    x = torch.randn(2, 3, 28, 28)
    model, y = ours(tmp_path / 'dinov2.pth', x)
    assert model.arch['patch_size'] == 14 and model.arch['reg_tokens'] == reg
    assert model.arch['init_values'] is not None
    t = TimmViT(img_size=28, patch_size=14, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0,
                init_values=1.0, reg_tokens=reg, no_embed_class=bool(reg), norm_layer=partial(nn.LayerNorm, eps=1e-6))
    t.load_state_dict(checkpoint_filter_fn(dict(sd), t), strict=True)
    assert torch.allclose(y, timm_features(t.eval(), x), atol=1e-4)
    # the attention maps cover the class token, the registers and the patches
    assert model.attention(x, [1])[1].shape == (2, HEADS, 1 + reg + 4, 1 + reg + 4)


def test_dinov2_missing_layer_scale_is_an_error(tmp_path):
    sd = official_dinov2(grid=2, patch=14, reg=0)
    del sd['blocks.1.ls2.gamma']
    torch.save(sd, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match='ls2.gamma'):
        build_from_checkpoint(str(tmp_path / 'broken.pth'))


def test_clip_image_tower_gives_timm_features(tmp_path):
    """CLIP: ln_pre before the blocks, QuickGELU, LayerNorm eps 1e-5, a patch conv without bias;
    timm converts the same file with its own code (_convert_openai_clip)."""
    sd = official_clip(grid=2, patch=16)
    torch.save(sd, tmp_path / 'clip.pth')
    x = torch.randn(2, 3, 32, 32)
    model, y = ours(tmp_path / 'clip.pth', x)
    assert (model.arch['norm_pre'], model.arch['act'], model.arch['norm_eps']) == (True, 'quick_gelu', 1e-5)
    t = TimmViT(img_size=32, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=24,
                pre_norm=True, act_layer='quick_gelu', norm_layer=nn.LayerNorm)
    t.load_state_dict(checkpoint_filter_fn(dict(sd), t), strict=True)
    assert torch.allclose(y, timm_features(t.eval(), x), atol=1e-4)
    # the components matter: the same weights in a plain ViT compute something else
    plain = VisionTransformer(**{**model.arch, 'act': 'gelu', 'norm_eps': 1e-6})
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(x), y, atol=1e-3)


def test_components_are_off_by_default():
    """Today's checkpoints keep their keys: no layer scale, registers or pre-norm unless asked for."""
    names = set(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2).state_dict())
    assert not any(('ls1' in n or 'ls2' in n or 'reg_token' in n or 'norm_pre' in n) for n in names)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=1e-5,
                          reg_tokens=2, norm_pre=True, act='quick_gelu')
    assert {'blocks.0.ls1.gamma', 'blocks.1.ls2.gamma', 'reg_token', 'norm_pre.weight'} <= set(m.state_dict())
    assert torch.equal(m.blocks[0].ls1.gamma, torch.full((32,), 1e-5))


def test_pretrained_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(CheckpointError) as e:
        build_from_checkpoint('mae_vit_base')
    msg = str(e.value)
    assert os.path.join(str(tmp_path / 'hub'), 'checkpoints', 'mae_pretrain_vit_base.pth') in msg and 'by hand' in msg
    assert '\n' not in msg


@pytest.mark.parametrize('name, file', [('deit_small', 'deit_small_patch16_224-cd65a155.pth'),
                                        ('clip_vitb16', 'ViT-B-16.pt')])
def test_teacher_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch, name, file):
    """The other families by name (util/pretrained.py; CLIP's TorchScript its own way) fail offline as MAE's do."""
    def offline(url, dst, *args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(CheckpointError) as e:
        build_from_checkpoint(name)
    msg = str(e.value)
    assert os.path.join(str(tmp_path / 'hub'), 'checkpoints', file) in msg and 'by hand' in msg and '\n' not in msg
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'r', '--teacher', name)
    assert msg and msg.startswith(f"error: '{name}' could not be downloaded"), msg
