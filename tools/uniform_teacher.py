"""A control for attention copy: the shipped teacher with every query projection set to zero, so that each of its
attention maps spreads evenly over all tokens (every logit q . k is 0) whatever the image. Copying these maps
gives the student fixed, even mixing in the copied layers and nothing of the teacher (VALIDATION.md):
    python -m tools.uniform_teacher runs/uniform-teacher.pt
    python attention_copy.py --data fashion-mnist --teacher runs/uniform-teacher.pt ..."""
import sys

import torch

ckpt = torch.load('teachers/fashion-mnist-mae.pt', map_location='cpu', weights_only=True)
dim = ckpt['arch']['embed_dim']
for k, v in ckpt['model'].items():
    if k.endswith('attn.qkv.weight') or k.endswith('attn.qkv.bias'):
        v[:dim] = 0          # the rows of q: [q; k; v] stacked along the output features
ckpt['made'] = {**ckpt.get('made', {}), 'command': ' '.join(['python', *sys.argv])}
torch.save(ckpt, sys.argv[1])
