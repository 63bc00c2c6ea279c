"""
What a model needs of this machine's memory, counted from the run's model built on the meta device (its shapes, no
memory). It guards the one fault that gives no message: a model larger than the host's free memory is ended by the OOM
killer without a word (or, on a GPU, fails in an allocator's numbers naming no flag). A resolve step builds the run's
model there and asks here first, so that a size from a flag (--img-size 65536) or from a file's record (2**60 tokens)
is one line before anything is allocated; that build is then thrown away, and the run builds its model on the CPU after
its seed, as timm and MAE build one.

    with torch.device('meta'):
        model = create_model('vit_base', num_classes=0)
    check_trainable(model, batch_size)       # from flags: ConfigError naming them
    too_big(parameters(model))               # why it cannot fit (a file's record: its reader says so), else None
"""
import contextlib
import os
import resource

import torch

from util.errors import ConfigError


def parameters(model):
    """How many numbers `model` holds: its parameters and buffers (on the meta device too, where none is allocated)."""
    return sum(t.numel() for t in (*model.parameters(), *model.buffers()))


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


def check_trainable(model, batch, what='a ViT', tokens=None):
    """Refuse, in one line naming the flags that size it, `what` (a ViT or an MAE from flags, built on the meta
    device) where it cannot train on this machine at `batch` images a step (too_big): its weights, their gradients and
    AdamW's state, and the tokens each of its ViT's blocks keeps for the backward pass (batch x tokens x width, fp32;
    tokens: an image's, all of them if None)."""
    arch = model.arch
    if tokens is None:
        tokens = (arch['img_size'] // arch['patch_size']) ** 2 + 1 + arch['reg_tokens']
    activations = 4 * batch * tokens * arch['embed_dim'] * arch['depth']
    big = too_big(parameters(model), True, activations)
    if big:
        raise ConfigError(f"--embed-dim {arch['embed_dim']}, --depth {arch['depth']}, --img-size "
                          f"{arch['img_size']}, --patch-size {arch['patch_size']}, --batch-size {batch}: "
                          f"{what} of these sizes needs {big}: choose smaller ones")
