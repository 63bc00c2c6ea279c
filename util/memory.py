"""
What a ViT needs of this machine's memory, counted from its VisionTransformer keywords before anything is built. It
guards the one fault that gives no message: a model larger than the host's free memory is ended by the OOM killer
without a word (or, on a GPU, fails in an allocator's numbers naming no flag). A resolve step asks here first, so
that a size from a flag (--img-size 65536) or from a file's record (10 million blocks, 2**60 tokens) is one line
before a module exists; the count is arithmetic on the keywords, instant whatever they say.

    check_trainable(arch, batch_size)        # a ViT made from flags: ConfigError naming them
    too_big(vit_numbers(arch))               # why it cannot fit (a file's record: its reader says so), else None
"""
import contextlib
import inspect
import os
import resource

import torch

from util.errors import ConfigError
from vit import VisionTransformer

# -----------------------------------------------------------------------------
# What a ViT holds, counted from its keywords (vit.VisionTransformer's parameters, one by one)


def block_numbers(dim, mlp_ratio=4.0, qkv_bias=True, no_qk=False, layer_scale=False):
    """The parameters of one vit.Block of width dim: two LayerNorms, the attention's projections (v alone where it
    has no q / k), the MLP, the layer scales."""
    hidden = int(dim * mlp_ratio)
    width = dim if no_qk else 3 * dim                                   # v, or q, k, v
    attention = width * dim + width * qkv_bias + dim * dim + dim         # qkv (or v), proj
    mlp = dim * hidden + hidden + hidden * dim + dim                      # fc1, fc2
    return 2 * 2 * dim + attention + mlp + 2 * dim * layer_scale


DEFAULTS = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}


def vit_numbers(arch):
    """The parameters (and buffers: it has none) of VisionTransformer(**arch), exactly: its keywords' arithmetic, no
    module made. A keyword not in arch: its default."""
    arch = {**DEFAULTS, **arch}
    dim, patch = arch['embed_dim'], arch['patch_size']
    tokens = (arch['img_size'] // patch) ** 2 + 1                        # the class token's position too
    embed = dim * arch['in_chans'] * patch * patch + dim + dim + tokens * dim   # patch_embed, cls_token, pos_embed
    embed += arch['reg_tokens'] * dim + 2 * dim * arch['norm_pre']
    layer = dict(mlp_ratio=arch['mlp_ratio'], qkv_bias=arch['qkv_bias'], layer_scale=arch['init_values'] is not None)
    no_qk = len(set(arch['no_qk_layers']))                             # a copy student's layers without q / k
    blocks = (arch['depth'] - no_qk) * block_numbers(dim, **layer) + no_qk * block_numbers(dim, no_qk=True, **layer)
    classes = arch['num_classes']
    return embed + blocks + 2 * dim + (classes * dim + classes if classes > 0 else 0)   # norm / fc_norm, head

# -----------------------------------------------------------------------------
# What this machine has free


def too_big(numbers, training=False, activations=0):
    """Why a model of `numbers` parameters cannot fit this machine, in words ('51.2 GB (...), more than the 15.3 GB
    free on this machine'), else None. What it needs is a lower bound: its weights in fp32, with their gradients and
    AdamW's two moments where it trains, and `activations` bytes, on the device it runs on (the host is asked for its
    weights too: every model is made there first). Only a size that clearly cannot fit is refused; one that might is
    left to try."""
    weights = 4 * numbers
    runs = weights * (4 if training else 1) + activations
    gpu = torch.cuda.is_available()
    needs = [('this machine', host_memory(), weights if gpu else runs)]
    if gpu:
        needs.append(('the GPU', torch.cuda.mem_get_info()[0], runs))
    for where, free, need in needs:
        if need > free:
            what = f'{numbers:,} parameters'
            if training:
                what += " with their gradients and AdamW's two moments"
            if activations >= 1e8:   # worth a word
                what += f', and at least {activations / 1e9:,.1f} GB of activations'
            return f'{need / 1e9:,.1f} GB ({what}), more than the {free / 1e9:,.1f} GB free on {where}'
    return None


def host_memory():
    """Bytes of memory this process can still have on this machine: /proc/meminfo's MemAvailable (Linux), else all of
    it (os.sysconf); under a limit on its address space (ulimit -v, resource.RLIMIT_AS), no more than the limit
    leaves."""
    free = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    free = proc_kb('/proc/meminfo', 'MemAvailable:', free)
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        free = min(free, limit - proc_kb('/proc/self/status', 'VmSize:', 0))
    return free


def proc_kb(path, key, otherwise):
    """The bytes a line of a /proc file gives in kB ('MemAvailable: 123 kB'), else `otherwise`."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return otherwise

# -----------------------------------------------------------------------------
# A model made from flags


def check_trainable(arch, batch, what='a ViT', tokens=None, numbers=None):
    """Refuse, in one line naming the flags that size it, `what` (a ViT of keywords arch, from flags) where it cannot
    train on this machine at `batch` images a step (too_big): its weights, their gradients and AdamW's state, and
    the tokens each block keeps for the backward pass (batch x tokens x width, fp32; tokens: an image's, all of them
    if None). numbers: its parameters where it holds more than the ViT (an MAE's decoder), else vit_numbers'."""
    if tokens is None:
        tokens = (arch['img_size'] // arch['patch_size']) ** 2 + 1 + arch['reg_tokens']
    activations = 4 * batch * tokens * arch['embed_dim'] * arch['depth']
    big = too_big(vit_numbers(arch) if numbers is None else numbers, True, activations)
    if big:
        raise ConfigError(f"--embed-dim {arch['embed_dim']}, --depth {arch['depth']}, --img-size "
                          f"{arch['img_size']}, --patch-size {arch['patch_size']}, --batch-size {batch}: "
                          f"{what} of these sizes needs {big}: choose smaller ones")
