"""
A Vision Transformer written out by hand, with the one hook attention transfer needs: a layer can be handed tensors
in place of its own (inject) and can hand its own out (keep). Parameter names are timm's and MAE's (patch_embed.proj,
cls_token, pos_embed, blocks.{i}.attn.qkv, ..., norm / fc_norm, head): MAE checkpoints load without renaming.

    qk = teacher.internals(x, layers=[0, 1, 2], names=('q', 'k'))        # {i: {'q': (B, H, N, d), 'k': ...}}
    y = student(x, inject=qk)                             # attention copy: the teacher's map routes our values
    y, kept = student(x, keep={0: ('q', 'k'), 1: ('q', 'k')})   # distillation: own q, k out, for the loss

Both meet the student in `attend`: softmax(q k^T / sqrt(d)) v, run as Hugging Face's `attn_implementation` names
it: 'eager' writes the (B, H, N, N) map out (the definition), 'sdpa' is one fused call that never stores it.
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# Building blocks


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, N, D) tokens with one strided convolution."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return rearrange(self.proj(x), 'b d h w -> b (h w) d')   # (B, D, H/p, W/p) -> (B, N, D)


IMPLEMENTATIONS = ('eager', 'sdpa')


def scores(q, k):
    """The pre-softmax attention map q k^T / sqrt(d), (B, H, N, N),
    of (B, H, N, d) queries and keys."""
    return (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)


def attend(q, k, v, implementation='sdpa'):
    """softmax(q k^T / sqrt(d)) v: q, k (B, H, N, d), v (B, h, N, e) -> (B, h, N, e). H may be g times h (a student
    with fewer heads, given the teacher's q and k): value head j is routed by the mean of heads j*g .. j*g+g-1's maps,
    as (mean_g A_g) v = mean_g (A_g v)."""
    g = q.shape[1] // v.shape[1]
    if g > 1:
        v = v.repeat_interleave(g, 1)                                      # (B, H, N, e)
    if implementation == 'eager':
        attn = scores(q, k).softmax(-1, dtype=v.dtype)                    # (B, H, N, N)
        out = attn @ v
    else:
        out = _sdpa(q, k, v)                                               # one fused call (below the ViT)
    if g > 1:
        out = out.unflatten(1, (-1, g)).mean(2)                            # (B, h, N, e)
    return out


class Attention(nn.Module):
    """Multi-head self-attention that can be given, and hand out, its internals. no_qk: no query / key projection (a
    copy student's layer, given the teacher's q and k or map). implementation: attend's, the definition (eager) until
    a script has checked sdpa on its device and tells the model once (set_attn_implementation)."""

    def __init__(self, dim, num_heads, qkv_bias=True, no_qk=False):
        super().__init__()
        assert num_heads > 0 and dim % num_heads == 0, 'num_heads must be a positive divisor of embed_dim'
        self.num_heads = num_heads
        self.no_qk = no_qk
        self.implementation = 'eager'
        if no_qk:
            self.v = nn.Linear(dim, dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn=None, q=None, k=None, v=None, heads=None, keep=()):
        """x (B, N, D) -> (out (B, N, D), kept). q, k, v (B, h, N, *): used instead of its own; attn (B, h, N, N):
        probabilities instead of its own (for all heads: maybe g a head, averaged); heads: the h heads those cover
        (default all). keep: its own 'q', 'k', 'v' to hand back, or 'logits', its map written out and used."""
        if self.no_qk and ((attn is None and (q is None or k is None)) or heads is not None):
            raise ValueError("a layer without q/k projections needs the teacher's q and k (or map) "
                             "for every head")
        own = dict(zip('qkv', self.project(x)))                           # (B, H, N, d) each
        kept = {n: own[n] for n in keep if n in own}
        # its own map, written out
        if 'logits' in keep or (attn is not None and heads is not None):
            logits = scores(own['q'], own['k'])                            # (B, H, N, N)
            if 'logits' in keep:
                kept['logits'] = logits
            if attn is not None or (q is None and k is None):   # the map it wrote is used
                attn = _put(logits.softmax(-1, dtype=own['v'].dtype), attn, heads)
        # what it was given, for some or all heads, in place of its own
        q = _put(own['q'], q, heads)
        k = _put(own['k'], k, heads)
        v = _put(own['v'], v, heads)
        if attn is None:
            out = attend(q, k, v, self.implementation)                     # (B, H, N, d)
        else:
            # an explicit map; g maps a value head (a student with fewer heads): their mean, as in attend
            g = attn.shape[1] // v.shape[1]
            if g > 1:
                attn = attn.unflatten(1, (-1, g)).mean(2)                  # (B, h, N, N)
            attn = attn.to(v.dtype)
            out = attn @ v
        return self.proj(rearrange(out, 'b h n d -> b n (h d)')), kept     # (B, N, D)

    def project(self, x):
        """This layer's own (q, k, v), each (B, H, N, d); q = k = None in a layer without q/k."""
        if self.no_qk:
            return None, None, rearrange(self.v(x), 'b n (h d) -> b h n d', h=self.num_heads)
        qkv = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.num_heads)
        return qkv.unbind(0)


def _put(own, given, heads):
    """`own` (B, H, ...) with all heads (heads=None) or the listed ones replaced by `given`;
    with no `given`, `own`."""
    if given is None:
        return own
    if heads is None:
        return given
    # head by head, as slices: an index tensor would be a copy from the host, which waits, every layer of every step
    slot = {h: i for i, h in enumerate(heads)}
    given = given.to(own.dtype)
    picked = [given[:, slot[h]] if h in slot else own[:, h] for h in range(own.shape[1])]
    return torch.stack(picked, 1)


# the activations an Mlp runs (CLIP's QuickGELU beside GELU)
ACTS = ('gelu', 'quick_gelu')


class Mlp(nn.Module):   # fc2(act(fc1(x)))
    def __init__(self, dim, hidden, act='gelu'):
        super().__init__()
        assert act in ACTS, f"act must be one of {', '.join(ACTS)}"
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = QuickGELU() if act == 'quick_gelu' else nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch for a random subset of samples."""
    if p == 0.0 or not training:
        return x
    # a mask per sample, (B, 1, ...)
    mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * mask / (1 - p)


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)));
    no layer scale if init_values is None."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0, no_qk=False,
                 init_values=None, act='gelu', norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, no_qk)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x, given=None, keep=()):
        """given: what its attention is handed ({'q', 'k'} of the teacher: copy);
        keep: what it hands back."""
        a, kept = self.attn(self.norm1(x), **(given or {}), keep=keep)
        x = x + drop_path(self.ls1(a), self.drop_path, self.training)
        x = x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)
        return x, kept

# -----------------------------------------------------------------------------
# The model


class VisionTransformer(nn.Module):
    """The ViT; init_values, norm_pre, act, reg_tokens and norm_eps are other families'
    components (at the end)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, global_pool=False,
                 drop_path_rate=0.0, no_qk_layers=(), init_values=None, norm_pre=False, act='gelu',
                 reg_tokens=0, norm_eps=1e-6):
        super().__init__()
        # every keyword, to rebuild it
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         global_pool=global_pool, drop_path_rate=drop_path_rate,
                         no_qk_layers=sorted(no_qk_layers), init_values=init_values,
                         norm_pre=norm_pre, act=act, reg_tokens=reg_tokens, norm_eps=norm_eps)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.reg_token = None
        if reg_tokens:   # registers: tokens without a position
            self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if norm_pre else nn.Identity()
        # deeper blocks drop more
        rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i],
                                          i in no_qk_layers, init_values, act, norm_eps)
                                    for i in range(depth))
        # MAE's fine-tuning pools the patch tokens, then normalises (fc_norm); a class-token model normalises all
        # (norm). timm's and MAE's names, so that their checkpoints load
        if global_pool:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        else:
            self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        # MAE's initialisation: each layer drew PyTorch's default as it was made; then the linear layers', and the
        # class token's, positions' and registers'
        self.apply(_init_weights)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if reg_tokens:
            nn.init.normal_(self.reg_token, std=1e-6)                 # as DINOv2

    def reset_classifier(self, num_classes):
        """A new classifier of num_classes outputs (timm's name), on the current device: a model whose classifier is
        read from a file given the file's own. Its initialisation is its caller's."""
        self.num_classes = self.arch['num_classes'] = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x):
        """(B, C, H, W) images -> (B, 1 + R + N, D) tokens: class token, R registers,
        patches; norm_pre."""
        x = self.patch_embed(x)                                       # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)               # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed               # (B, 1 + N, D)
        if self.reg_token is not None:
            reg = self.reg_token.expand(x.shape[0], -1, -1)           # (B, R, D)
            x = torch.cat([x[:, :1], reg, x[:, 1:]], dim=1)           # (B, 1 + R + N, D)
        return self.norm_pre(x)

    def forward_tokens(self, x, inject=None, keep=None, depth=None):
        """Embed, run the first `depth` blocks (default all) -> (B, 1 + N, D) tokens, {layer: kept}. inject: {layer:
        {'q' | 'k' | 'v' | 'attn' | 'heads': tensor}} given to that layer; keep: {layer: names} it hands back."""
        inject = inject or {}
        keep = keep or {}
        x = self.embed(x)
        kept = {}
        for i, block in enumerate(self.blocks[:depth]):
            x, kept_i = block(x, inject.get(i), keep.get(i, ()))
            if kept_i:
                kept[i] = kept_i
        return x, kept

    def forward_head(self, x):
        """(B, 1 + R + N, D) tokens -> (B, num_classes): from the mean of the patch tokens,
        or the class token."""
        if self.global_pool:
            pooled = self.fc_norm(x[:, 1 + self.arch['reg_tokens']:].mean(1))   # (B, D)
        else:
            pooled = self.norm(x)[:, 0]                                # (B, D)
        return self.head(pooled)                                      # (B, num_classes)

    def forward(self, x, inject=None, keep=None):
        """Class logits (B, num_classes); with `keep`, also the kept tensors {layer: {name: t}}."""
        tokens, kept = self.forward_tokens(x, inject, keep)
        logits = self.forward_head(tokens)
        return (logits, kept) if keep else logits

    def internals(self, x, layers, names=('q', 'k')):
        """{layer: {name: tensor}} of the given layers, running no block after the last (of it, only its norm and
        projections). names: among 'q', 'k', 'v' (B, H, N, d) and 'logits' (B, H, N, N)."""
        *before, last = sorted(layers)
        x, out = self.forward_tokens(x, keep={i: names for i in before}, depth=last)
        block = self.blocks[last]
        own = dict(zip('qkv', block.attn.project(block.norm1(x))))   # (B, H, N, d) each
        out[last] = {n: scores(own['q'], own['k']) if n == 'logits' else own[n] for n in names}
        return out

    def attention(self, x, layers, what='logits'):
        """{layer: tensor}: 'logits', the pre-softmax map (B, H, N, N) written out,
        or 'q', 'k', 'v' (B, H, N, d)."""
        return {i: t[what] for i, t in self.internals(x, layers, (what,)).items()}


def set_attn_implementation(model, implementation):
    """'eager' (explicit maps) or 'sdpa' (fused kernels) in every module of model that holds an implementation: its
    attention layers, and a model that hands them tensors made one way or the other (a copy pair); returns model."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation '{implementation}': "
                         f"choose one of {', '.join(IMPLEMENTATIONS)}")
    for m in model.modules():
        if hasattr(m, 'implementation'):
            m.implementation = implementation
    return model


def trunc_normal_(tensor, std, bound=2.0):
    """tensor filled from a normal of mean 0 and `std`, each value beyond ±bound drawn again: MAE's and timm's
    trunc_normal_ (their bounds are absolute, ±2, so at std 0.02 nothing is drawn again). Written out, as torch 2.14
    draws it, so that every torch in requirements.txt's range draws the same weights from the same seed: torch 2.5
    and 2.6 draw them by the inverse of the normal's CDF, other numbers."""
    if tensor.is_meta:   # a model counted, not made (util/memory.py): no values to draw
        return tensor
    with torch.no_grad():
        tensor.normal_(0, std)
        while (outside := tensor.abs() > bound).any():
            tensor.copy_(torch.where(outside, torch.empty_like(tensor).normal_(0, std), tensor))
    return tensor


# MAE's; a LayerNorm keeps PyTorch's own weight 1, bias 0, which MAE sets as well
def _init_weights(m):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.Conv2d):   # as a linear layer on the flattened patch (MAE)
        nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
    if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
        nn.init.zeros_(m.bias)


# =============================================================================
# A first reading can stop here: the ViT above is the course's. What follows serves the other uses of the same
# model: the fused kernel's padding and a GPU fault (sdpa on CUDA), the named sizes, and the parts other families
# (DINOv2, CLIP) add to the plain ViT.

# -----------------------------------------------------------------------------
# The fused call, for a student of another width, and a fault of cuDNN's backward


def _sdpa(q, k, v):
    """F.scaled_dot_product_attention, also where v's head size e differs from q's d (a student of another width given
    the teacher's q and k). Its backward gets a contiguous incoming gradient (ContiguousGrad: why)."""
    d = q.shape[-1]
    e = v.shape[-1]
    # the smaller side padded with zeros, which change neither q k^T nor the columns kept
    if e < d:
        v = F.pad(v, (0, d - e))
    elif e > d:
        q = F.pad(q, (0, e - d))
        k = F.pad(k, (0, e - d))
    out = F.scaled_dot_product_attention(q, k, v, scale=d ** -0.5)
    return ContiguousGrad.apply(out)[..., :e]


class ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands the gradient on contiguous, so that every fused attention call of a run
    meets one layout. cuDNN's backward (q, k needing none) keeps the first incoming-gradient layout it meets at a
    shape: a second one at that shape gave value gradients off by 1.4, relative (an H100, torch 2.11, cuDNN 9.19:
    results/benchmark-h100/README.md; an H200 met it first, #67)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()

# -----------------------------------------------------------------------------
# Sizes (timm's names; patch 16 unless said otherwise)

SIZES = {
    'vit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_huge': dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}


# the most each of a ViT's sizes may be, whether a command line gives it or a file's record does
# (util/checkpoints.arch_of): one rule for both, so that no record builds what no flag could ask for
MOST = {'img_size': 2 ** 16, 'patch_size': 2 ** 16, 'in_chans': 2 ** 16, 'embed_dim': 2 ** 16, 'num_classes': 2 ** 40,
        'depth': 2 ** 12, 'num_heads': 2 ** 12, 'reg_tokens': 2 ** 12}


def model_arch(name, **overrides):
    """All VisionTransformer keywords of a named size, with overrides (None values ignored)."""
    if name not in SIZES:
        raise ValueError(f"unknown model '{name}'; choose one of {', '.join(SIZES)}")
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}
    return {**defaults, **SIZES[name], **{k: v for k, v in overrides.items() if v is not None}}


def create_model(name, **overrides):
    """create_model('vit_base', img_size=32, patch_size=4, num_classes=10)"""
    return VisionTransformer(**model_arch(name, **overrides))

# -----------------------------------------------------------------------------
# Components other families add to the plain ViT, off by default (util/pretrained.py: who uses which)


class LayerScale(nn.Module):   # a learned per-channel scale of a residual branch (CaiT, DINOv2)
    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class QuickGELU(nn.Module):   # CLIP's activation: a cheap fit of GELU its weights were trained with
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)
