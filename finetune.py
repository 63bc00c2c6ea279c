"""
The two baselines: train a ViT from scratch, or fine-tune a pre-trained one.

    python finetune.py --data fashion-mnist                          # from scratch, ~13 min on 2 CPU cores
    python finetune.py --data cifar10 --init runs/mae/checkpoint.pt  # fine-tune your own MAE model
    python finetune.py --data imagenet --data-dir /datasets/imagenet # MAE recipe: fine-tune MAE ViT-L/16

    # one node, 8 GPUs (--batch-size is per process; lr = blr x global batch / 256)
    torchrun --nproc_per_node 8 finetune.py --data imagenet --data-dir /datasets/imagenet
    # many nodes: the same line on every node, with torchrun's rendezvous
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        --rdzv_id ft finetune.py --data imagenet --data-dir /datasets/imagenet --accum-steps 1

Every flag is a field of FinetuneConfig (`python finetune.py --help`); `--data` selects a preset.
"""
from dataclasses import dataclass

import torch

from checkpoints import load_weights
from config import TrainConfig
from engine import fit, log, run_main, start
from vit import create_model


@dataclass
class FinetuneConfig(TrainConfig):
    init: str = ''      # pre-trained weights: a file or a name (mae_vit_base, torchvision_vit_b_16, ...);
                        # empty = train from scratch
    out_dir: str = 'runs/finetune'


PRESETS = {
    # a recipe that trains in minutes on a CPU: 6 blocks of 128 wide, 4 heads, 28x28 with 4x4 patches,
    # average-pooled patch tokens, flips only (random crops slowed learning too much for 9 epochs)
    'fashion-mnist': dict(model='vit_tiny', embed_dim=128, depth=6, num_heads=4, img_size=28, patch_size=4,
                          global_pool=True, epochs=9, batch_size=128, blr=2e-3, warmup_epochs=1, weight_decay=0.05,
                          crop_pad=0, num_workers=1, log_every=100),
    'cifar10': dict(model='vit_tiny', depth=9, img_size=32, patch_size=4, epochs=100, batch_size=256,
                    warmup_epochs=5, crop_pad=4, randaug=9, reprob=0.25, drop_path=0.1),
    'cifar100': dict(model='vit_tiny', depth=9, img_size=32, patch_size=4, epochs=100, batch_size=256,
                     warmup_epochs=5, crop_pad=4, randaug=9, reprob=0.25, drop_path=0.1),
    # the MAE fine-tuning recipe for ViT-L/16 (global batch 1024 = 32 GPUs x 32)
    'imagenet': dict(model='vit_large', img_size=224, patch_size=16, init='mae_vit_large', global_pool=True,
                     epochs=50, warmup_epochs=5, batch_size=32, blr=1e-3, layer_decay=0.75, weight_decay=0.05,
                     drop_path=0.2, randaug=9, reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1,
                     num_workers=10, log_every=100),
    'fake': dict(model='vit_tiny', depth=2, img_size=32, patch_size=8, epochs=1, batch_size=32, num_workers=0,
                 log_every=5),
}


def build_model(cfg, num_classes):
    """The ViT the config names; --init loads pre-trained weights into it (a new head if needed)."""
    model = create_model(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=num_classes,
                         embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                         global_pool=cfg.global_pool, drop_path_rate=cfg.drop_path)
    if cfg.init:
        load_weights(model, cfg.init)
    return model


def main():
    cfg, env, data = start(FinetuneConfig, PRESETS)
    torch.manual_seed(cfg.seed)   # the same initial weights on every rank
    model = build_model(cfg, data[2])
    metrics = fit(cfg, env, model, data)
    log(env, cfg, f"final | top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}" +
        (f" | EMA top-1 {metrics['ema_top1']:.2f} top-5 {metrics['ema_top5']:.2f}" if 'ema_top1' in metrics else '')
        + f' | {cfg.out_dir}')


if __name__ == '__main__':
    run_main(main)
