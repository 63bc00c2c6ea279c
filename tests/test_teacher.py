"""teacher.py: teachers off their native size, CLIP's archive as a teacher, and a teacher that cannot teach.

Each family's position embeddings are resized as its official code does (pretrained.FAMILIES): checked here
against that code, written out from its repository, and through the loading path against timm's network given
the official resize. CLIP's TorchScript archive loads from a path as by name. A teacher whose weights or maps are
not finite is refused by name before training (a damaged file: tests/test_checkpoints.py)."""
import math
import os
import shutil
from collections import OrderedDict
from functools import partial

import pytest
from timm.models.vision_transformer import checkpoint_filter_fn
from timm.models.vision_transformer import VisionTransformer as TimmViT
import torch
import torch.nn as nn

import attention_copy
import attention_distill
from attention_distill import DistillConfig
from conftest import TINY, random_vit, run_in_process
from teacher import build_teacher, inspect_teacher
from test_pretrained import D, DEPTH, HEADS, official_dinov2, randomise, timm_features
from util.checkpoints import build_from_checkpoint, resize_pos_embed
from util.pretrained import AS_DEIT, FAMILIES


def built_teacher(cfg):
    """The teacher a transfer run builds from cfg.teacher, on the CPU."""
    return build_teacher(inspect_teacher(cfg)[0], 'cpu')


# -----------------------------------------------------------------------------
# The official resizes, as written in each repository (only renamed where they read self.*)


def dinov2_official(pos_embed, w, h, patch_size, interpolate_offset, interpolate_antialias):
    """facebookresearch/dinov2 @b8931f7, dinov2/models/vision_transformer.py, interpolate_pos_encoding for an
    image of w x h pixels (x.shape[1] - 1 = its number of patches)."""
    previous_dtype = pos_embed.dtype
    npatch = (w // patch_size) * (h // patch_size)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    assert N == M * M
    kwargs = {}
    if interpolate_offset:
        sx = float(w0 + interpolate_offset) / M
        sy = float(h0 + interpolate_offset) / M
        kwargs["scale_factor"] = (sx, sy)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=interpolate_antialias,
        **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def dino_official(pos_embed, w, h, patch_size):
    """facebookresearch/dino @7c446df, vision_transformer.py, interpolate_pos_encoding."""
    npatch = (w // patch_size) * (h // patch_size)
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def deit_mae_official(pos_embed_checkpoint, w, h, patch_size, num_extra_tokens=1):
    """The same lines in facebookresearch/deit @7e160fe main.py (fine-tuning at another size) and
    facebookresearch/mae @efb2a80 util/pos_embed.py interpolate_pos_embed; num_patches of the new model."""
    num_patches = (w // patch_size) * (h // patch_size)
    embedding_size = pos_embed_checkpoint.shape[-1]
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return pos_embed_checkpoint
    extra_tokens = pos_embed_checkpoint[:, :num_extra_tokens]
    pos_tokens = pos_embed_checkpoint[:, num_extra_tokens:]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, embedding_size).permute(0, 3, 1, 2)
    pos_tokens = torch.nn.functional.interpolate(
        pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


# family -> (official resize, patch, native size, sizes to check: 224 and one above native); dinov2/hub/backbones.py
# builds the models without registers with interpolate_offset 0.1 and those with registers with offset 0, antialias
OFFICIAL = {
    'dinov2': (partial(dinov2_official, interpolate_offset=0.1, interpolate_antialias=False), 14, 518, (224, 616)),
    'dinov2_reg': (partial(dinov2_official, interpolate_offset=0.0, interpolate_antialias=True), 14, 518, (224, 616)),
    'dino': (dino_official, 16, 224, (224, 288, 160)),
    'deit': (deit_mae_official, 16, 224, (224, 384)),
    'mae': (deit_mae_official, 16, 224, (224, 384)),
}


def sincos(grid, dim):
    """(1, 1 + grid*grid, dim): a smooth 2-D sin-cos embedding (MAE's layout), a zero class position."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))     # (dim/4,)
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    y, x = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega                              # (g*g, dim/4)
    patches = torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)                       # (g*g, dim)
    return torch.cat([torch.zeros(1, dim), patches.float()])[None]


def embeddings(grid, dim=32):
    gen = torch.Generator().manual_seed(grid)
    return {'smooth': sincos(grid, dim), 'random': torch.randn(1, 1 + grid * grid, dim, generator=gen)}

# -----------------------------------------------------------------------------
# Position embeddings: each family's resize is its official code's


@pytest.mark.parametrize('name', list(OFFICIAL))
def test_each_family_resizes_as_its_official_code(name):
    official, patch, native, sizes = OFFICIAL[name]
    how = FAMILIES[name].resize
    for kind, pe in embeddings(native // patch).items():
        for size in sizes:
            want = official(pe, size, size, patch)                                         # (1, 1 + n*n, D)
            got = resize_pos_embed(pe, size // patch, how)
            assert got.shape == want.shape and torch.equal(got, want), (kind, size)


def test_dino_and_dinov2_resizes_are_not_deits():
    """What the test above tells apart: off the native size the three ways differ (DINOv2 at 224 by several
    percent on a smooth embedding), so a family given another's resize would fail it."""
    pe = sincos(37, 32)
    deit = resize_pos_embed(pe, 16, AS_DEIT)
    for name in ('dinov2', 'dinov2_reg'):
        rel = (resize_pos_embed(pe, 16, FAMILIES[name][1]) - deit).norm() / deit.norm()
        assert rel > 0.01, (name, rel)
    pe = sincos(14, 32)
    assert not torch.allclose(resize_pos_embed(pe, 10, FAMILIES['dino'][1]), resize_pos_embed(pe, 10, AS_DEIT),
                              atol=1e-3)

# -----------------------------------------------------------------------------
# Teachers through the loading path equal the official network at another size


def timm_at(img, patch, sd, **kw):
    """timm's ViT at img px, given `sd` whose position embeddings are already at that grid."""
    t = TimmViT(img_size=img, patch_size=patch, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0,
                norm_layer=partial(nn.LayerNorm, eps=1e-6), **kw)
    t.load_state_dict(checkpoint_filter_fn(dict(sd), t), strict=True)
    return t.eval()


@pytest.mark.parametrize('reg', [0, 4])
def test_dinov2_teacher_at_224_is_the_official_model(tmp_path, reg):
    """A DINOv2 file (native 518 px) loaded at 224: its features are those of DINOv2's network at 224, whose
    position embeddings its interpolate_pos_encoding computes (with the hub's arguments for this model)."""
    sd = official_dinov2(grid=37, patch=14, reg=reg)
    torch.save(sd, tmp_path / 'dinov2.pth')
    official = OFFICIAL['dinov2_reg' if reg else 'dinov2'][0]
    t = timm_at(224, 14, {**sd, 'pos_embed': official(sd['pos_embed'], 224, 224, 14)},
                init_values=1.0, reg_tokens=reg, no_embed_class=bool(reg))
    model = build_from_checkpoint(str(tmp_path / 'dinov2.pth'), img_size=224).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = model(x)
    assert (y - timm_features(t, x)).abs().max() < 1e-5
    # the resize the project used before (DeiT's) gives another model: the check above tells them apart
    t.load_state_dict(checkpoint_filter_fn({**sd, 'pos_embed': resize_pos_embed(sd['pos_embed'], 16, AS_DEIT)}, t))
    assert (y - timm_features(t, x)).abs().max() > 1e-3


@pytest.mark.parametrize('size', [224, 160, 288])
def test_dino_teacher_is_the_official_model(tmp_path, size):
    """DINO's file holds timm names only: its official file name says it is DINO's. At 224 (native) it is
    untouched; at 160 and 288 it is resized as DINO's interpolate_pos_encoding does on the fly."""
    torch.manual_seed(0)
    t = TimmViT(img_size=224, patch_size=16, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=0,
                norm_layer=partial(nn.LayerNorm, eps=1e-6))
    sd = randomise(t.state_dict())
    torch.save(sd, tmp_path / 'dino_deitsmall16_pretrain.pth')
    model = build_from_checkpoint(str(tmp_path / 'dino_deitsmall16_pretrain.pth'), img_size=size).eval()
    x = torch.randn(2, 3, size, size)
    want = timm_features(timm_at(size, 16, {**sd, 'pos_embed': dino_official(sd['pos_embed'], size, size, 16)}), x)
    with torch.no_grad():
        assert (model(x) - want).abs().max() < 1e-5


@pytest.mark.parametrize('file, classes', [('deit_small_patch16_224-cd65a155.pth', 7),
                                           ('mae_pretrain_vit_base.pth', 0)])
def test_deit_and_mae_files_resize_as_before(tmp_path, file, classes):
    """DeiT's and MAE's fine-tuning resize, the one the project always used: unchanged, equal to their code."""
    sd = randomise(TimmViT(img_size=224, patch_size=16, embed_dim=D, depth=1, num_heads=HEADS,
                           num_classes=classes).state_dict())
    torch.save({'model': sd}, tmp_path / file)
    model = build_from_checkpoint(str(tmp_path / file), img_size=384, num_heads=HEADS)   # MAE's: 12 at 768 wide
    assert torch.equal(model.pos_embed.data, deit_mae_official(sd['pos_embed'], 384, 384, 16))


def test_the_log_line_says_how_the_teacher_was_resized(tmp_path):
    sd = official_dinov2(grid=37, patch=14, reg=4)
    torch.save(sd, tmp_path / 'dinov2_reg.pth')
    line = inspect_teacher(DistillConfig(img_size=224, teacher=str(tmp_path / 'dinov2_reg.pth')))[1]
    assert '(DINOv2 with registers)' in line and 'native size 518 px' in line and 'run at 224 px' in line
    assert 'resized as DINOv2 with registers does' in line and '\n' not in line
    torch.save(official_dinov2(grid=37, patch=14, reg=0), tmp_path / 'dinov2.pth')
    line = inspect_teacher(DistillConfig(img_size=518, teacher=str(tmp_path / 'dinov2.pth')))[1]
    assert line.endswith("(DINOv2): depth 2, 2 heads, patches of 14 px, native size 518 px, run at that size"), line
    line = inspect_teacher(DistillConfig(img_size=224, teacher=str(tmp_path / 'dinov2.pth')))[1]
    assert line.endswith('resized as DINOv2 does'), line

# -----------------------------------------------------------------------------
# CLIP as OpenAI ships it: a TorchScript archive (clip/model.py's names), by path and by name


class ClipLayerNorm(nn.LayerNorm):
    def forward(self, x):   # clip/model.py: computed in float32
        return super().forward(x.type(torch.float32)).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = ClipLayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = ClipLayerNorm(d_model)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipVisual(nn.Module):
    """clip/model.py VisionTransformer, its forward as there."""
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = ClipLayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])
        self.ln_post = ClipLayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x],
                      dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class Clip(nn.Module):
    """The image tower, a text tower's first tensors, and the buffers OpenAI's archives carry."""
    def __init__(self, width=768, heads=12, patch=16, img=32):
        super().__init__()
        self.visual = ClipVisual(img, patch, width, 1, heads, 24)
        self.token_embedding = nn.Embedding(100, 32)
        self.positional_embedding = nn.Parameter(torch.randn(77, 32))
        self.ln_final = ClipLayerNorm(32)
        self.text_projection = nn.Parameter(torch.randn(32, 24))
        self.logit_scale = nn.Parameter(torch.ones([]))
        for k, v in (('input_resolution', img), ('context_length', 77), ('vocab_size', 100)):
            self.register_buffer(k, torch.tensor(v))

    def encode_image(self, image):
        return self.visual(image)


def clip_archive(path):
    """A CLIP model with random weights (64-dim heads, as in ViT-B/16), traced and saved as OpenAI's files are."""
    torch.manual_seed(0)
    clip = Clip()
    with torch.no_grad():
        for p in clip.parameters():
            p.copy_(torch.randn(p.shape) * (0.02 if p.dim() > 1 else 0.1))
    x = torch.randn(2, 3, 32, 32)
    torch.jit.save(torch.jit.trace_module(clip.eval(), {'encode_image': x}), str(path))
    return path


def test_clip_archive_loads_by_path_and_by_name(tmp_path, monkeypatch):
    path = clip_archive(tmp_path / 'ViT-B-16.pt')
    x = torch.randn(2, 3, 32, 32)
    archive = torch.jit.load(str(path))
    by_path = build_from_checkpoint(str(path)).eval()
    assert (by_path.arch['norm_pre'], by_path.arch['act'], by_path.arch['num_heads']) == (True, 'quick_gelu', 12)
    with torch.no_grad():   # the archive's own forward: our features through CLIP's projection
        assert (by_path(x) @ archive.visual.proj - archive.encode_image(x)).abs().max() < 1e-5
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    os.makedirs(tmp_path / 'hub' / 'checkpoints')
    shutil.copy(path, tmp_path / 'hub' / 'checkpoints' / 'ViT-B-16.pt')
    by_name = build_from_checkpoint('clip_vitb16').eval()
    assert by_name.arch == by_path.arch
    assert all(torch.equal(v, by_path.state_dict()[k]) for k, v in by_name.state_dict().items())

def test_distillation_takes_a_clip_archive_by_path(tmp_path, monkeypatch, capsys):
    path = clip_archive(tmp_path / 'ViT-B-16.pt')
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--out-dir', tmp_path / 'run', '--teacher', path,
                         '--max-steps', '1', '--amp', 'off', '--model', 'vit_tiny', '--embed-dim', '32',
                         '--num-heads', '2')
    assert msg is None, msg
    assert f"teacher {path} (CLIP): depth 1, 12 heads, patches of 16 px, native size 32 px" \
           in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Damaged files and pickles that carry code: one line naming the file, nothing run


@pytest.mark.parametrize('broken, says', [
    (lambda m: m.blocks[1].mlp.fc1.weight.data.__setitem__((0, 0), float('nan')),
     "holds weights that are not finite (blocks.1.mlp.fc1.weight has nan or inf)"),
    (lambda m: m.blocks[0].attn.qkv.weight.data.mul_(1e30), 'hands over attention maps that are not finite'),
])
def test_a_teacher_that_is_not_finite_is_refused_by_name(tmp_path, monkeypatch, broken, says):
    """It was reported as a training loss of NaN with advice to lower the learning rate, the teacher unnamed."""
    model = random_vit()
    broken(model)
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 't.pt')
    out = tmp_path / 'run'
    msg = run_in_process(monkeypatch, attention_distill, *TINY, '--teacher', tmp_path / 't.pt', '--out-dir', out,
                         '--amp', 'off')
    assert msg and says in msg and 't.pt' in msg, msg
    assert not out.exists()                                     # refused: the folder it made is gone again


def test_finite_queries_and_keys_whose_fp16_maps_overflow_are_refused(tmp_path, monkeypatch):
    """The teacher hands over q and k, finite here, but their products pass fp16's range: explicit maps under fp16
    autocast are not finite, so eager refuses the teacher; sdpa's kernels keep their sums in fp32 and take it."""
    model = random_vit()
    model.blocks[0].attn.qkv.weight.data.mul_(300 / model.blocks[0].attn.qkv.weight.data.abs().max())
    model.blocks[0].attn.qkv.bias.data.fill_(30.0)
    torch.save({'model': model.state_dict(), 'arch': model.arch}, tmp_path / 't.pt')
    args = [*TINY, '--teacher', tmp_path / 't.pt', '--amp', 'fp16', '--max-steps', '1', '--layers', '0']
    msg = run_in_process(monkeypatch, attention_copy, *args, '--out-dir', tmp_path / 'e', '--attn-implementation', 'eager')
    assert msg and 'hands over attention maps that are not finite (its layer 0)' in msg and '--amp off' in msg, msg
    assert run_in_process(monkeypatch, attention_copy, *args, '--out-dir', tmp_path / 's', '--attn-implementation',
                          'sdpa') is None
