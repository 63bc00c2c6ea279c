"""
Attention distillation (Li et al. 2024, sec. 3.2): the student computes its own attention and is
pulled toward the teacher's by a loss; afterwards it is an ordinary ViT that needs no teacher.

    loss = CE(student(x), y) + w * sum over layers l of  H(softmax(t_l), softmax(s_l))
    H(p, q) = -(p * log q).sum(-1), averaged over batch, heads and query tokens (class token included),
    with t_l, s_l the pre-softmax attention logits of layer l (B, H, N, N), and w = 3.
    The Q / K / V variants use the mean squared error between teacher's and student's q, k or v.

    python finetune.py --data fashion-mnist --out-dir runs/teacher            # make a teacher
    python attention_distill.py --data fashion-mnist --teacher runs/teacher/checkpoint.pt
    python attention_distill.py --data imagenet --model vit_small --num-heads 8   # ViT-L's maps into a ViT-S
    torchrun --nproc_per_node 8 attention_distill.py --data imagenet --data-dir /datasets/imagenet
    # many nodes: torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 ...

`--data imagenet` is the authors' recipe: MAE ViT-L/16 teacher, the first 18 of 24 layers distilled
(the setting the authors intended; their release never passed it on and used 21), 200 epochs.
The saved checkpoint is a plain ViT: `util.checkpoints.build_from_checkpoint('runs/distill/checkpoint.pt')`.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teacher import (TransferConfig, build_student, check_teacher, describe_map, layer_pairs, load_teacher,
                     student_presets, teacher_outputs, teacher_record, to_student_heads)
from util.config import SMALL_PRESETS
from util.engine import fit, soft_cross_entropy
from util.launch import log, run_main, start

# -----------------------------------------------------------------------------
# The method: the loss, and one training step


def attention_cross_entropy(teacher_logits, student_logits):
    """-(softmax(t) * log_softmax(s)).sum(-1), mean over batch, heads, queries. (B, H, N, N) each.
    Equals the teacher's entropy when s == t (KL = 0); only the student gets a gradient."""
    p = teacher_logits.float().softmax(-1)
    return -(p * student_logits.float().log_softmax(-1)).sum(-1).mean()


def distill_loss(own, target, transfer, heads=None, ce=attention_cross_entropy):
    """Attention loss of one layer: cross-entropy of maps, or MSE of q / k / v (B, H, N, *).
    A student with fewer heads than the teacher learns each group's mean map (teacher.to_student_heads)."""
    if transfer == 'attn':
        target = to_student_heads(target, own.shape[1])     # (B, H_student, N, N); the same tensor if H matches
    if heads is not None:
        own, target = own[:, heads], target[:, heads]
    return ce(target, own) if transfer == 'attn' else F.mse_loss(own.float(), target.float())


def plain_loss_fn(cfg, teacher, layers, heads):
    """loss_fn(net, images, targets) for engine.fit, as the method defines it: the teacher's maps of every
    distilled layer, then the student's own (kept), then CE + weight x the sum of the layers' losses.
    The script runs distill_loss_fn below: the same numbers and gradients with less memory (tested)."""
    name, pairs = ('logits' if cfg.transfer == 'attn' else cfg.transfer), layer_pairs(layers)

    def loss_fn(net, x, y):
        with torch.no_grad():
            targets = teacher_outputs(teacher, x, pairs, cfg.transfer)        # {student layer: (B, H, N, N)}
        logits, kept = net(x, keep={i: (name,) for i in pairs})               # the student's own, kept
        attn = sum(distill_loss(kept[i][name], targets[i], cfg.transfer, heads) for i in pairs)
        ce = soft_cross_entropy(logits, y, cfg.smoothing)
        return ce + cfg.weight * attn, {'ce': ce.detach(), 'attn': attn.detach()}
    return loss_fn

# -----------------------------------------------------------------------------
# The same computation, made cheaper: what the script runs


def distill_loss_fn(cfg, teacher, layers, heads):
    """plain_loss_fn's loss, with teacher and student interleaved layer by layer (one layer's pair of maps
    alive at a time, not all of them), the teacher stopped inside its last distilled layer, and the
    cross-entropy's gradient made in its forward pass (FusedAttentionCrossEntropy)."""
    name = 'logits' if cfg.transfer == 'attn' else cfg.transfer
    layer_losses, keep = LayerLosses(teacher, layers, name, cfg.transfer, heads), {i: (name,) for i in layers}

    def loss_fn(net, x, y):
        logits, losses = net(x, keep=keep, consume=layer_losses.start(x))
        ce = soft_cross_entropy(logits, y, cfg.smoothing)
        attn = sum(losses.values())
        return ce + cfg.weight * attn, {'ce': ce.detach(), 'attn': attn.detach()}
    return loss_fn


CPU_CHUNK = 2 ** 16     # floats per row chunk of FusedAttentionCrossEntropy on a CPU (256 KB in fp32)


class FusedAttentionCrossEntropy(torch.autograd.Function):
    """attention_cross_entropy(t, s) with its gradient made in the forward pass.

    d/ds of the mean cross-entropy is (softmax(s) - softmax(t)) / (B * H * N), so the forward keeps just
    softmax(s) - softmax(t), one (B, H, N, N) tensor in the student's dtype, where autograd would keep two
    fp32 ones (softmax(t) and log_softmax(s)) and redo the arithmetic in the backward pass.
    On a CPU the rows go a few hundred at a time, so that their fp32 softmaxes stay in cache: the
    loss is bound by memory traffic, and this cuts it from ~38 to ~6 bytes a map entry.
    """

    @staticmethod
    def forward(ctx, teacher_logits, student_logits):
        n = student_logits.shape[-1]
        t, s = teacher_logits.reshape(-1, n), student_logits.reshape(-1, n)      # (rows, N)
        rows = len(s) if s.is_cuda else max(1, CPU_CHUNK // n)
        diff, total = torch.empty_like(s), s.new_zeros((), dtype=torch.float32)
        for a in range(0, len(s), rows):
            p = torch.softmax(t[a:a + rows], -1, dtype=torch.float32)
            log_q = torch.log_softmax(s[a:a + rows], -1, dtype=torch.float32)
            torch.sub(log_q.exp(), p, out=diff[a:a + rows])
            total += torch.dot(p.flatten(), log_q.flatten())
        ctx.save_for_backward(diff.view_as(student_logits))
        ctx.count = len(s)                            # B * H * N rows averaged over
        return -total / ctx.count

    @staticmethod
    def backward(ctx, grad_loss):
        diff, = ctx.saved_tensors
        # applied in fp32: fp16 could not hold diff / count, nor a GradScaler's scale. No .item(): on CUDA it
        # would wait for the GPU, and torch.compile could not trace it.
        scale = grad_loss / ctx.count
        if diff.is_cuda:     # a CUDA kernel would round the fp32 scale to diff's dtype first
            return None, (diff.float() * scale).to(diff.dtype)
        return None, diff * scale     # a 0-dim CPU tensor multiplies as an fp32 scalar, in one pass


class LayerLosses:
    """consume(i, kept) for the student's forward: runs the teacher on to the layer mapped to the student's
    layer i (layers: {student layer: teacher layer}, or a list: the same) and returns the attention loss of
    the student's layer i against it.

    Teacher and student run interleaved, so one layer's pair of maps is alive at a time, never all of them;
    the teacher stops inside its last transferred layer (q and k only). One object serves every step, and
    start(images) sets its per-step state as data (the teacher's tokens and how far it has run): torch.compile
    then traces the teacher into the student's graph once. A fresh closure over a generator each step could
    not be traced, and a graph break inside the student's loop over blocks sent the whole forward back to
    eager, compiled block by block until dynamo's recompile limit.
    """

    def __init__(self, teacher, layers, name, transfer, heads=None):
        self.pairs = layer_pairs(layers)                    # {student layer: teacher layer}, both increasing
        self.teacher, self.last, self.name = teacher, max(self.pairs.values()), name
        self.transfer, self.heads = transfer, heads

    def start(self, images):
        self.tokens, self.ran = images, -1           # (B, C, H, W) until the teacher's embedding has run
        return self

    def __call__(self, i, kept):
        with torch.no_grad():
            target = self.teacher_at(self.pairs[i])
        return distill_loss(kept[self.name], target, self.transfer, self.heads, FusedAttentionCrossEntropy.apply)

    def teacher_at(self, i):
        """The teacher's logits (B, H, N, N) or q / k / v (B, H, N, d) of layer i, running only the blocks
        between the previous call's layer and i."""
        assert i > self.ran, f'layers must be asked for in order ({i} after {self.ran})'
        t = self.teacher
        x = t.embed(self.tokens) if self.ran < 0 else self.tokens              # (B, 1 + N, D)
        for block in t.blocks[self.ran + 1:i]:
            x, _ = block(x)
        block = t.blocks[i]
        if i == self.last:    # of the last block, only its norm and projections run
            target, x = block.attn.internal(block.norm1(x), self.name), None
        else:
            x, kept = block(x, keep=(self.name,))
            target = kept[self.name]
        self.tokens, self.ran = x, i
        return target


# -----------------------------------------------------------------------------
# Config and presets, and the script


@dataclass
class DistillConfig(TransferConfig):
    weight: float = 3.0             # w: weight of the attention loss
    out_dir: str = 'runs/distill'

    SCRIPT = 'attention_distill.py'

    def checks(self):
        return super().checks() + [('weight', self.weight >= 0, 'must be 0 or more')]


PRESETS = {**student_presets(SMALL_PRESETS),
           # all but the last of the 6 layers, as the paper leaves ViT-L's last 6 of 24: chosen on 5000
           # held-out training images, 87.6% against 86.8% for all 6 (results/fashion-mnist/VALIDATION.md)
           'fashion-mnist': {**student_presets(SMALL_PRESETS)['fashion-mnist'], 'layers': '0-4'},
           # the release's distillation command (global batch 2048 = 64 GPUs x 32), with the layers its README
           # asks for and the paper used: 0-17; the release's runs distilled 0-20: --layers 0-20 (RECIPES.md)
           'imagenet': dict(teacher='mae_vit_large', img_size=224, layers='0-17', global_pool=True, epochs=200,
                            warmup_epochs=20, batch_size=32, blr=1e-4, layer_decay=1.0, layer_decay_offset=0,
                            beta2=0.95, weight_decay=0.3, drop_path=0.2, ema=0.9999, randaug='rand-m9-mstd0.5-inc1',
                            reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1, num_workers=10, log_every=100)}



def main():
    cfg, env, data = start(DistillConfig, PRESETS)
    teacher, layers, heads = load_teacher(cfg, env.device, env.dtype)
    check_teacher(cfg, teacher, layers, data, env)
    torch.manual_seed(cfg.seed)
    student = build_student(cfg, teacher, data.num_classes, layers)
    log(env, cfg, f'attention distillation: {cfg.transfer} of layers {sorted(layers.values())} '
                  f'(heads {heads or "all"}) from {cfg.teacher}, weight {cfg.weight}')
    log(env, cfg, teacher.description)
    log(env, cfg, describe_map(layers, teacher.num_heads, student.num_heads))

    # evaluation runs the student alone, as a plain ViT
    metrics = fit(cfg, env, student, data, distill_loss_fn(cfg, teacher, layers, heads),
                  extra={'distilled_from': teacher_record(cfg, layers, heads)})
    log(env, cfg, f"final | distilled student (no teacher) top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}"
        + (f" | EMA top-1 {metrics['ema_top1']:.2f}" if 'ema_top1' in metrics else '') + f' | {cfg.out_dir}')


if __name__ == '__main__':
    run_main(main)
