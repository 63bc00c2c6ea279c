"""How sharp a teacher's attention is: the mean entropy of its softmax attention per layer and head, on the
first 1000 of the 5000 held-out training images (`--val-size 5000`, the evaluation transform), as a fraction
of the entropy of a map spread evenly over its tokens (VALIDATION.md). Twice: on all the patches, as attention
transfer shows them, and on 12 of the 49 (and the class token), as MAE pre-training with 75% masked did:
    python -m tools.teacher_entropy teachers/fashion-mnist-mae.pt [more teachers]"""
import math
import sys

import torch

from attention_distill import attention_cross_entropy
from data import build_eval_set
from mae_pretrain import gather_tokens, random_keep
from util.checkpoints import build_from_checkpoint
from util.config import TrainConfig


def entropy(logits):
    """(H,) mean entropy in nats of each head's attention rows; logits (B, H, N, N): the distillation loss of a
    map against itself is its entropy."""
    return torch.stack([attention_cross_entropy(h, h) for h in logits.split(1, dim=1)])


@torch.no_grad()
def entropies(teacher, images, keep=None):
    """{layer: (H,) entropies}: on every patch, or on `keep` random patches of each image (and the class
    token), embedded as MAE's encoder embeds them."""
    if keep is None:
        return {i: entropy(t) for i, t in teacher.attention(images, range(len(teacher.blocks))).items()}
    x = teacher.patch_embed(images) + teacher.pos_embed[:, 1:]                        # (B, N, D)
    ids = random_keep(len(x), x.shape[1], keep, generator=torch.Generator().manual_seed(0))
    cls = (teacher.cls_token + teacher.pos_embed[:, :1]).expand(len(x), -1, -1)
    x, out = torch.cat([cls, gather_tokens(x, ids)], dim=1), {}                       # (B, 1 + keep, D)
    for i, block in enumerate(teacher.blocks):
        x, kept = block(x, keep=('logits',))
        out[i] = entropy(kept['logits'])
    return out


def main():
    held_out, _ = build_eval_set(TrainConfig(data='fashion-mnist', val_size=5000))
    images = torch.stack([held_out[i][0] for i in range(1000)])
    for path in sys.argv[1:]:
        teacher = build_from_checkpoint(path).eval()
        patches = teacher.patch_embed.num_patches
        for keep in (None, patches // 4):
            tokens = 1 + (keep or patches)
            print(f'{path}, {tokens} tokens: mean entropy per layer in nats, its fraction of ln {tokens} = '
                  f'{math.log(tokens):.2f} (an even map), each head in brackets')
            for i, h in entropies(teacher, images, keep).items():
                print(f'  layer {i}: {h.mean():.2f} ({h.mean() / math.log(tokens):.2f})  '
                      f'[{" ".join(f"{v:.2f}" for v in h.tolist())}]')


if __name__ == '__main__':
    main()
