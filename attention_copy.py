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
Here: what the student is given (copied), the pair as one classifier (CopyModel), the loss,
the script, and a trained pair loaded again with its teacher (load_copy_model: ensemble.py,
evaluate.py).

    python finetune.py --data fashion-mnist --out-dir runs/teacher            # make a teacher
    python attention_copy.py --data fashion-mnist --teacher runs/teacher/checkpoint.pt
    python attention_copy.py ... --attn-implementation sdpa   # one fused call per layer (the default on CUDA)
    python attention_copy.py --data fashion-mnist --teacher ... --transfer q   # copy only Q
    python attention_copy.py --data fashion-mnist --teacher ... --average-maps batch   # one map for a batch's images
    python attention_copy.py --data fashion-mnist --teacher ... --depth 3 --layer-map 0:0,1:2,2:5   # a smaller student
    torchrun --nproc_per_node 8 attention_copy.py --data imagenet --data-dir /datasets/imagenet
    # many nodes: torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 ...

`--data imagenet` is the authors' recipe: MAE ViT-L/16 teacher, 100 epochs, all 24 layers (RECIPES.md).
Inference: `model = load_copy_model('runs/copy/checkpoint.pt'); model(images)`.
"""
import os
import signal
import sys
from dataclasses import dataclass

# Ctrl-C while torch loads: exit 130 quietly (run_main takes over from there)
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
import torch
import torch.nn as nn

from data import batch_mixer, build_data
from teacher import (NAMES, TransferConfig, build_pair, build_teacher, inspect_teacher, student_presets,
                     teacher_outputs, written_out)
from util.attention_check import settle_attention
from util.checkpoints import (CheckpointError, arch_of, check_weights, read_checkpoint, read_hashed,
                              teacher_mismatch, teacher_record, vit_of)
from util.config import SMALL_PRESETS
from util.engine import autocast, evaluate, soft_cross_entropy, train_one_epoch
from util.launch import resolve, run_main
from util.run import Run


# -----------------------------------------------------------------------------
# The method: what the student is given, and the pair as one model


def copied(teacher, x, layers, heads, transfer, average='none', implementation='eager'):
    """What the student is given: {layer: {'q': q_t, 'k': k_t}} (sdpa: the teacher's map
    is made in the student's layer, by one fused call), or {layer: {'attn': the map}}
    when the teacher runs eager (its layers write their maps out anyway: handed over as
    they were made, not made twice), or its q, k or v; with the listed heads only.
    layers: {student layer: teacher layer} (or a list: the same layers). A student with
    fewer heads than the teacher is given all of them: each of its heads is routed by
    the mean map of its group of teacher heads (vit.attend).
    average: 'batch' | 'queries' hands every image the batch's mean map, or every query
    its image's mean row (--average-maps: the paper's test of whether a map's worth is
    in its image and its query). implementation: the run's (settle_attention's), which its teacher
    and student were told."""
    assert average == 'none' or implementation == 'eager', 'an average is made of maps (teacher.written_out)'
    if transfer == 'attn' and implementation == 'eager':
        out = {}
        for i, t in teacher_outputs(teacher, x, layers, ('logits',)).items():
            attn = t['logits'].softmax(-1, dtype=t['logits'].dtype)   # (B, H, N, N)
            if average != 'none':
                attn = attn.mean(0 if average == 'batch' else 2, keepdim=True).expand_as(attn)
            out[i] = {'attn': attn}
    else:
        # each its own tensor: the fused call keeps them for backward, and views would keep the teacher's v
        out = {i: {n: t.contiguous() for n, t in given.items()}
               for i, given in teacher_outputs(teacher, x, layers, NAMES[transfer]).items()}
    if heads is not None:   # slices stacked: a list index is a copy from the host, waited for, per layer
        return {i: {**{n: torch.stack([t[:, h] for h in heads], 1) for n, t in given.items()},
                    'heads': heads}
                for i, given in out.items()}
    return out


class CopyModel(nn.Module):
    """Teacher + copy student as one classifier, for evaluation and inference. implementation:
    what copied hands over (eager: the teacher's maps), told with its layers'
    (vit.set_attn_implementation)."""

    def __init__(self, teacher, student, layers, heads=None, transfer='attn', average='none',
                 implementation='eager'):
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.layers = layers
        self.heads = heads
        self.transfer = transfer
        self.average = average
        self.implementation = implementation
        self.written_out = written_out(average)   # why util/launch.on_device keeps it on eager, or ''

    def forward(self, x):
        given = copied(self.teacher, x, self.layers, self.heads, self.transfer, self.average,
                       self.implementation)
        # each copied layer routes the student's own values with the teacher's map:
        # A_teacher @ V_student (vit.Attention: the map given, or one fused call on q_t, k_t)
        return self.student(x, inject=given)


def copy_loss(cfg, teacher, layers, heads, implementation='eager'):
    """loss_fn(net, images, targets) for engine.train_one_epoch: the student's cross-entropy,
    given the teacher's (on the run's attention implementation)."""
    def loss_fn(net, x, y):
        given = copied(teacher, x, layers, heads, cfg.transfer, cfg.average_maps, implementation)
        loss = soft_cross_entropy(net(x, inject=given), y, cfg.smoothing)
        return loss, {'ce': loss.detach()}
    return loss_fn


# -----------------------------------------------------------------------------
# Config and presets, and the script


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


def main():
    # every refusal first: flags, teacher's file, run directory
    plan = resolve(CopyConfig, PRESETS)
    cfg = plan.cfg
    transfer = plan.method   # the teacher's shape, layers, heads, the student's
    layers = transfer.layers
    heads = transfer.heads
    with plan.run_dir:
        data, train_loader, eval_loader = build_data(plan)
        plan.log(f'attention copy: {cfg.transfer} of layers {sorted(layers.values())} '
                 f'(heads {heads or "all"}) from {cfg.teacher}')
        # the frozen teacher, the student, both settled on an implementation and checked
        attn, teacher, student, checked = build_pair(plan, data.num_classes, eval_loader,
                                                     check_fused)

        run = Run(plan, student, train_loader, data,
                  {'teacher': teacher_record(cfg, transfer), 'attention_check': checked})
        loss_fn = copy_loss(cfg, teacher, layers, heads, attn)
        mixer = batch_mixer(cfg, data.num_classes)

        while run.step < run.total_steps:
            # to the end of the epoch (or --max-steps)
            if train_one_epoch(run, train_loader, loss_fn, mixer):
                run.evaluate(lambda m: evaluate(CopyModel(teacher, m, layers, heads, cfg.transfer,
                                                          cfg.average_maps, attn),
                                                eval_loader, plan))
                run.save()
        plan.log(f"final | copy student + teacher top-1 {run.metrics['top1']:.2f} "
                 f"top-5 {run.metrics['top5']:.2f} | {cfg.out_dir}")


def check_fused(plan, teacher, student, x):
    """(implementation, record): the start-up check (util/attention_check.py) of the student's first copied layer, given
    what the teacher hands over on sdpa (its q and k, or q, k or v), and of its first layer with attention of its own if
    it has one; then teacher and student on the implementation that holds. The teacher is on eager until then."""
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


# -----------------------------------------------------------------------------
# A trained copy student, loaded again with its teacher (ensemble.py, evaluate.py)


COPY_RECORD = {'source': str, 'img_size': int, 'transfer': str,
               'heads': (list, type(None))}   # what it needs


def load_copy_model(path, teacher_source=None, new_teacher=False, ckpt=None):
    """Rebuild a trained copy student and the teacher it needs from its checkpoint, run
    once on a blank image: a record malformed, or that does not fit the two models, is a
    CheckpointError now, not part-way through a test set. The teacher is the recorded
    file, or teacher_source (moved) with the same SHA-256: another teacher would silently
    give other predictions, so it is refused unless new_teacher=True says it is meant.
    The teacher's file is read once: its SHA-256 is of the bytes its weights are loaded
    from. ckpt: the checkpoint already read from path (read here if None). The pair runs
    eager until told otherwise (vit.set_attn_implementation)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    fix = 'the file is damaged: train the copy student again (attention_copy.py)'
    rec = ckpt.get('teacher')
    bad = []
    if not isinstance(rec, dict):
        bad.append('teacher (a dict)')
    else:
        bad += [f'teacher.{k}' for k, kind in COPY_RECORD.items()
                if k not in rec or not isinstance(rec[k], kind)]
        if not isinstance(rec.get('layer_map', rec.get('layers')), (dict, list)):
            bad.append('teacher.layers')
    if not isinstance(ckpt.get('arch'), dict):
        bad.append('arch')
    if bad:
        raise CheckpointError(f"{path} is a copy student whose checkpoint lacks {', '.join(bad)} "
                              f"(missing or of another kind): {fix}")
    source = teacher_source or rec['source']
    if rec.get('sha256') and not os.path.isfile(source):   # its teacher was a file: gone, or moved
        if teacher_source:
            given = f'the teacher given for it, {source}, is not a file'
        else:
            given = f"its recorded teacher {source} (sha256 {rec['sha256']}) is gone"
        raise CheckpointError(f'{path} is a copy student, which runs only with its teacher: '
                              f'{given}; point at the teacher file where it is now '
                              f'(ensemble.py --teacher NEW.pt, or '
                              f'load_copy_model(path, teacher_source=NEW.pt)): '
                              f'its sha256 is checked')
    read, digest = read_hashed(source)
    if not new_teacher:
        other = teacher_mismatch(source, digest, rec)
        if other:
            raise CheckpointError(f'{path} is a copy student: {other}; it runs only with its own '
                                  f'teacher (--new-teacher true if another one is meant)')
    cfg = TransferConfig(teacher=source, img_size=rec['img_size'],
                         teacher_num_heads=rec.get('teacher_num_heads', 0))
    teacher = build_teacher(inspect_teacher(cfg, read)[0], 'cpu')
    # its record refused before anything is allocated
    student = vit_of(arch_of(ckpt, path, 0, '--num-heads'), path)
    student = check_weights(student, path, ckpt, 0, '--num-heads')
    # older records: the same layers in student and teacher
    layers = rec.get('layer_map', rec.get('layers'))
    model = CopyModel(teacher, student, layers, rec['heads'], rec['transfer'],
                      rec.get('average_maps', 'none')).eval()
    try:
        with torch.no_grad():   # the recorded layers, heads and transfer fit both models
            model(torch.zeros(1, 3, student.arch['img_size'], student.arch['img_size']))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f'{path} is a copy student whose teacher record does not fit it or '
                              f'its teacher ({type(e).__name__}: {e}): {fix}') from None
    return model


if __name__ == '__main__':
    run_main(main)
