"""
Masked autoencoder pre-training of vit.py's ViT: a teacher made from unlabelled images (MAE, He et al., CVPR 2022).
Each image keeps a random 25% of its patches; the encoder (the ViT, class token included) sees only those; a light
decoder gets them back in their places, a learned mask token in every other, and predicts every patch's pixels. The
loss: the mean squared error on the hidden patches only, each target patch normalised by its own mean and variance.

    python mae_pretrain.py --data fashion-mnist                      # 24 epochs, ~2-5 min each on 2 CPU cores
    python mae_pretrain.py --data fashion-mnist --export teachers/fashion-mnist-mae.pt   # the shipped teacher
    python attention_distill.py --data fashion-mnist --teacher runs/mae/checkpoint.pt
    # the MAE paper's ViT-L/16 recipe: 800 epochs at a global batch of 4096, 8 nodes x 8 GPUs x 64 images
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        --rdzv_id mae mae_pretrain.py --data imagenet --data-dir /datasets/imagenet

The checkpoint holds the encoder (timm/MAE names, its 'arch') next to the decoder's `decoder_*` and `mask_token`:
`util.checkpoints.build_from_checkpoint(path)` returns the encoder alone, a teacher or an --init. <out_dir>/
reconstruction.png shows what it makes of images it never trained on; `--export PATH` writes the encoder alone.
"""
import json
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch
import torch.nn as nn
from einops import rearrange

from data import build_data, sample_images
from util.attention_check import settle_attention
from util.checkpoints import read_checkpoint, state_dict_of
from util.config import DEPTH, SIZE, SMALL_PRESETS, ComponentsConfig, TrainConfig, at_least, option
from util.datafiles import DATASETS
from util.engine import all_mean, autocast, train_one_epoch
from util.files import check_outputs, save_figure
from util.memory import check_trainable
from util.launch import resolve, run_main
from util.run import Run
from vit import Block, VisionTransformer, model_arch, trunc_normal_

# -----------------------------------------------------------------------------
# Config

SINGLE_IMAGES = (lambda v: v == 0, 'MAE reconstructs single images: --mixup and --cutmix must be 0')


@dataclass
class MAEConfig(ComponentsConfig):
    mask_ratio: float = option(0.75, "fraction of each image's patches hidden from the encoder")
    decoder_dim: int = option(64, rule=at_least(1, most=SIZE))
    decoder_depth: int = option(2, rule=at_least(1, most=DEPTH))
    decoder_heads: int = 4
    norm_pix_loss: bool = option(True, 'targets: each patch normalised by its own mean and '
                                       'variance')
    smoothing: float = option(0.0, 'the loss has no labels')
    global_pool: bool = option(False, rule=(lambda v: not v,
                                            'MAE pre-training normalises every token (norm); '
                                            'pass --global-pool to finetune.py'))
    mixup: float = option(0.0, rule=SINGLE_IMAGES)
    cutmix: float = option(0.0, rule=SINGLE_IMAGES)
    out_dir: str = 'runs/mae'
    export: str = option('', 'also write the encoder alone here: a small teacher file to ship')

    # --export is written once the run ends: it may be named when resuming, never as a file of the run
    RESUMABLE = (*TrainConfig.RESUMABLE, 'export')
    INPUTS = ('export',)
    SCRIPT = 'mae_pretrain.py'

    def checks(self):
        patches = (self.img_size // self.patch_size) ** 2
        return super().checks() + [
            ('mask_ratio', 0 < self.mask_ratio < 1 and int(patches * (1 - self.mask_ratio)) >= 1,
             f'must hide some of the {patches} patches and keep at least one'),
            ('decoder_heads',
             1 <= self.decoder_heads <= DEPTH and self.decoder_dim % self.decoder_heads == 0,
             f'must divide --decoder-dim {self.decoder_dim}, at most {DEPTH}')]

    def resolve(self):
        """The resolve step: the MAE built on the meta device (no memory) only to be refused where this machine cannot
        train it (util/memory; its encoder keeps the tokens of the patches it sees), then thrown away: the run builds
        it on the CPU (build_mae)."""
        with torch.device('meta'):
            model = build_mae(self)
        check_trainable(model, self.batch_size,
                        f'an MAE (--decoder-dim {self.decoder_dim}, --decoder-depth {self.decoder_depth})',
                        tokens=model.num_keep + 1)


# MAE's optimiser and no augmentation beyond crop and flip (MAE's Table 1: masking does augmentation's work); no
# label smoothing, MixUp or CutMix: the config's own defaults
MAE_RECIPE = dict(global_pool=False, weight_decay=0.05, beta2=0.95, randaug='', reprob=0.0,
                  drop_path=0.0)
# finetune.py's small recipes with MAE's; blr 10x MAE's, tuned for batch 4096 over 800 epochs:
# a short small run needs more
MAE_SMALL = dict(MAE_RECIPE, blr=1.5e-3)
MAE_CIFAR = dict(MAE_SMALL, epochs=200, warmup_epochs=10, decoder_dim=128)
PRESETS = {
    'fashion-mnist': {**SMALL_PRESETS['fashion-mnist'], **MAE_SMALL, 'batch_size': 256,
                      'epochs': 24, 'warmup_epochs': 2},
    'cifar10': {**SMALL_PRESETS['cifar10'], **MAE_CIFAR},
    'cifar100': {**SMALL_PRESETS['cifar100'], **MAE_CIFAR},
    'fake': {**SMALL_PRESETS['fake'], **MAE_SMALL},
    # the MAE paper's ViT-L/16 recipe (global batch 4096 = 64 GPUs x 64): random resized crop + flip only
    'imagenet': dict(MAE_RECIPE, model='vit_large', img_size=224, patch_size=16, epochs=800,
                     warmup_epochs=40, batch_size=64, blr=1.5e-4, min_lr=0.0, mask_ratio=0.75,
                     decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True,
                     min_scale=0.2, hflip=0.5, num_workers=10, log_every=100),
}

# -----------------------------------------------------------------------------
# Masking and patches


def random_keep(batch, num_patches, num_keep, device=None, generator=None):
    """(B, K) indices of the patches each image keeps on device: the first K of its own random permutation, drawn
    where the generator is (a host's draws the same masks however the images are batched: evaluate_mse's)."""
    where = device if generator is None else generator.device
    noise = torch.rand(batch, num_patches, device=where, generator=generator)   # (B, N)
    return noise.argsort(dim=1)[:, :num_keep].to(device)


def gather_tokens(x, ids):
    """The tokens at `ids`, per image: x (B, N, D), ids (B, K) -> (B, K, D)."""
    return x[torch.arange(len(x), device=x.device)[:, None], ids]


def patch_stats(patches):
    """Each patch's mean and standard deviation (B, N, 1): norm_pix_loss's targets are
    (patch - mean) / std."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()


def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, p*p*C): one row of pixels per patch, in the order of the tokens."""
    return rearrange(imgs, 'b c (h p) (w q) -> b (h w) (p q c)', p=p, q=p)


def unpatchify(patches, p):
    """(B, N, p*p*C) -> (B, C, H, W), the inverse of patchify for square images."""
    return rearrange(patches, 'b (h w) (p q c) -> b c (h p) (w q)', h=math.isqrt(patches.shape[1]),
                     p=p, q=p)

# -----------------------------------------------------------------------------
# The model: vit.py's ViT as the encoder, plus a light decoder


class MaskedAutoencoder(VisionTransformer):
    """The encoder is this ViT itself (no classifier, `norm` on all tokens); the decoder's parameters are decoder_* and
    mask_token, as in MAE's checkpoints (a classifier loaded from one drops them)."""

    def __init__(self, arch, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75):
        super().__init__(**{**arch, 'num_classes': 0, 'global_pool': False})
        num_patches = self.patch_embed.num_patches
        p = self.patch_embed.patch_size
        self.num_keep = int(num_patches * (1 - mask_ratio))
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # learned (MAE: sin-cos)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * self.arch['in_chans'])
        # MAE's initialisation of the decoder: its linear layers, mask token and positions
        for layer in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            layer.apply(_init_decoder)
        trunc_normal_(self.decoder_pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs, ids_keep):
        """The ViT on the class token and the kept patches only: (B, 1 + K, D), normalised."""
        x = self.embed(imgs)                                    # (B, 1 + N, D), positions added
        # the class token and the kept patches
        x = torch.cat([x[:, :1], gather_tokens(x[:, 1:], ids_keep)], dim=1)  # (B, 1 + K, D)
        for block in self.blocks:
            x, _ = block(x)
        return self.norm(x)

    def forward_decoder(self, latent, ids_keep):
        """Encoded tokens back in their places, the mask token everywhere else
        -> pixels of every patch."""
        x = self.decoder_embed(latent)                                           # (B, 1 + K, Dd)
        B = len(x)
        N = self.patch_embed.num_patches
        tokens = self.mask_token.to(x.dtype).repeat(B, N, 1)                    # (B, N, Dd)
        # the kept ones put back in their places
        tokens[torch.arange(B, device=x.device)[:, None], ids_keep] = x[:, 1:]
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed       # (B, 1 + N, Dd)
        for block in self.decoder_blocks:
            x, _ = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]                   # (B, N, p*p*3)

    def forward(self, imgs, ids_keep=None, generator=None):
        """Predicted pixels of every patch (B, N, p*p*3) and the mask (B, N), 1 = hidden. ids_keep (B, K): the patches
        the encoder sees; default a fresh random choice per image (drawn from `generator`: the same masks each time)."""
        B = len(imgs)
        N = self.patch_embed.num_patches
        if ids_keep is None:
            ids_keep = random_keep(B, N, self.num_keep, imgs.device, generator)
        pred = self.forward_decoder(self.forward_encoder(imgs, ids_keep), ids_keep)
        mask = torch.ones(B, N, device=imgs.device).scatter(1, ids_keep, 0.0)   # (B, N)
        return pred, mask


def _init_decoder(m):   # MAE's, for the decoder's linear layers
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def mae_arch(cfg):
    """The encoder's VisionTransformer keywords: the size and components the config names (vit.py's sizes, as
    finetune.py's)."""
    return model_arch(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                      depth=cfg.depth, num_heads=cfg.num_heads, drop_path_rate=cfg.drop_path, **cfg.components())


def build_mae(cfg):
    """The encoder the config names with the decoder."""
    return MaskedAutoencoder(mae_arch(cfg), cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads,
                             cfg.mask_ratio)

# -----------------------------------------------------------------------------
# Loss and evaluation


def mae_loss(pred, target, mask, norm_pix=True):
    """Mean squared error over the hidden patches only: pred, target (B, N, P); mask (B, N), 1 = hidden. norm_pix: each
    target patch normalised by its own mean and variance (MAE Table 1: better features)."""
    target = target.float()
    if norm_pix:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    per_patch = (pred.float() - target).pow(2).mean(-1)                         # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def mae_loss_fn(cfg, generator=None):
    """loss_fn(net, images, targets) for engine.train_one_epoch; the labels are never used. generator: the one the
    masks are drawn from (evaluation: the same masks every time)."""
    def loss_fn(net, x, y):
        pred, mask = net(x, generator=generator)
        loss = mae_loss(pred, patchify(x, cfg.patch_size), mask, cfg.norm_pix_loss)
        return loss, {'mse': loss.detach()}
    return loss_fn


@torch.no_grad()
def evaluate_mse(model, loader, plan):
    """The masked-patch loss on held-out images, averaged over images and ranks: the same masks every time, and at
    any evaluation batch (drawn on the host, image after image: a GPU's draws depend on how they are split; each
    image hides as many patches, so a batch's mean weighs as many images as it has)."""
    model.eval()
    loss_fn = mae_loss_fn(plan.cfg, torch.Generator().manual_seed(plan.rank))
    total = torch.zeros((), device=plan.device)
    n = 0
    for x, _ in loader:
        with autocast(plan):
            loss, _ = loss_fn(model, x.to(plan.device, non_blocking=True), None)
        total = total + loss * len(x)
        n += len(x)
    return {'mse': all_mean(total / max(n, 1), plan).item()}

# -----------------------------------------------------------------------------
# What the model sees and makes: a figure


@torch.no_grad()
def reconstructions(model, imgs, cfg):
    """{title: (B, 3, H, W)} for images imgs (B, 3, H, W), normalised, as MAE's demo shows them: the original; what
    the encoder sees (hidden patches 0, the data's mean); the reconstruction (every patch the decoder paints, the
    seen ones included, which the loss never scores); the reconstruction with the seen patches pasted back.
    A norm_pix_loss model paints each patch's deviation from its own mean, in units of its own std; to draw it,
    each hidden patch borrows its true mean and std from the image. So its rows add 'true means only': what that
    loan draws without any decoder, every hidden patch flat at its true mean, the seen ones pasted back."""
    model.eval()
    p = model.patch_embed.patch_size
    pred, mask = model(imgs, generator=torch.Generator(imgs.device).manual_seed(0))
    target = patchify(imgs, p)                                                   # (B, N, P)
    m = mask[..., None]                                                          # (B, N, 1), 1: hidden
    masked = unpatchify(target * (1 - m), p)
    n = model.patch_embed.num_patches
    rows = {'original': imgs, f'masked: {n - model.num_keep} of {n} patches': masked}
    if cfg.norm_pix_loss:
        # the model predicts normalised patches; shown with each true patch's mean and std
        mean, std = patch_stats(target)                                          # (B, N, 1) each
        pred = pred * std + mean
        rows['true means only'] = masked + unpatchify(mean.expand_as(target) * m, p)
    rows['reconstruction'] = unpatchify(pred, p)
    rows['reconstruction + visible'] = masked + unpatchify(pred * m, p)
    return rows


def save_reconstructions(model, imgs, cfg):
    """<out_dir>/reconstruction.png: the rows of reconstructions(model, imgs, cfg), one column an image."""
    from matplotlib.figure import Figure   # no pyplot: no global state, rendered by Agg
    rows = reconstructions(model, imgs, cfg)
    # the data's normalisation, undone to show them: (3, 1, 1) each
    data_mean, data_std = (torch.tensor(s)[:, None, None] for s in DATASETS[cfg.data].stats)
    fig = Figure(figsize=(1.6 * len(imgs), 1.75 * len(rows)), layout='constrained')
    grid = fig.subplots(len(rows), len(imgs), squeeze=False)
    for axes, (title, batch) in zip(grid, rows.items()):
        for ax, img in zip(axes, batch.float().cpu()):
            shown = (img * data_std + data_mean).clamp(0, 1)                      # (3, H, W)
            ax.imshow(shown.permute(1, 2, 0).numpy())                             # (H, W, 3)
            ax.set_title(title, fontsize=8)
            ax.axis('off')
    # whole or not at all
    save_figure(fig, os.path.join(cfg.out_dir, 'reconstruction.png'), dpi=100)

# -----------------------------------------------------------------------------
# Train


def export_encoder(run_dir, write, path):
    """The encoder of a pre-training run alone, a teacher small enough to ship: its weights, arch and config, and how
    it was made (command, commit, held-out MSE), written whole (write: util/files.check_outputs'), never over a
    file there. util.checkpoints.build_from_checkpoint(path) loads it."""
    ckpt = read_checkpoint(Path(run_dir, 'checkpoint.pt'))
    run = json.loads(Path(run_dir, 'config.json').read_text())
    made = {'command': shlex.join(['python', *run['argv']]), 'git_commit': run['git_commit'],
            'torch': run['torch'], 'epoch': ckpt['epoch'], 'held_out_mse': ckpt['metrics']['mse']}
    encoder = {'model': state_dict_of(ckpt), 'arch': ckpt['arch'], 'config': ckpt['config'],
               'made': made}
    write(path, lambda f: torch.save(encoder, f))


def main():
    plan = resolve(MAEConfig, PRESETS)   # every refusal first, nothing built yet
    cfg = plan.cfg
    with plan.run_dir:
        # --export: refused as the run starts where it could not be written at its end
        write = check_outputs('--export', cfg.export if plan.main else '')
        data, train_loader, eval_loader = build_data(plan)
        torch.manual_seed(cfg.seed)   # the same initial weights on every rank
        model = build_mae(cfg).to(plan.device)
        x = next(iter(eval_loader))[0][:cfg.batch_size].to(plan.device)   # as many as a step's
        masks = torch.Generator(plan.device)
        # sdpa, both ways, before anything runs on it
        _, checked = settle_attention(plan, 'MAE', [model],
                                      lambda: model(x, generator=masks.manual_seed(0)),
                                      {'encoder layer 0': model.blocks[0].attn,
                                       'decoder layer 0': model.decoder_blocks[0].attn})
        plan.log(f'MAE: the encoder sees {model.num_keep} of {model.patch_embed.num_patches} '
                 f'patches; decoder {cfg.decoder_depth} blocks x {cfg.decoder_dim}, '
                 f'norm_pix_loss {cfg.norm_pix_loss}')
        run = Run(plan, model, train_loader, data, {'attention_check': checked})
        loss_fn = mae_loss_fn(cfg)   # on single images: the config refuses MixUp and CutMix

        while run.step < run.total_steps:
            if train_one_epoch(run, train_loader, loss_fn):
                # evaluated by its masked-patch loss on held-out images (an autoencoder has no top-1)
                run.evaluate(lambda m: evaluate_mse(m, eval_loader, plan))
                run.save()
        if plan.main:
            save_reconstructions(model, sample_images(data, 6, plan.device), cfg)
            if cfg.export:
                export_encoder(cfg.out_dir, write, cfg.export)
        train_mse = run.metrics.get('train', {}).get('mse', float('nan'))
        plan.log(f"final | train mse {train_mse:.4f} | "
                 f"held-out masked mse {run.metrics['mse']:.4f} | "
                 f"{cfg.out_dir}/checkpoint.pt, reconstruction.png")


if __name__ == '__main__':
    run_main(main)
