"""
The naive path: this repository's models run the way the authors' release runs them.

The reference that the scripts' paths are timed against (benchmark.py): fp32, every attention explicit (eager),
the teacher run through all its blocks and its head in train mode with drop-path masks, every layer's maps kept
for a loss autograd differentiates, and copy students that compute their own q, k and softmax before the
teacher's map replaces it.
"""
import torch

from attention_distill import attention_cross_entropy
from util.engine import soft_cross_entropy
from vit import set_attn_implementation

# the recipes' stochastic depth (fine-tuning, copy, distillation) and label smoothing
DROP_PATH = {'train': 0.1, 'copy': 0.0, 'distill': 0.2}
SMOOTHING = 0.1


def eager_maps(model, x, layers):
    """(model(x), {layer: its attention logits}): model run eager,
    the map of each of `layers` written out and kept."""
    out, kept = set_attn_implementation(model, 'eager')(x, keep={i: ('logits',) for i in layers})
    return out, {i: kept[i]['logits'] for i in layers}


def teacher_maps(teacher, x, layers, drop_path):
    """All blocks and the head in train mode with drop-path masks, every requested map kept."""
    with torch.no_grad():
        return eager_maps(set_drop_path(teacher.train(), drop_path), x, layers)[1]


def naive_distill_loss(teacher, layers, weight=3.0, drop_path=DROP_PATH['distill']):
    """All the teacher's maps, then all the student's (kept),
    compared by autograd's cross-entropy."""
    def loss_fn(net, x, y):
        target = teacher_maps(teacher, x, layers, drop_path)
        logits, maps = eager_maps(net, x, layers)
        attn = sum(attention_cross_entropy(target[i], maps[i]) for i in layers)
        ce_cls = soft_cross_entropy(logits, y, SMOOTHING)
        return ce_cls + weight * attn, {'ce': ce_cls.detach(), 'attn': attn.detach()}
    return loss_fn


def naive_copy_forward(teacher, student, x, layers):
    """Listing every head makes the student compute its own q, k and softmax,
    then overwrite them."""
    heads = list(range(student.num_heads))
    maps = teacher_maps(teacher, x, layers, DROP_PATH['copy'])
    return set_attn_implementation(student, 'eager')(
        x, inject={i: {'attn': m.softmax(-1), 'heads': heads} for i, m in maps.items()})


def naive_copy_loss(teacher, layers):
    def loss_fn(net, x, y):
        loss = soft_cross_entropy(naive_copy_forward(teacher, net, x, layers), y, SMOOTHING)
        return loss, {'ce': loss.detach()}
    return loss_fn


def set_drop_path(model, rate):
    for i, block in enumerate(model.blocks):   # linear in depth, as VisionTransformer sets it
        block.drop_path = rate * i / max(model.depth - 1, 1)
    return model
