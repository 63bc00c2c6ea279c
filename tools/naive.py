"""
The naive path: this repository's models run the way the authors' release runs them.

The reference that the fast paths are tested against (tests/test_fast_paths.py) and timed against
(benchmark.py): the teacher run through all its blocks and its head in train mode with drop-path
masks, every layer's maps kept for a loss autograd differentiates, and copy students that compute
their own q, k and softmax before the teacher's map replaces it. Also the steps in between, each
with one optimisation left out.
"""
import contextlib

import torch

from attention_distill import attention_cross_entropy
from teacher import teacher_outputs
from util.engine import soft_cross_entropy
import vit

# the recipes' stochastic depth (fine-tuning, copy, distillation) and label smoothing
DROP_PATH = {'train': 0.1, 'copy': 0.0, 'distill': 0.2}
SMOOTHING = 0.1


def naive_teacher(teacher, layers, drop_path):
    """maps(x): all blocks and the head, in train mode with drop-path masks, every requested map kept."""
    def maps(x):
        set_drop_path(teacher.train(), drop_path)
        with torch.no_grad():
            tokens, kept = teacher.forward_tokens(x, keep={i: ('logits',) for i in layers})
            teacher.forward_head(tokens)
        return {i: kept[i]['logits'] for i in layers}
    return maps


def fast_teacher(teacher, layers):
    """maps(x) as the scripts get them: the teacher stops inside its last transferred layer."""
    return lambda x: teacher_outputs(teacher, x, layers, 'attn')


def maps_first_distill_loss(maps, ce, weight=3.0):
    """All the teacher's maps, then all the student's (kept), then compared by ce(teacher, student)."""
    def loss_fn(net, x, y):
        target = maps(x)
        logits, kept = net(x, keep={i: ('logits',) for i in target})
        attn = sum(ce(target[i], kept[i]['logits']) for i in target)
        ce_cls = soft_cross_entropy(logits, y, SMOOTHING)
        return ce_cls + weight * attn, {'ce': ce_cls.detach(), 'attn': attn.detach()}
    return loss_fn


def naive_distill_loss(teacher, layers, weight=3.0, drop_path=DROP_PATH['distill']):
    return maps_first_distill_loss(naive_teacher(teacher, layers, drop_path), attention_cross_entropy, weight)


def qk_copy_forward(maps, student, x):
    """Listing every head makes the student compute its own q, k and softmax, then overwrite them."""
    heads = list(range(student.num_heads))
    return student(x, inject={i: {'attn': m.softmax(-1), 'heads': heads} for i, m in maps(x).items()})


def naive_copy_forward(teacher, student, x, layers, drop_path=0.0):
    return qk_copy_forward(naive_teacher(teacher, layers, drop_path), student, x)


def qk_copy_loss(maps):
    def loss_fn(net, x, y):
        loss = soft_cross_entropy(qk_copy_forward(maps, net, x), y, SMOOTHING)
        return loss, {'ce': loss.detach()}
    return loss_fn


def naive_copy_loss(teacher, layers):
    return qk_copy_loss(naive_teacher(teacher, layers, 0.0))


def set_drop_path(model, rate):
    for i, block in enumerate(model.blocks):   # linear in depth, as VisionTransformer sets it
        block.drop_path = rate * i / max(model.depth - 1, 1)
    return model


@contextlib.contextmanager
def sdpa_devices(devices):
    """Inside: layers that need no map run F.scaled_dot_product_attention on these device types only (() =
    explicit attention everywhere, the authors' way; ('cpu', 'cuda') = the fused kernel on a CPU too)."""
    old, vit.SDPA_DEVICES = vit.SDPA_DEVICES, tuple(devices)
    try:
        yield
    finally:
        vit.SDPA_DEVICES = old
