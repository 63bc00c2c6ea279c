"""
features.py's attention maps: how far each head looks (attention distance), how close its maps are to the
teacher's (cross-entropy and KL), and the block-by-block run of a model that hands out, at each block, its tokens
and the map it used. A copy student has no queries or keys in its copied layers: there its map IS the teacher's,
given, not computed.
"""
import math

import torch

from attention_copy import CopyModel, copied
from attention_distill import attention_cross_entropy
from teacher import to_student_heads
from vit import scores

def attention_distance(attn, patch_size, first=1):
    """(H,) mean attention distance in pixels of each head: for query patch i, sum_j A_ij ||pos_i - pos_j||
    over patch keys j, pos the patch centres; averaged over query patches and images. attn: (B, H, N, N)
    probabilities whose last P = grid^2 tokens are the patches (first: 1 + register tokens before them).
    The class token is left out as query and as key, and each row renormalised over the patches: the
    distance says where a head looks when it looks at the image, however much it looks at the class
    token. A head reading only itself: 0; a uniform map: the mean distance between two patch centres."""
    a = attn[..., first:, first:].float()   # (B, H, P, P) patches to patches
    grid = torch.arange(math.isqrt(a.shape[-1]))
    centres = (torch.cartesian_prod(grid, grid) + 0.5).double() * patch_size   # (P, 2) pixels, row by row
    d = torch.cdist(centres, centres).float().to(a.device)   # (P, P)
    return ((a * d).sum(-1) / a.sum(-1)).mean((0, 2))   # (H,)


def map_agreement(teacher_logits, logits):
    """((H,) cross-entropy, (H,) KL) of each head's map to the teacher's, in nats, mean over images and
    query tokens (the class token included, as the distillation loss). KL = CE - the teacher's entropy (its
    cross-entropy to itself): 0 for the teacher's own maps. A teacher with more heads is grouped to the model's
    (teacher.to_student_heads, as distillation does). logits (B, H, N, N): log-probabilities do as well."""
    t = to_student_heads(teacher_logits, logits.shape[1]).split(1, 1)   # H x (B, 1, N, N)
    ce = torch.stack([attention_cross_entropy(a, b) for a, b in zip(t, logits.split(1, 1))])
    return ce, ce - torch.stack([attention_cross_entropy(a, a) for a in t])


# -----------------------------------------------------------------------------
# One model, block by block


def runner(model):
    """(the ViT whose blocks run, x -> what its layers are given). A copy student runs with its teacher's maps
    in its copied layers, exactly as attention_copy.CopyModel runs it."""
    if isinstance(model, CopyModel):
        return model.student, lambda x: copied(model.teacher, x, model.layers, model.heads, model.transfer)
    return model, lambda x: {}


def blocks(vit, x, inject):
    """Yield (tokens (B, N, D) at a block's output, logits (B, H, N, N) whose softmax is the map it used) block by
    block, so that several models can be run side by side holding one block's tensors each. Where a layer is
    given the teacher's q and k (or map), the map it used is the teacher's (as log-probabilities)."""
    x = vit.embed(x)   # (B, N, D)
    for i, block in enumerate(vit.blocks):
        given = inject.get(i, {})
        x, kept = block(x, given, keep=() if block.attn.no_qk else ('logits',))
        logits = kept.get('logits')                                         # its own, when it computes one
        if 'attn' in given or 'q' in given and 'k' in given:   # the teacher's map, its head groups' (as log-probs)
            teacher = scores(given['q'], given['k']).float() if 'q' in given else \
                given['attn'].float().clamp_min(torch.finfo(torch.float32).tiny).log()
            if 'heads' in given:
                maps = to_student_heads(teacher, len(given['heads']))                     # (B, h, N, N)
                logits = logits.clone()
                logits[:, given['heads']] = maps.to(logits.dtype)
            else:
                logits = to_student_heads(teacher, block.attn.num_heads)
        yield x, logits.float()
