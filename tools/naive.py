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


def naive_teacher(teacher, layers, drop_path):
    """maps(x): all blocks and the head, eager, in train mode with drop-path masks, every requested map kept."""
    def maps(x):
        set_drop_path(set_attn_implementation(teacher, 'eager').train(), drop_path)
        with torch.no_grad():
            tokens, kept = teacher.forward_tokens(x, keep={i: ('logits',) for i in layers})
            teacher.forward_head(tokens)
        return {i: kept[i]['logits'] for i in layers}
    return maps


def naive_distill_loss(teacher, layers, weight=3.0, drop_path=DROP_PATH['distill']):
    """All the teacher's maps, then all the student's (kept), compared by autograd's cross-entropy."""
    maps = naive_teacher(teacher, layers, drop_path)

    def loss_fn(net, x, y):
        target = maps(x)
        logits, kept = set_attn_implementation(net, 'eager')(x, keep={i: ('logits',) for i in target})
        attn = sum(attention_cross_entropy(target[i], kept[i]['logits']) for i in target)
        ce_cls = soft_cross_entropy(logits, y, SMOOTHING)
        return ce_cls + weight * attn, {'ce': ce_cls.detach(), 'attn': attn.detach()}
    return loss_fn


def naive_copy_forward(teacher, student, x, layers, drop_path=0.0):
    """Listing every head makes the student compute its own q, k and softmax, then overwrite them."""
    heads = list(range(student.num_heads))
    maps = naive_teacher(teacher, layers, drop_path)(x)
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
