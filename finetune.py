"""
The two baselines: train a ViT from scratch, or fine-tune a pre-trained one.

    python finetune.py --data fashion-mnist                          # from scratch, ~13 min on 2 CPU cores
    python finetune.py --data cifar10 --init runs/mae/checkpoint.pt  # fine-tune your own MAE model
    python finetune.py --data imagenet --data-dir /datasets/imagenet # MAE recipe: fine-tune MAE ViT-L/16
    python finetune.py --data imagenet --data-dir /datasets/imagenet --scratch true   # ViT-L/16 from scratch

    # one node, 8 GPUs (--batch-size is per process; lr = blr x global batch / 256)
    torchrun --nproc_per_node 8 finetune.py --data imagenet --data-dir /datasets/imagenet
    # many nodes: the same line on every node, with torchrun's rendezvous
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 \
        --rdzv_id ft finetune.py --data imagenet --data-dir /datasets/imagenet --accum-steps 1

Every flag is a field of FinetuneConfig (`python finetune.py --help`); `--data` selects a
preset, and `--scratch true` the from-scratch recipe where fine-tuning has its own
(ImageNet: MAE's appendix A.2). Where a preset fine-tunes, running it without weights is
an error: that run would be neither recipe. Every preset's source: RECIPES.md.
"""
import signal
import sys
from dataclasses import dataclass
from typing import NamedTuple

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch

from data import batch_mixer, build_data
from util.attention_check import settle_attention
from util.checkpoints import check_weights, read_hashed, state_dict_of
from util.config import DEPTH, SMALL_PRESETS, ComponentsConfig, ConfigError, at_least, option
from util.engine import evaluate, soft_cross_entropy, train_one_epoch
from util.launch import parse_config, resolve, run_main
from util.memory import check_trainable
from util.run import Run
from vit import create_model, trunc_normal_


@dataclass
class FinetuneConfig(ComponentsConfig):
    init: str = option('', 'pre-trained weights: a file or a name (mae_vit_base, '
                       'torchvision_vit_b_16, ...); empty = train from scratch')
    scratch: bool = option(False, 'the from-scratch recipe (SCRATCH) instead of the fine-tuning '
                                  'preset; no --init')
    init_num_heads: int = option(0, 'the head count of an --init file of weights alone '
                                    '(no record, no family)',
                                 at_least(0, "the file's record or family", DEPTH))
    out_dir: str = 'runs/finetune'

    SCRIPT = 'finetune.py'
    INPUTS = ('init',)

    def resolve(self):
        """The resolve step: the model the config names, built on the meta device (no memory) only to be refused where
        this machine cannot train it (util/memory), then thrown away; an --init file read, once, and its weights
        checked against that model (architecture, heads, values). Returns a Start: the weights the run loads into the
        model it builds (build_model)."""
        with torch.device('meta'):
            model = create_model(self.model, num_classes=0, **self.model_kwargs())
        check_trainable(model, self.batch_size)
        if not self.init:
            return Start(None, None)
        ckpt, digest = read_hashed(self.init)   # read once: loaded and hashed from the same bytes
        # with the file's own classifier, if it has one (the data's classes are counted when it is read)
        head = state_dict_of(ckpt, self.init).get('head.weight')
        with torch.device('meta'):
            model = create_model(self.model, num_classes=0 if head is None else head.shape[0], **self.model_kwargs())
        checked = check_weights(model, self.init, ckpt, self.init_num_heads, '--init-num-heads')
        return Start(checked.state_dict(), digest)

    def model_kwargs(self):
        """The VisionTransformer keywords the config sets beside its --model size
        (None: the size's own)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, global_pool=self.global_pool,
                    drop_path_rate=self.drop_path, **self.components())


class Start(NamedTuple):
    """What the resolve step leaves the run: an --init file's weights, checked (None: from scratch), and the SHA-256 of
    the bytes they were read from (None for a name, or from scratch), which the run records."""
    weights: dict
    sha256: str


PRESETS = {
    **SMALL_PRESETS,
    # the MAE fine-tuning recipe for ViT-L/16 (FINETUNE.md; global batch 1024 = 32 GPUs x 32)
    'imagenet': dict(model='vit_large', img_size=224, patch_size=16, init='mae_vit_large',
                     global_pool=True, epochs=50, warmup_epochs=5, batch_size=32, blr=1e-3,
                     layer_decay=0.75, weight_decay=0.05, drop_path=0.2,
                     randaug='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0,
                     smoothing=0.1, num_workers=10, log_every=100),
}
# --scratch true: supervised ViT-L/16 from scratch, the MAE paper's Table 11
# (appendix A.2; global batch 4096 = 64 GPUs x 64): the paper's 83.0 baseline. Random
# erasing is not among the regularisers the table lists ("and disable others"); pooling
# is not stated: global, as every other ImageNet preset here.
SCRATCH = {
    'imagenet': dict(model='vit_large', img_size=224, patch_size=16, init='', global_pool=True,
                     epochs=200, warmup_epochs=20, batch_size=64, blr=1e-4, layer_decay=1.0,
                     weight_decay=0.3, beta2=0.95, drop_path=0.2, ema=0.9999,
                     randaug='rand-m9-mstd0.5-inc1', reprob=0.0, mixup=0.8, cutmix=1.0,
                     smoothing=0.1, num_workers=10, log_every=100),
}


def presets(argv=None):
    """PRESETS, or with --scratch true the SCRATCH recipes over them. A fine-tuning
    preset (one that names --init) run without weights would be neither recipe: refused,
    pointing to --scratch true."""
    # --help: printed with the choice
    cfg = parse_config(FinetuneConfig, PRESETS, argv, checked=False)
    if not cfg.scratch:
        if not cfg.init and PRESETS.get(cfg.data, {}).get('init'):
            raise ConfigError(f"--data {cfg.data} fine-tunes pre-trained weights "
                              f"(its preset: --init {PRESETS[cfg.data]['init']}); "
                              f"to train from scratch pass --scratch true, "
                              f"which selects the from-scratch recipe")
        return PRESETS
    chosen = {**PRESETS, **SCRATCH}
    cfg = parse_config(FinetuneConfig, chosen, argv, checked=False)
    if cfg.init:
        raise ConfigError(f'--scratch true trains from random weights: drop --init {cfg.init}')
    return chosen


def build_model(cfg, num_classes, start):
    """The ViT the config names with a classifier of num_classes, built on the CPU (randomly initialised from the
    random state the run seeded), holding the --init file's weights where the resolve step read them (a Start): all
    of them, its classifier too where it fits the data's classes; a new classifier otherwise."""
    model = create_model(cfg.model, num_classes=num_classes, **cfg.model_kwargs())
    if start.weights is None:
        return model
    weights = dict(start.weights)
    if weights.get('head.weight', torch.empty(0)).shape != model.head.weight.shape:
        weights = {k: v for k, v in weights.items() if not k.startswith('head.')}
        # a new classifier: MAE's main_finetune starts it near zero (its bias is 0, as every linear layer's)
        trunc_normal_(model.head.weight, std=2e-5)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {'head.weight', 'head.bias'}, (missing, unexpected)
    start.weights.clear()   # copied into the model: not held twice for the whole run (a ViT-L's are 1.2 GB)
    return model


def classification_loss(cfg):
    """The baselines' loss_fn: the cross-entropy of the classifier's prediction
    (soft targets under MixUp / CutMix)."""
    def loss_fn(net, x, y):
        loss = soft_cross_entropy(net(x), y, cfg.smoothing)
        return loss, {'ce': loss.detach()}
    return loss_fn


def main():
    plan = resolve(FinetuneConfig, presets())   # every refusal first, nothing built yet
    cfg = plan.cfg
    with plan.run_dir:
        data, train_loader, eval_loader = build_data(plan)
        torch.manual_seed(cfg.seed)   # the same initial weights on every rank
        model = build_model(cfg, data.num_classes, plan.method).to(plan.device)
        x = next(iter(eval_loader))[0][:cfg.batch_size].to(plan.device)   # as many as a step's
        # sdpa, both ways, before anything runs
        _, checked = settle_attention(plan, 'fine-tuning', [model],
                                      lambda: model.forward_tokens(x, depth=1),
                                      {'layer 0': model.blocks[0].attn})
        extra = {'attention_check': checked}
        if cfg.init:   # what --init was: its file's SHA-256 recorded in config.json
            extra['init'] = {'source': cfg.init, 'sha256': plan.method.sha256}
        run = Run(plan, model, train_loader, data, extra)   # optimizer, EMA, resumed if asked
        loss_fn = classification_loss(cfg)
        mixer = batch_mixer(cfg, data.num_classes)

        while run.step < run.total_steps:
            # to the end of the epoch (or --max-steps)
            if train_one_epoch(run, train_loader, loss_fn, mixer):
                run.evaluate(lambda m: evaluate(m, eval_loader, plan))   # a line of metrics.jsonl
                run.save()                                                # checkpoint.pt
        m = run.metrics
        line = f"final | top-1 {m['top1']:.2f} top-5 {m['top5']:.2f}"
        if 'ema_top1' in m:
            line += f" | EMA top-1 {m['ema_top1']:.2f} top-5 {m['ema_top5']:.2f}"
        plan.log(f'{line} | {cfg.out_dir}')


if __name__ == '__main__':
    run_main(main)
