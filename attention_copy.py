"""
Attention copy (Li et al. 2024, sec. 3.1): the student never computes its own attention.

In every transferred layer the frozen teacher's softmax attention map routes the student's values,
    out = A_teacher @ V_student        (B, H, N, N) @ (B, H, N, d),
    A_teacher = softmax(q_t k_t^T / sqrt(d))
and the student learns everything else: patch embedding, values, projections, MLPs, norms, head.
Its copied layers have no query/key projections at all. The teacher is needed at inference too.
What the teacher hands over follows --attn-implementation. With eager (what auto runs on a
CPU) the teacher hands over its map, as its layers wrote it out (vit.attend). With sdpa
(what auto runs on CUDA) it hands over its q_t and k_t, and the copied layer is one fused
call, F.scaled_dot_product_attention(q_t, k_t, V_student), that never stores an (N, N) map.
What a copy student is given (teacher.copied) and the pair as one classifier (teacher.CopyModel) live in
teacher.py, beside what the teacher hands over, since ensemble.py and evaluate.py run trained pairs too.

    python finetune.py --data fashion-mnist --out-dir runs/teacher            # make a teacher
    python attention_copy.py --data fashion-mnist --teacher runs/teacher/checkpoint.pt
    python attention_copy.py ... --attn-implementation sdpa   # one fused call per layer (the default on CUDA)
    python attention_copy.py --data fashion-mnist --teacher ... --transfer q   # copy only Q
    python attention_copy.py --data fashion-mnist --teacher ... --average-maps batch   # one map for a batch's images
    python attention_copy.py --data fashion-mnist --teacher ... --depth 3 --layer-map 0:0,1:2,2:5   # a smaller student
    torchrun --nproc_per_node 8 attention_copy.py --data imagenet --data-dir /datasets/imagenet
    # many nodes: torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 ...

`--data imagenet` is the authors' recipe: MAE ViT-L/16 teacher, 100 epochs, all 24 layers (RECIPES.md).
Inference: `model = load_copy_model('runs/copy/checkpoint.pt'); model(images)` (teacher.py; named here too).
"""
import signal
import sys
from dataclasses import dataclass

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch

from data import batch_mixer, build_data
from teacher import (CopyModel, TransferConfig, build_student, build_teacher, check_teacher, copied,
                     describe_map, load_copy_model, student_presets)
from util.checkpoints import teacher_record
from util.config import SMALL_PRESETS
from util.engine import autocast, evaluate, soft_cross_entropy, train_one_epoch
from util.launch import resolve, run_main, settle_attention
from util.run import Run


@dataclass
class CopyConfig(TransferConfig):
    out_dir: str = 'runs/copy'

    SCRIPT = 'attention_copy.py'
    # a full map leaves nothing for the student's own queries and keys: none in those layers
    NO_QK = True


PRESETS = {**student_presets(SMALL_PRESETS),
           # all but the last of the 6 layers, as the release's runs left ViT-L's last 3
           # of 24: chosen on the validation split (results/fashion-mnist/VALIDATION.md)
           'fashion-mnist': {**student_presets(SMALL_PRESETS)['fashion-mnist'], 'layers': '0-4'},
           # the release's copy command (global batch 2048 = 64 GPUs x 32): its absolute min_lr
           # 2e-3 is a quarter of its peak 8e-3, kept a quarter at any batch; warm-up its default
           # 5 epochs, layer decay counted as its dual model does (offset 0). All 24 layers, as
           # the paper copies; the release's runs copied 0-20: --layers 0-20 (RECIPES.md)
           'imagenet': dict(teacher='mae_vit_large', img_size=224, layers='all', global_pool=True,
                            epochs=100, warmup_epochs=5, batch_size=32, blr=1e-3, min_lr_ratio=0.25,
                            layer_decay=0.75, layer_decay_offset=0, beta2=0.999, weight_decay=0.05,
                            drop_path=0.0, ema=0.9999, randaug='rand-m9-mstd0.5-inc1', reprob=0.25,
                            mixup=0.8, cutmix=1.0, smoothing=0.1, num_workers=10, log_every=100)}


def copy_loss(cfg, teacher, layers, heads):
    """loss_fn(net, images, targets) for engine.train_one_epoch: the student's cross-entropy,
    given the teacher's."""
    def loss_fn(net, x, y):
        given = copied(teacher, x, layers, heads, cfg.transfer, cfg.average_maps)
        loss = soft_cross_entropy(net(x, inject=given), y, cfg.smoothing)
        return loss, {'ce': loss.detach()}
    return loss_fn


def main():
    # every refusal first: flags, teacher's file, run directory
    plan = resolve(CopyConfig, PRESETS)
    cfg = plan.cfg
    transfer = plan.method   # the teacher's shape, layers, heads, the student's
    layers = transfer.layers
    heads = transfer.heads
    with plan.run_dir:
        data, train_loader, eval_loader = build_data(plan)
        teacher = build_teacher(transfer.loaded, plan.device, plan.dtype, 'eager')   # frozen
        torch.manual_seed(cfg.seed)
        student = build_student(transfer, data.num_classes, cfg).to(plan.device)
        # sdpa, both ways, before anything runs on it
        # both checks' images: a batch as the run's are made, at its batch size
        x = next(iter(eval_loader))[0][:cfg.batch_size].to(plan.device)
        plan, checked = check_fused(plan, teacher, student, x)
        check_teacher(plan, teacher, x[:8])
        plan.log(f'attention copy: {cfg.transfer} of layers {sorted(layers.values())} '
                 f'(heads {heads or "all"}) from {cfg.teacher}')
        plan.log(transfer.description)
        plan.log(describe_map(transfer))

        run = Run(plan, student, train_loader, data.classes,
                  {'teacher': teacher_record(cfg, transfer), 'attention_check': checked})
        loss_fn = copy_loss(cfg, teacher, layers, heads)
        mixer = batch_mixer(cfg, data.num_classes)

        while run.step < run.total_steps:
            # to the end of the epoch (or --max-steps)
            if train_one_epoch(run, train_loader, loss_fn, mixer):
                run.evaluate(lambda m: evaluate(CopyModel(teacher, m, layers, heads, cfg.transfer,
                                                          cfg.average_maps),
                                                eval_loader, plan))
                run.save()
        plan.log(f"final | copy student + teacher top-1 {run.metrics['top1']:.2f} "
                 f"top-5 {run.metrics['top5']:.2f} | {cfg.out_dir}")


def check_fused(plan, teacher, student, x):
    """(plan, record): the start-up check (util/attention_check.py) of the student's first copied layer, given what
    the teacher hands over on sdpa (its q and k, or q, k or v), and of its first layer with attention of its own if it
    has one; then teacher and student on the implementation that holds. The teacher is on eager until then."""
    transfer = plan.method
    with torch.no_grad(), autocast(plan):
        given = copied(teacher, x, transfer.layers, transfer.heads, plan.cfg.transfer,
                       implementation='sdpa')
    # in fp32, as the check runs the layers' inputs (it casts them to the run's dtype itself): fp16 q and k whose
    # eager map overflows would make every later layer's inputs NaN
    for g in given.values():
        for n, t in g.items():
            if torch.is_tensor(t):
                g[n] = t.float()
    first = next(iter(transfer.layers))
    layers = {f'copied layer {first}': student.blocks[first].attn}
    own = [i for i in range(student.depth) if i not in transfer.layers]
    if own:
        layers[f'layer {own[0]}'] = student.blocks[own[0]].attn
    theirs, ours = teacher.blocks[0].attn, student.blocks[first].attn
    if (theirs.num_heads, theirs.proj.in_features) != (ours.num_heads, ours.proj.in_features):
        layers['teacher layer 0'] = theirs   # its own fused calls (before the layers it hands over)

    def forward():
        student(x, inject=given)
        with autocast(plan):
            teacher.forward_tokens(x, depth=1)
    return settle_attention(plan, 'copy', [teacher, student], forward, layers)


if __name__ == '__main__':
    run_main(main)
